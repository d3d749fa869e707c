"""Latent diffusion end to end: ``jattr run --latent`` and the latent LDS benchmark.

The runs use the tiny run config of cli_test and an autoencoder of 8 channels trained
for 20 steps: the numbers mean nothing, the plumbing is what is tested (the
autoencoder's quality is tests/latent_test.py's).
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jattr import cli
from jattr.bench import gradient_methods as gm
from jattr.bench import lds_cache
from jattr.diffusion.latent import decode_latents, encode_images, identity_space
from jattr.eval.lds import lds_per_query
from jattr.models.autoencoder import (LatentConfig, autoencoder_space, pack_autoencoder,
                                      unpack_autoencoder)
from jattr.runs import run as run_lib
from jattr.runs.config import RunConfig, load_config
from cli_test import TINY
import report_test
from toy_models import TINY_LDS_SPEC, tiny_apply, tiny_init

LATENT = {"num_steps": 20, "channels": [8, 8], "batch_size": 16}
"""A tiny autoencoder: 8 channels, 20 steps (8×8×1 digits -> 4×4×2 latents)."""


def _config(tmp_path, **extra):
  path = tmp_path / "tiny.json"
  path.write_text(json.dumps({**TINY, "latent": LATENT, **extra}))
  return path


# --- the config ----------------------------------------------------------------------

def test_pixel_configs_are_unchanged_and_the_latent_section_round_trips():
  pixel = RunConfig.from_json(TINY)
  assert "latent" not in pixel.to_json() and pixel.latent is None
  assert "latent" not in RunConfig().to_json()
  cfg = dataclasses.replace(pixel, latent=LatentConfig(**LATENT))
  doc = cfg.to_json()
  assert doc["latent"] == {**LatentConfig().to_dict(), **LATENT}
  back = RunConfig.from_json(json.loads(json.dumps(doc)))
  assert back == cfg and back.to_json() == doc
  assert back.latent.latent_shape((8, 8, 1)) == (4, 4, 2)


def test_latent_config_is_checked_naming_the_key():
  with pytest.raises(ValueError, match=r"latent\.num_step.*did you mean"):
    RunConfig.from_json({**TINY, "latent": {"num_step": 3}})
  with pytest.raises(ValueError, match="latent.*channels"):
    RunConfig.from_json({**TINY, "latent": {"downsample": 4, "channels": [8, 8]}})
  with pytest.raises(ValueError, match="learning_rate"):
    LatentConfig(learning_rate=0.0)
  # A latent section with the model still at the pixel shape is refused before training.
  cfg = RunConfig.from_json({**TINY, "latent": LATENT})
  with pytest.raises(ValueError, match=r"model.image_shape to \[4, 4, 2\]"):
    run_lib.training_data(cfg)


def test_the_autoencoder_is_stored_and_reused_deterministically(tmp_path):
  from jattr.data import load_digits
  images = load_digits().x[:32]
  latent = LatentConfig(num_steps=5, channels=(4, 4), batch_size=8)
  config, params = run_lib.fit_autoencoder(tmp_path / "a.npz", latent, images)
  stamp = (tmp_path / "a.npz").stat().st_mtime_ns
  again = run_lib.fit_autoencoder(tmp_path / "a.npz", latent, images)  # read, not retrained
  assert (tmp_path / "a.npz").stat().st_mtime_ns == stamp and again[0] == config
  fresh = latent.fit(images)  # retrained: the same bits
  for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(again[1]),
                     jax.tree.leaves(fresh[1])):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  z = encode_images(autoencoder_space(config, params), images)
  assert np.abs(z).max() <= 1.0 + 1e-6  # scaling "max": trainable with jattr.train
  # pack/unpack round-trips exactly, and refuses what is not a packed autoencoder
  config2, params2, record = unpack_autoencoder(pack_autoencoder(config, params, {"a": 1}))
  assert config2 == config and record == {"a": 1}
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="not a packed autoencoder"):
    unpack_autoencoder({"x": np.zeros(2)})
  # Another recipe, or other images, retrains.
  assert run_lib.stored_autoencoder(tmp_path / "a.npz", latent, images[:16]) is None
  run_lib.fit_autoencoder(tmp_path / "a.npz", dataclasses.replace(latent, seed=1), images)
  assert run_lib.stored_autoencoder(tmp_path / "a.npz", latent, images) is None
  assert run_lib.stored_autoencoder(tmp_path / "a.npz", dataclasses.replace(latent, seed=1),
                                    images) is not None


# --- jattr run --latent --------------------------------------------------------------

def test_latent_run_trains_samples_and_attributes_in_latent_space(tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main(["run", "--config", str(_config(tmp_path)), "--out", str(out), "--quiet",
                   "--latent"]) == 0
  printed = capsys.readouterr().out
  assert "latents 4×4×2" in printed and "report:" in printed
  stored = json.loads((out / "config.json").read_text())
  assert stored["model"]["image_shape"] == [4, 4, 2] and stored["latent"]["num_steps"] == 20
  assert (out / "autoencoder.npz").is_file()
  with np.load(out / "samples.npz") as z:
    x, latents = z["x"], z["z"]
  assert latents.shape == (4, 4, 4, 2) and x.shape == (4, 8, 8, 1)
  cfg = load_config(out / "config.json")
  space = run_lib.latent_space(cfg, out)
  np.testing.assert_array_equal(x, decode_latents(space, latents))  # x: the decoded samples
  scores = np.load(out / "attribution" / "scores.npz")
  assert scores["tau"].shape == (4, 48) and np.all(np.isfinite(scores["tau"]))
  report = out / "attribution"
  assert report_test.assert_links_resolve(report) > 4
  text = (report / "index.html").read_text()
  assert "attribution ran in the autoencoder&#x27;s latent space (4×4×2 latents" in text
  # The features are the UNet's gradients at the training latents (a (4, 4, 2) UNet takes
  # no 8×8 images); that they equal the pixel pipeline's under the identity space is
  # test_identity_latent_run_gives_the_pixel_runs_scores (slow).
  assert np.load(report / "train_features.npy").shape == (48, TINY["attribution"]["sketch_dim"])
  # Training again on the finished run reuses the autoencoder (and trains nothing).
  stamp = (out / "autoencoder.npz").stat().st_mtime_ns
  assert cli.main(["train", "--config", str(out / "config.json"), "--out", str(out),
                   "--quiet"]) == 0
  assert (out / "autoencoder.npz").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_latent_run_combines_with_conditional(tmp_path):
  out = tmp_path / "run"
  assert cli.main(["run", "--config", str(_config(tmp_path)), "--out", str(out), "--quiet",
                   "--latent", "--conditional", "--guidance-scale", "2"]) == 0
  with np.load(out / "samples.npz") as z:
    np.testing.assert_array_equal(z["y"], [0, 1, 2, 3])
    assert z["z"].shape == (4, 4, 4, 2) and z["x"].shape == (4, 8, 8, 1)
  assert np.all(np.isfinite(np.load(out / "attribution" / "scores.npz")["tau"]))
  page = (out / "attribution" / "query_002.html").read_text()
  assert "query 2 (label 2)" in page


@pytest.mark.slow
def test_identity_latent_run_gives_the_pixel_runs_scores(tmp_path, monkeypatch):
  """The pipeline's latent code path with encode = decode = identity is the pixel
  pipeline, bit for bit (the library-level twin: tests/latent_test.py)."""
  cfg = RunConfig.from_json(TINY)

  def run(out):
    run_lib.train_run(cfg, out)
    run_lib.sample_run(out)
    run_lib.attribute_run(out)
    with np.load(out / "samples.npz") as z:
      samples = {k: z[k] for k in z.files}
    return samples, np.load(out / "attribution" / "scores.npz")["tau"]

  pixel_samples, pixel_tau = run(tmp_path / "pixel")
  assert "z" not in pixel_samples
  monkeypatch.setattr(run_lib, "latent_space",
                      lambda cfg, run_dir, ds=None, progress=None: identity_space((8, 8, 1)))
  latent_samples, latent_tau = run(tmp_path / "identity")
  np.testing.assert_array_equal(latent_samples["z"], pixel_samples["x"])
  np.testing.assert_array_equal(latent_samples["x"], pixel_samples["x"])
  np.testing.assert_array_equal(latent_tau, pixel_tau)
  assert "latent space" in (tmp_path / "identity" / "attribution" / "index.html").read_text()


# --- the latent LDS benchmark --------------------------------------------------------

LATENT_LDS = dataclasses.replace(TINY_LDS_SPEC,
                                 latent={"num_steps": 10, "channels": [4, 4], "batch_size": 8})


def _tiny_latent_init(key):
  return tiny_init(key, c=2)  # the latents have 2 channels


def test_pixel_specs_keep_their_digest_and_the_latent_one_differs():
  assert "latent" not in TINY_LDS_SPEC.to_dict()
  assert LATENT_LDS.to_dict()["latent"] == LATENT_LDS.latent
  assert LATENT_LDS.digest() != TINY_LDS_SPEC.digest()
  assert lds_cache.LdsSpec.from_dict(LATENT_LDS.to_dict()) == LATENT_LDS
  with pytest.raises(ValueError, match=r"latent\.chanels"):
    lds_cache.LdsSpec.from_dict({**TINY_LDS_SPEC.to_dict(), "latent": {"chanels": [4]}})
  assert LATENT_LDS.model_shape((8, 8, 1)) == (4, 4, 2)


def test_latent_lds_cache_runs_on_latents_and_a_method_scores_it(tmp_path):
  cache = lds_cache.build(LATENT_LDS, tmp_path, model=(_tiny_latent_init, tiny_apply),
                          progress=False)
  assert (cache.directory / "autoencoder.npz").is_file()
  assert cache.train_images.shape == (16, 4, 4, 2) and cache.train_pixels.shape == (16, 8, 8, 1)
  space = cache.latent_space
  np.testing.assert_array_equal(cache.train_images, encode_images(space, cache.train_pixels))
  for name, qs in cache.splits.items():
    assert qs.queries.images.shape[1:] == (4, 4, 2), name
    assert cache.query_pixels[name].shape == (qs.queries.images.shape[0], 8, 8, 1)
    assert qs.y.shape == (qs.queries.images.shape[0], 4, 2) and np.all(np.isfinite(qs.y))
  np.testing.assert_array_equal(cache.query_pixels["generated"],
                                decode_latents(space, cache.splits["generated"].queries.images))
  trak_fn, grid = gm.trak_method(cache, num_draws=3, dim=64)
  queries = cache.splits["test"].queries
  tau = trak_fn(grid[3], queries)
  assert tau.shape == (3, 16) and np.all(np.isfinite(tau))
  rho = lds_per_query(tau, cache.masks, cache.splits["test"].y.mean(-1))
  assert rho.shape == (3,)
  # Loading the built cache trains nothing and gives the same latents.
  again = lds_cache.build(LATENT_LDS, tmp_path, model=(_tiny_latent_init, tiny_apply),
                          progress=False)
  np.testing.assert_array_equal(again.train_images, cache.train_images)
  assert set(again.timing) == set(cache.timing) and "autoencoder" in cache.timing
