"""Feature store: read-back, config checks, crash safety, resumable featurization, CLI."""

import argparse
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr.diffusion import draws as draws_lib
from jattr.diffusion import measurements, schedules
from jattr.features import ProjectionConfig, featurize
from jattr import cli, runs
from jattr.io import hashing
from jattr.runs import stores
from jattr.io import feature_store as fs_lib
from jattr.io.feature_store import FeatureStore


T = 20
SHAPE = (4, 4, 1)
D = 16
PROJ = ProjectionConfig(dim=6, kind="rademacher", seed=3, block_size=64)


def apply_fn(params, x_t, t):
  """A tiny MLP denoiser: [B, H, W, C], [B] -> [B, H, W, C]."""
  b = x_t.shape[0]
  h = jnp.concatenate([x_t.reshape(b, -1), (t.astype(x_t.dtype) / T)[:, None]], axis=1)
  h = jnp.tanh(h @ params["w1"] + params["b1"])
  return (h @ params["w2"]).reshape(x_t.shape)


def _normal(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def problem():
  params = {"w1": jnp.asarray(_normal(0, D + 1, 8) / 4), "b1": jnp.zeros(8),
            "w2": jnp.asarray(_normal(1, 8, D) / 3)}
  draws = draws_lib.fixed_draws(jax.random.key(0), 3, SHAPE, T)
  fn = measurements.measurement_fn("square_norm", apply_fn, schedules.linear(T), draws)
  x = _normal(2, 10, *SHAPE)
  config = fs_lib.feature_config(
      params_hash=hashing.model_hash(params), measurement="square_norm", num_draws=3,
      timesteps="uniform", draw_seed=0, projection=PROJ, dataset="toy", num_examples=10,
      examples_hash=hashing.array_hash(np.arange(10)))
  return fn, params, x, config


def test_read_back_equals_written(tmp_path):
  data = _normal(0, 10, 3)
  store = FeatureStore.open(tmp_path / "s", {"a": (1, 2)}, num_rows=10, dim=3, chunk_rows=4)
  assert store.num_chunks == 3 and store.missing_chunks() == [0, 1, 2] and not store.complete
  for i in (2, 0):
    a, b = store.chunk_bounds(i)
    store.write_chunk(i, data[a:b])
  assert store.missing_chunks() == [1]
  np.testing.assert_array_equal(store.read(rows=np.array([9, 0, 3])), data[[9, 0, 3]])
  with pytest.raises(ValueError, match=r"chunks \[1\]"):
    store.read()
  store.write_chunk(1, data[4:8])
  reopened = FeatureStore.load(tmp_path / "s")
  assert reopened.complete and reopened.config == {"a": [1, 2]}
  np.testing.assert_array_equal(reopened.read(), data)
  np.testing.assert_array_equal(reopened.read(slice(2, 7)), data[2:7])
  with pytest.raises(ValueError, match="shape"):
    store.write_chunk(2, data[:4])
  with pytest.raises(ValueError, match="non-finite"):
    store.write_chunk(2, np.full((2, 3), np.nan))


def test_mixing_configurations_raises_naming_the_keys(tmp_path):
  config = {"projection": {"dim": 3, "seed": 0}, "measurement": {"name": "loss"}}
  store = FeatureStore.open(tmp_path / "s", config, num_rows=5, dim=3, chunk_rows=2)
  store.write_chunk(0, np.ones((2, 3)))
  FeatureStore.open(tmp_path / "s", config, num_rows=5, dim=3, chunk_rows=2)  # same: fine
  other = {"projection": {"dim": 3, "seed": 1}, "measurement": {"name": "loss"}}
  with pytest.raises(ValueError, match=r"projection\.seed: stored 0, given 1"):
    FeatureStore.open(tmp_path / "s", other, num_rows=5, dim=3, chunk_rows=2)
  with pytest.raises(ValueError, match="num_rows"):
    FeatureStore.open(tmp_path / "s", config, num_rows=6, dim=3, chunk_rows=2)
  (tmp_path / "x").mkdir()
  (tmp_path / "x" / "notes.txt").write_text("hi")
  with pytest.raises(ValueError, match="not a feature store"):
    FeatureStore.open(tmp_path / "x", config, num_rows=5, dim=3, chunk_rows=2)
  with pytest.raises(ValueError, match=r"draws\.seed: train 0, query 1"):
    fs_lib.check_compatible({"draws": {"seed": 0}, "model": 1, "measurement": 1, "projection": 1},
                        {"draws": {"seed": 1}, "model": 1, "measurement": 1, "projection": 1})


def test_chunk_is_not_marked_complete_if_marking_fails(tmp_path, monkeypatch):
  store = FeatureStore.open(tmp_path / "s", {}, num_rows=4, dim=2, chunk_rows=2)

  def crash(path, doc):
    raise KeyboardInterrupt("killed between the data write and the sidecar write")

  monkeypatch.setattr(fs_lib.atomic, "write_json", crash)
  with pytest.raises(KeyboardInterrupt):
    store.write_chunk(0, np.ones((2, 2)))
  monkeypatch.undo()
  assert FeatureStore.load(tmp_path / "s").missing_chunks() == [0, 1]


def test_resumed_featurization_equals_uninterrupted(tmp_path, monkeypatch, problem):
  fn, params, x, config = problem
  calls = []
  real_featurize = stores.featurize

  def counting(fn_, params_, examples, proj, *, chunk_size):
    calls.append(np.asarray(examples)[0].copy())
    return real_featurize(fn_, params_, examples, proj, chunk_size=chunk_size)

  monkeypatch.setattr(stores, "featurize", counting)
  full = FeatureStore.open(tmp_path / "full", config, 10, PROJ.dim, chunk_rows=4)
  stores.store_featurize(fn, params, x, PROJ, full, chunk_size=2, progress=False)
  assert len(calls) == 3
  expected = np.asarray(featurize(fn, params, jnp.asarray(x), PROJ))
  np.testing.assert_allclose(full.read(), expected, rtol=1e-5, atol=1e-6)

  real_write = FeatureStore.write_chunk

  def write_then_die(self, i, array):
    real_write(self, i, array)
    raise KeyboardInterrupt("killed after the first chunk")

  monkeypatch.setattr(FeatureStore, "write_chunk", write_then_die)
  part = FeatureStore.open(tmp_path / "part", config, 10, PROJ.dim, chunk_rows=4)
  with pytest.raises(KeyboardInterrupt):
    stores.store_featurize(fn, params, x, PROJ, part, chunk_size=2, progress=False)
  monkeypatch.setattr(FeatureStore, "write_chunk", real_write)
  resumed = FeatureStore.open(tmp_path / "part", config, 10, PROJ.dim, chunk_rows=4)
  assert resumed.missing_chunks() == [1, 2]
  calls.clear()
  stores.store_featurize(fn, params, x, PROJ, resumed, chunk_size=2, progress=False)
  # Only chunks 1 (rows 4..7) and 2 (rows 8..9) were computed again.
  assert len(calls) == 2
  np.testing.assert_array_equal(calls[0], x[4])
  np.testing.assert_array_equal(calls[1], x[8])
  assert resumed.complete
  np.testing.assert_array_equal(resumed.read(), full.read())


def test_store_featurize_checks_the_store(tmp_path, problem):
  fn, params, x, config = problem
  store = FeatureStore.open(tmp_path / "s", config, 10, PROJ.dim, chunk_rows=4)
  other = ProjectionConfig(dim=PROJ.dim, kind=PROJ.kind, seed=PROJ.seed + 1,
                           block_size=PROJ.block_size)
  with pytest.raises(ValueError, match="seed"):
    stores.store_featurize(fn, params, x, other, store, progress=False)
  moved = jax.tree.map(lambda p: p + 1e-3, params)
  with pytest.raises(ValueError, match="params_sha256"):
    stores.store_featurize(fn, moved, x, PROJ, store, progress=False)
  with pytest.raises(ValueError, match="N = store.num_rows = 10"):
    stores.store_featurize(fn, params, x[:9], PROJ, store, progress=False)


def test_model_hash():
  a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  assert hashing.model_hash(a) == hashing.model_hash({"w": jnp.asarray(a["w"])})
  assert hashing.model_hash(a) != hashing.model_hash({"w": a["w"].reshape(3, 2)})
  assert hashing.model_hash(a) != hashing.model_hash({"v": a["w"]})
  assert hashing.model_hash(a) != hashing.model_hash({"w": a["w"].astype(np.float64)})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A run directory holding an untrained tiny UNet, saved as a finished run.

  XLA convolutions: their vmap(grad) compiles about twice as fast as im2col's on CPU.
  """
  from jattr.io import checkpoint
  from jattr.models import UNetConfig
  from jattr.runs import RunConfig, model_fns
  from jattr.train import TrainConfig, init_state, make_optimizer

  run = tmp_path_factory.mktemp("run")
  cfg = RunConfig(num_train=24, num_timesteps=50,
                  model=UNetConfig(image_shape=(8, 8, 1), base_channels=8, channel_mults=(1,),
                                   num_groups=4, conv_impl="xla"),
                  train=TrainConfig(num_steps=1, batch_size=4, segment_steps=1))
  (run / "config.json").write_text(json.dumps(cfg.to_json()))
  _, init_fn = model_fns(cfg)
  state = init_state(init_fn(jax.random.key(0)), make_optimizer(cfg.train))
  checkpoint.save(run / "checkpoints", 1, state, {})
  np.savez(run / "samples.npz", x=np.clip(_normal(5, 3, 8, 8, 1), -1, 1), seed=0,
           sampler="ddpm")
  return run


def _cli(argv):
  """Runs a jattr command as the CLI parses it; returns what the command returns."""
  args = cli.build_parser().parse_args(argv)
  return args.func(args)


def test_cli_featurize_and_score_round_trip(tmp_path, tiny_run):
  from jattr.methods import trak_fit, trak_score

  common = ["--num-draws", "2", "--proj-dim", "16", "--store-chunk-rows", "10", "--quiet"]
  train = _cli(["featurize", "--run", str(tiny_run), "--out", str(tmp_path / "train"),
                "--measurement", "loss", *common])
  assert train.complete and train.read().shape == (24, 16)
  assert train.config["dataset"]["num"] == 24 and train.config["measurement"]["name"] == "loss"
  # The same command again finds every chunk complete and computes nothing; another
  # projection seed into the same store is refused before any work.
  again = _cli(["featurize", "--run", str(tiny_run), "--out", str(tmp_path / "train"),
                "--measurement", "loss", *common])
  np.testing.assert_array_equal(again.read(), train.read())
  with pytest.raises(ValueError, match=r"projection\.seed: stored 0, given 2"):
    _cli(["featurize", "--run", str(tiny_run), "--out", str(tmp_path / "train"),
          "--measurement", "loss", *common, "--proj-seed", "2"])
  query = _cli(["featurize", "--run", str(tiny_run), "--out", str(tmp_path / "q"),
                "--queries", "samples", "--like", str(tmp_path / "train"), "--quiet"])
  assert query.config["projection"] == train.config["projection"]
  with pytest.raises(ValueError, match="--proj-seed 1 but the store has 0"):
    _cli(["featurize", "--run", str(tiny_run), "--out", str(tmp_path / "q2"),
          "--queries", "samples", "--like", str(tmp_path / "train"), "--proj-seed", "1"])

  tau = _cli(["score", "--train-store", str(tmp_path / "train"), "--query-store",
              str(tmp_path / "q"), "--method", "trak", "--out", str(tmp_path / "s.npz")])
  with np.load(tmp_path / "s.npz") as z:
    np.testing.assert_array_equal(z["tau"], tau)
    assert json.loads(str(z["query_config"]))["dataset"]["name"] == "samples"
  phi, phi_q = jnp.asarray(train.read()), jnp.asarray(query.read())
  np.testing.assert_allclose(tau, trak_score(trak_fit(phi), phi_q), rtol=1e-4, atol=1e-6)

  # A query store made with another projection seed cannot be scored against train
  # (a copy of the query store whose sidecar says seed 1).
  shutil.copytree(tmp_path / "q", tmp_path / "q3")
  sidecar = json.loads((tmp_path / "q3" / "store.json").read_text())
  sidecar["config"]["projection"]["seed"] = 1
  (tmp_path / "q3" / "store.json").write_text(json.dumps(sidecar))
  with pytest.raises(ValueError, match=r"projection\.seed: train 0, query 1"):
    _cli(["score", "--train-store", str(tmp_path / "train"), "--query-store",
          str(tmp_path / "q3"), "--method", "grad_dot", "--out", str(tmp_path / "t.npz")])
  cos = _cli(["score", "--train-store", str(tmp_path / "train"), "--query-store",
              str(tmp_path / "q"), "--method", "grad_cosine", "--out", str(tmp_path / "c.npz")])
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(cos, unit(np.asarray(phi_q)) @ unit(np.asarray(phi)).T,
                             rtol=1e-4, atol=1e-6)


def test_cli_featurize_with_the_sparse_projection(tmp_path, tiny_run):
  common = ["--num-draws", "2", "--proj-dim", "16", "--measurement", "loss", "--quiet"]
  dense = _cli(["featurize", "--run", str(tiny_run), "--out", str(tmp_path / "d"), *common])
  assert "nonzeros" not in dense.config["projection"]  # as stores made before the kind
  sparse = _cli(["featurize", "--run", str(tiny_run), "--out", str(tmp_path / "s"), *common,
                 "--proj-kind", "sparse", "--proj-nonzeros", "4"])
  assert sparse.config["projection"] == {"dim": 16, "kind": "sparse", "seed": 0,
                                         "block_size": 1024, "nonzeros": 4}
  # the store holds exactly the library's sparse features of the run's training images
  from jattr.diffusion import fixed_draws
  from jattr.diffusion.measurements import measurement_fn
  from jattr.features import ProjectionConfig, featurize
  from jattr.runs.features import query_examples
  from jattr.runs.run import load_run
  cfg, apply_fn, params = load_run(tiny_run)
  draws = fixed_draws(jax.random.key(0), 2, cfg.model.image_shape, cfg.num_timesteps)
  fn = measurement_fn("loss", apply_fn, cfg.noise_schedule, draws,
                      parameterization=cfg.train.parameterization)
  x = query_examples(cfg, tiny_run, "train")[0]
  want = featurize(fn, params, jnp.asarray(x), ProjectionConfig(16, "sparse", nonzeros=4))
  np.testing.assert_allclose(sparse.read(), want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(dense.read(), sparse.read())
  with pytest.raises(ValueError, match=r"projection\.nonzeros: stored 4, given 2"):
    _cli(["featurize", "--run", str(tiny_run), "--out", str(tmp_path / "s"), *common,
          "--proj-kind", "sparse", "--proj-nonzeros", "2"])
  query = _cli(["featurize", "--run", str(tiny_run), "--out", str(tmp_path / "q"),
                "--queries", "samples", "--like", str(tmp_path / "s"), "--quiet"])
  assert query.config["projection"] == sparse.config["projection"]
  with pytest.raises(ValueError, match="proj_dim = 16: expected a multiple of proj_nonzeros = 3"):
    _cli(["featurize", "--run", str(tiny_run), "--out", str(tmp_path / "s3"), *common,
          "--proj-kind", "sparse", "--proj-nonzeros", "3"])


def test_held_out_queries_are_the_images_the_run_did_not_train_on(tiny_run):
  from jattr.data import load_digits
  from jattr.runs import load_config, training_data

  cfg = load_config(tiny_run / "config.json")
  x, info, digest = runs.query_examples(cfg, tiny_run, "test")
  _, train_idx = training_data(cfg)
  held_out = np.array([i for i in range(1797) if i not in set(train_idx.tolist())])
  assert info == {"name": "digits", "split": "train_heldout",
                  "images_sha256": hashing.array_hash(x)} and len(held_out) == 1797 - 24
  np.testing.assert_array_equal(x, load_digits().x[held_out])
  assert digest == hashing.array_hash(held_out)


def _three_chunk_store(path):
  store = FeatureStore.open(path, {"a": 1}, 10, 3, 4)
  for i in range(store.num_chunks):
    a, b = store.chunk_bounds(i)
    store.write_chunk(i, np.arange(a * 3, b * 3, dtype=np.float32).reshape(b - a, 3))
  return store


def test_a_deleted_or_damaged_chunk_is_an_error_naming_it_never_nan(tmp_path):
  store = _three_chunk_store(tmp_path / "s")
  np.testing.assert_array_equal(store.read()[4], [12, 13, 14])
  store.chunk_file(1).unlink()  # the sidecar still says complete
  loaded = FeatureStore.load(tmp_path / "s")
  assert loaded.complete
  with pytest.raises(ValueError, match=r"chunk 1 \(rows 4:8, file .*features/c/1/0\) is missing"):
    loaded.read()
  np.testing.assert_array_equal(loaded.read(np.arange(4)), store.read(np.arange(4)))
  store = _three_chunk_store(tmp_path / "t")
  raw = bytearray(store.chunk_file(2).read_bytes())
  raw[0] ^= 0xFF  # one byte of the first float of chunk 2 changed
  store.chunk_file(2).write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="chunk 2 .* is damaged"):
    FeatureStore.load(tmp_path / "t").read(np.array([9]))


def test_a_store_written_before_checksums_is_still_checked_for_missing_chunks(tmp_path):
  import json

  store = _three_chunk_store(tmp_path / "s")
  sidecar = json.loads((tmp_path / "s" / "store.json").read_text())
  del sidecar["chunk_sha256"]
  (tmp_path / "s" / "store.json").write_text(json.dumps(sidecar))
  np.testing.assert_array_equal(FeatureStore.load(tmp_path / "s").read(), store.read())
  store.chunk_file(0).unlink()
  with pytest.raises(ValueError, match="chunk 0 .* is missing"):
    FeatureStore.load(tmp_path / "s").read()


def test_score_with_a_deleted_chunk_exits_2_and_writes_nothing(tmp_path, tiny_run, capsys):
  _cli(["featurize", "--run", str(tiny_run), "--out", str(tmp_path / "train"), "--num-draws",
        "2", "--proj-dim", "16", "--store-chunk-rows", "16", "--quiet"])
  _cli(["featurize", "--run", str(tiny_run), "--out", str(tmp_path / "q"), "--queries", "test",
        "--like", str(tmp_path / "train"), "--quiet"])
  FeatureStore.load(tmp_path / "train").chunk_file(0).unlink()
  code = cli.main(["score", "--train-store", str(tmp_path / "train"), "--query-store",
                   str(tmp_path / "q"), "--out", str(tmp_path / "tau.npz")])
  assert code == 2 and "chunk 0" in capsys.readouterr().err
  assert not (tmp_path / "tau.npz").exists()


def test_cli_featurize_split_over_processes(tmp_path, tiny_run):
  # 3 samples in one chunk: host 0 of 2 owns no chunk, host 1 owns chunk 0.
  common = ["--run", str(tiny_run), "--queries", "samples", "--num-draws", "2", "--proj-dim",
            "8", "--measurement", "loss", "--store-chunk-rows", "3", "--quiet"]
  out = str(tmp_path / "s")
  with pytest.raises(ValueError, match="--process-index and --process-count go together"):
    _cli(["featurize", *common, "--out", out, "--process-index", "1"])
  with pytest.raises(ValueError, match=r"index in \[0, --process-count 2\)"):
    _cli(["featurize", *common, "--out", out, "--process-index", "2", "--process-count", "2"])
  share = ["--process-count", "2", "--process-index"]
  part = _cli(["featurize", *common, "--out", out, *share, "0"])  # nothing of its own to do
  assert part.missing_chunks() == [0]
  with pytest.raises(fs_lib.StoreValidationError,
                     match=r"process 1 of 2: chunks 0 \(3 rows\) missing; it never ran"):
    stores.validate_store(out)
  whole = _cli(["featurize", *common, "--out", out, *share, "1"])  # the last: checks, folds
  assert whole.complete and not (tmp_path / "s" / "done").exists()
  assert json.loads((tmp_path / "s" / "store.json").read_text())["complete_chunks"] == [0]
  again = _cli(["featurize", *common, "--out", out, *share, "1"])  # resumed: nothing left
  assert json.loads((tmp_path / "s" / "processes" / "1" / "process.json").read_text())[
      "computed"] == []
  assert stores.validate_store(out).read().shape == (3, 8) and again.complete
