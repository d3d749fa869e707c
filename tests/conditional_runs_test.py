"""The run-directory stages on a class-conditional run: feature stores, curvature files,
influence and unlearning take each example with its label."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr import runs
from jattr.curvature import fit_diagonal
from jattr.diffusion import fixed_draws
from jattr.diffusion.measurements import measurement_fn
from jattr.features import ProjectionConfig, featurize
from jattr.io.feature_store import FeatureStore
from jattr.methods.influence import influence

N_TRAIN, N_SAMPLES = 12, 3


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
  """An untrained class-conditional tiny UNet saved as a finished run, with labelled samples."""
  from jattr.io import checkpoint
  from jattr.models import UNetConfig
  from jattr.runs import RunConfig, model_fns
  from jattr.train import TrainConfig, init_state, make_optimizer

  run = tmp_path_factory.mktemp("cond_run")
  cfg = RunConfig(num_train=N_TRAIN, num_timesteps=50,
                  model=UNetConfig(image_shape=(8, 8, 1), base_channels=8, channel_mults=(1,),
                                   num_groups=4, conv_impl="xla", num_classes=10),
                  train=TrainConfig(num_steps=1, batch_size=4, segment_steps=1,
                                    cond_dropout=0.1))
  (run / "config.json").write_text(json.dumps(cfg.to_json()))
  _, init_fn = model_fns(cfg)
  state = init_state(init_fn(jax.random.key(0)), make_optimizer(cfg.train))
  checkpoint.save(run / "checkpoints", 1, state, {})
  x = np.random.default_rng(0).uniform(-1, 1, (N_SAMPLES, 8, 8, 1)).astype(np.float32)
  np.savez(run / "samples.npz", x=x, y=np.array([3, 1, 4], np.int32), seed=0, sampler="ddpm")
  return run


def test_stores_and_influence_take_the_labels(cond_run, tmp_path):
  cfg, apply_fn, params = runs.load_run(cond_run)
  assert cfg.conditional
  ds, _ = runs.training_data(cfg)
  with np.load(cond_run / "samples.npz") as z:
    samples, labels = z["x"], z["y"]

  runs.featurize_run(cond_run, tmp_path / "train", queries="train", num_draws=2, proj_dim=16,
                     progress=False)
  runs.featurize_run(cond_run, tmp_path / "samples", queries="samples",
                     like=str(tmp_path / "train"), progress=False)
  stored = FeatureStore.load(tmp_path / "samples").read()
  draws = fixed_draws(jax.random.key(0), 2, (8, 8, 1), 50, "uniform")
  f = measurement_fn("square_norm", apply_fn, cfg.noise_schedule, draws)
  proj = ProjectionConfig(16)
  want = featurize(f, params, (jnp.asarray(samples), jnp.asarray(labels)), proj)
  np.testing.assert_allclose(stored, want, rtol=1e-5, atol=1e-6)
  relabelled = featurize(f, params, (jnp.asarray(samples), jnp.asarray(labels + 1)), proj)
  assert not np.allclose(stored, relabelled, rtol=1e-3)

  runs.fit_run_curvature(cond_run, tmp_path / "diag", approx="diagonal", num_draws=2,
                         batch_size=N_TRAIN, progress=False)
  tau, info = runs.influence_run(cond_run, tmp_path / "diag", queries="samples")
  assert tau.shape == (N_SAMPLES, N_TRAIN) and info["queries"]["labels_sha256"]
  x = (jnp.asarray(ds.x), jnp.asarray(ds.y, jnp.int32))
  d0 = fixed_draws(jax.random.key(0), 2, (8, 8, 1), 50, "uniform")
  state = fit_diagonal(apply_fn, params, cfg.noise_schedule, x, d0, batch_size=N_TRAIN,
                       key=jax.random.key(0))
  want = influence(apply_fn, params, cfg.noise_schedule, d0, x,
                   (jnp.asarray(samples), jnp.asarray(labels)), state)
  np.testing.assert_allclose(tau, want, rtol=1e-3, atol=1e-5)


def test_unlabelled_samples_of_a_conditional_run_are_refused(cond_run, tmp_path):
  bad = tmp_path / "run"
  bad.mkdir()
  for name in ("config.json",):
    (bad / name).write_text((cond_run / name).read_text())
  np.savez(bad / "samples.npz", x=np.zeros((2, 8, 8, 1), np.float32))
  cfg = runs.load_config(bad / "config.json")
  with pytest.raises(ValueError, match="no class label"):
    runs.query_examples(cfg, bad, "samples")


def test_the_stages_of_a_latent_run_work_on_its_latents(tmp_path):
  """jattr featurize / fit-curvature / influence on a latent run: the training images
  encoded by the run's autoencoder, the samples' latents z."""
  from jattr.diffusion.latent import encode_images
  from jattr.io import checkpoint
  from jattr.models import UNetConfig
  from jattr.models.autoencoder import LatentConfig
  from jattr.runs import RunConfig, model_fns
  from jattr.runs.run import fit_autoencoder, latent_space
  from jattr.train import TrainConfig, init_state, make_optimizer

  run = tmp_path / "latent_run"
  run.mkdir()
  cfg = RunConfig(num_train=N_TRAIN, num_timesteps=50,
                  latent=LatentConfig(channels=(8, 8), num_steps=3, batch_size=8),
                  model=UNetConfig(image_shape=(4, 4, 2), base_channels=8, channel_mults=(1,),
                                   num_groups=4, conv_impl="xla"),
                  train=TrainConfig(num_steps=1, batch_size=4, segment_steps=1))
  (run / "config.json").write_text(json.dumps(cfg.to_json()))
  ds, _ = runs.training_data(cfg)
  fit_autoencoder(run / "autoencoder.npz", cfg.latent, ds.x)
  _, init_fn = model_fns(cfg)
  state = init_state(init_fn(jax.random.key(0)), make_optimizer(cfg.train))
  checkpoint.save(run / "checkpoints", 1, state, {})
  z = np.random.default_rng(0).uniform(-1, 1, (N_SAMPLES, 4, 4, 2)).astype(np.float32)
  np.savez(run / "samples.npz", x=np.zeros((N_SAMPLES, 8, 8, 1), np.float32), z=z, seed=0,
           sampler="ddpm")

  cfg, apply_fn, params = runs.load_run(run)
  latents = encode_images(latent_space(cfg, run), ds.x)
  runs.featurize_run(run, tmp_path / "train", queries="train", num_draws=2, proj_dim=16,
                     progress=False)
  draws = fixed_draws(jax.random.key(0), 2, (4, 4, 2), 50, "uniform")
  f = measurement_fn("square_norm", apply_fn, cfg.noise_schedule, draws)
  want = featurize(f, params, jnp.asarray(latents), ProjectionConfig(16))
  np.testing.assert_allclose(FeatureStore.load(tmp_path / "train").read(), want, rtol=1e-5,
                             atol=1e-6)
  runs.fit_run_curvature(run, tmp_path / "diag", approx="diagonal", num_draws=2,
                         batch_size=N_TRAIN, progress=False)
  tau, _ = runs.influence_run(run, tmp_path / "diag", queries="samples")
  assert tau.shape == (N_SAMPLES, N_TRAIN) and np.all(np.isfinite(tau))
