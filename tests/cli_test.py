"""End to end through the CLI on a tiny configuration: train, sample, attribute."""

import json

import numpy as np

from jattr import cli

import report_test  # tests/ is on sys.path, as for toy_models

TINY = {
    "dataset": "digits", "num_train": 48, "num_timesteps": 20,
    # XLA convolutions: their vmap(grad) compiles about twice as fast as im2col's on
    # CPU (the im2col UNet is covered by models_test and the README's main job).
    "model": {"image_shape": [8, 8, 1], "base_channels": 8, "channel_mults": [1, 2],
              "num_groups": 4, "conv_impl": "xla"},
    "train": {"num_steps": 6, "batch_size": 8, "segment_steps": 3},
    "num_samples": 4,
    "attribution": {"num_draws": 2, "proj_dim": 32, "sketch_dim": 64, "chunk_size": 8,
                    "top_k": 3},
}


def test_run_trains_samples_and_attributes(tmp_path, capsys):
  cfg = tmp_path / "tiny.json"
  cfg.write_text(json.dumps(TINY))
  out = tmp_path / "run"
  assert cli.main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
  printed = capsys.readouterr().out
  assert "report:" in printed and "samples" in printed
  for name in ("config.json", "losses.csv", "train_summary.json", "samples.png", "samples.npz",
               "attribution/index.html", "attribution/query_003.png", "attribution/scores.npz"):
    assert (out / name).exists(), name
  scores = np.load(out / "attribution" / "scores.npz")
  assert scores["tau"].shape == (4, 48) and np.all(np.isfinite(scores["tau"]))
  assert scores["top"].shape == (4, 3)
  np.testing.assert_array_equal(scores["top"][:, 0], scores["tau"].argmax(1))
  report = out / "attribution"
  index = report_test.parse(report / "index.html")
  assert [int(r["data-query"]) for r in index.rows] == [0, 1, 2, 3]
  assert report_test.assert_links_resolve(report) > 4
  text = (report / "index.html").read_text()
  assert "sketched-GGN influence, f = loss" in text and "K = 2" in text
  assert "k = 64 sparse" in text and "4 sampled rows" in text
  assert "library default (not tuned)" in text and "results.md#" in text
  for i in range(4):  # proponents in descending, opponents in ascending order of tau
    page = report_test.parse(report / f"query_{i:03d}.html")
    tau, ids = scores["tau"][i], scores["train_ids"]
    assert [t[0] for t in page.tables["pro"]] == [ids[j] for j in np.argsort(-tau)[:3]
                                                  if tau[j] > 0]
    assert [t[0] for t in page.tables.get("opp", [])] == [ids[j] for j in np.argsort(tau)[:3]
                                                          if tau[j] < 0]
    assert len(page.tables["neighbours"]) == 3
  # jattr report rebuilds the same report from the scores file.
  assert cli.main(["report", "--scores", str(report / "scores.npz"), "--run", str(out)]) == 0
  np.testing.assert_array_equal(np.load(out / "reports" / "scores" / "scores.npz")["top"],
                                scores["top"])
  # Sampling again with the run's seed reproduces the samples.
  first = np.load(out / "samples.npz")["x"]
  assert cli.main(["sample", "--run", str(out)]) == 0
  np.testing.assert_array_equal(np.load(out / "samples.npz")["x"], first)

  # (D-)TRAK, set in the run's config, attributes the same run
  doc = json.loads((out / "config.json").read_text())
  doc["attribution"]["method"] = "trak"
  (out / "config.json").write_text(json.dumps(doc))
  assert cli.main(["attribute", "--run", str(out), "--quiet"]) == 0
  text = (report / "index.html").read_text()
  assert "D-TRAK, f = square_norm" in text and "k = 32 rademacher" in text
  assert "library default (not tuned)" in text and "effective dimension" in text
  trak_tau = np.load(out / "attribution" / "scores.npz")["tau"]
  assert trak_tau.shape == (4, 48) and not np.allclose(trak_tau, scores["tau"])

def test_train_refuses_a_different_config_in_the_same_directory(tmp_path, capsys):
  cfg = tmp_path / "tiny.json"
  cfg.write_text(json.dumps(TINY))
  out = tmp_path / "run"
  assert cli.main(["train", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
  assert cli.main(["train", "--config", str(cfg), "--out", str(out), "--quiet",
                   "--steps", "9"]) == 2
  assert "different configuration" in capsys.readouterr().err


def test_clear_errors(tmp_path, capsys):
  assert cli.main(["sample", "--run", str(tmp_path / "nope")]) == 2
  assert "config.json" in capsys.readouterr().err
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"datset": "digits"}))
  assert cli.main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
  assert "unknown RunConfig fields ['datset'] (did you mean 'dataset'?)" in capsys.readouterr().err
  assert cli.main(["train", "--dataset", "cifar2", "--data-dir", str(tmp_path / "void"),
                   "--out", str(tmp_path / "r2")]) == 2
  assert "void" in capsys.readouterr().err


def test_conditional_run_samples_each_class_and_shows_the_labels(tmp_path, capsys):
  cfg = tmp_path / "tiny.json"
  cfg.write_text(json.dumps(TINY))
  out = tmp_path / "run"
  assert cli.main(["run", "--config", str(cfg), "--out", str(out), "--quiet", "--conditional",
                   "--guidance-scale", "2"]) == 0
  stored = json.loads((out / "config.json").read_text())
  assert stored["model"]["num_classes"] == 10 and stored["train"]["cond_dropout"] == 0.1
  assert stored["guidance_scale"] == 2.0
  with np.load(out / "samples.npz") as z:
    np.testing.assert_array_equal(z["y"], [0, 1, 2, 3])  # the classes in turn
    first = z["x"]
  scores = np.load(out / "attribution" / "scores.npz")
  assert scores["tau"].shape == (4, 48) and np.all(np.isfinite(scores["tau"]))
  page = (out / "attribution" / "query_002.html").read_text()
  assert "query 2 (label 2)" in page and "<th>label</th>" in page
  # The same run sampled again reproduces its (guided) samples.
  assert cli.main(["sample", "--run", str(out)]) == 0
  np.testing.assert_array_equal(np.load(out / "samples.npz")["x"], first)
  # Guidance without a conditional model is refused, naming the flag.
  assert cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / "r2"),
                   "--guidance-scale", "2"]) == 2
  assert "--guidance-scale" in capsys.readouterr().err
