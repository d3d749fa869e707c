"""Curvature on disk (jattr.io.curvature_store) and the fit-curvature / influence commands."""

import argparse
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr.curvature import DiagonalState, EkfacState, KfacState, dense_state
from jattr import cli, runs
from jattr.io.hashing import model_hash
from jattr.io import curvature_store as cs

N_TRAIN, N_SAMPLES, K = 6, 3, 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A run directory holding an untrained tiny UNet, saved as a finished run."""
  from jattr.io import checkpoint
  from jattr.models import UNetConfig
  from jattr.runs import RunConfig, model_fns
  from jattr.train import TrainConfig, init_state, make_optimizer

  run = tmp_path_factory.mktemp("run")
  cfg = RunConfig(num_train=N_TRAIN, num_timesteps=50,
                  model=UNetConfig(image_shape=(8, 8, 1), base_channels=8, channel_mults=(1,),
                                   num_groups=4, conv_impl="xla"),
                  train=TrainConfig(num_steps=1, batch_size=4, segment_steps=1))
  (run / "config.json").write_text(json.dumps(cfg.to_json()))
  _, init_fn = model_fns(cfg)
  state = init_state(init_fn(jax.random.key(0)), make_optimizer(cfg.train))
  checkpoint.save(run / "checkpoints", 1, state, {})
  x = np.random.default_rng(0).uniform(-1, 1, (N_SAMPLES, 8, 8, 1)).astype(np.float32)
  np.savez(run / "samples.npz", x=x, seed=0, sampler="ddpm")
  return run


def _cli(argv):
  """Runs a jattr command as the CLI parses it; returns what the command returns."""
  args = cli.build_parser().parse_args(argv)
  return args.func(args)


@pytest.fixture(scope="module")
def ekfac_dir(tiny_run, tmp_path_factory):
  out = tmp_path_factory.mktemp("curv") / "ekfac"
  with warnings.catch_warnings():
    # Every UNet kernel must get a Kronecker block: no diagonal fallback.
    warnings.filterwarnings("error", message=".*get only a diagonal K-FAC block.*")
    state = _cli(["fit-curvature", "--run", str(tiny_run), "--out", str(out), "--approx",
                  "ekfac", "--num-draws", str(K), "--batch-size", str(N_TRAIN), "--damping", "0.01",
                  "--quiet"])
  return out, state


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _params(run):
  from jattr.runs import load_run

  return load_run(run)[2]


def test_ekfac_round_trip_is_exact_and_meta_complete(tiny_run, ekfac_dir):
  out, state = ekfac_dir
  assert isinstance(state, EkfacState)
  params = _params(tiny_run)
  loaded, meta = cs.load_curvature(out, params, kind="ekfac")
  _assert_identical(loaded, state)
  assert loaded.layout == state.layout
  assert any(lay.kind == "kronecker" for lay in state.layout)
  assert meta["model_hash"] == model_hash(params)
  assert meta["damping"] == 0.01 and meta["weight_sharing"] == "expand"
  assert meta["measurement"] == "loss"
  assert meta["draws"] == {"num_draws": K, "timesteps": "uniform", "seed": 0}
  assert meta["dataset"]["num"] == N_TRAIN and meta["dataset"]["name"] == "digits"
  assert meta["num_parameters"] == sum(x.size for x in jax.tree.leaves(params))


def toy_apply(p, x, t):
  """A conv, a dense layer over pixels and a learned scalar: Kronecker and diagonal blocks."""
  tf = jnp.broadcast_to(t.astype(x.dtype)[:, None, None, None] / 50, x.shape)
  h = jax.lax.conv_general_dilated(jnp.concatenate([x, tf], -1), p["conv"]["w"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["b"]
  return p["scale"] * (jnp.tanh(h) @ p["dense"]["w"] + p["dense"]["b"])


def toy_params(key):
  k = jax.random.split(key, 2)
  return {"conv": {"w": 0.5 * jax.random.normal(k[0], (3, 3, 2, 4)), "b": jnp.zeros(4)},
          "dense": {"w": 0.5 * jax.random.normal(k[1], (4, 1)), "b": jnp.zeros(1)},
          "scale": jnp.ones(())}


def test_kfac_diagonal_dense_round_trips_are_exact(tmp_path):
  from jattr.curvature import dense_ggn, dense_state, fit_diagonal, fit_kfac, kfac_inverse_vp
  from jattr.diffusion import fixed_draws, schedules

  params = toy_params(jax.random.key(0))
  meta = {"model_hash": model_hash(params), "note": "test"}
  x0 = jax.random.uniform(jax.random.key(1), (3, 4, 4, 1), minval=-1, maxval=1)
  draws = fixed_draws(jax.random.key(2), 2, (4, 4, 1), 50)
  schedule = schedules.linear(50)
  kf = fit_kfac(toy_apply, params, schedule, x0, draws, weight_sharing="reduce")
  assert {lay.kind for lay in kf.layout} == {"kronecker", "diagonal"}
  cs.save_curvature(tmp_path / "kfac", kf, meta)
  loaded, got = cs.load_curvature(tmp_path / "kfac", params)
  assert isinstance(loaded, KfacState) and got["kind"] == "kfac" and got["note"] == "test"
  _assert_identical(loaded, kf)
  assert loaded.layout == kf.layout
  v = jax.tree.map(jnp.ones_like, params)
  _assert_identical(kfac_inverse_vp(loaded, v), kfac_inverse_vp(kf, v))

  dg = fit_diagonal(toy_apply, params, schedule, x0, draws)
  cs.save_curvature(tmp_path / "diag", dg, meta)
  loaded, _ = cs.load_curvature(tmp_path / "diag", params)
  assert isinstance(loaded, DiagonalState)
  _assert_identical(loaded, dg)

  # The driver's dense G, summed over batches of 2, is dense_ggn over all examples.
  dense = runs.dense_ggn_batched(toy_apply, params, schedule, x0, draws, batch_size=2)
  np.testing.assert_allclose(dense, dense_ggn(toy_apply, params, schedule, x0, draws),
                             rtol=1e-5, atol=1e-7)
  # Stored eigendecomposed (once, float64): what every influence query then uses.
  state = dense_state(dense)
  np.testing.assert_allclose((state.eigvecs * state.eigvals) @ state.eigvecs.T, dense,
                             atol=1e-6 * float(np.abs(dense).max()))
  with pytest.raises(TypeError, match="DenseState"):
    cs.save_curvature(tmp_path / "raw", dense, meta)  # a raw matrix is not a stored kind
  cs.save_curvature(tmp_path / "dense", state, meta)
  loaded, got = cs.load_curvature(tmp_path / "dense", model_hash=meta["model_hash"])
  p = sum(x.size for x in jax.tree.leaves(params))
  assert got["kind"] == "dense" and got["num_parameters"] == p
  _assert_identical(loaded, state)

  with pytest.raises(FileExistsError, match="already holds a curvature"):
    cs.save_curvature(tmp_path / "dense", state, meta)
  doubled = dense_state(2 * dense)
  cs.save_curvature(tmp_path / "dense", doubled, meta, overwrite=True)
  _assert_identical(cs.load_curvature(tmp_path / "dense", params)[0], doubled)


def test_refuses_another_model_and_bad_input(tiny_run, ekfac_dir, tmp_path):
  out, _ = ekfac_dir
  params = _params(tiny_run)
  leaves, treedef = jax.tree.flatten(params)
  other = jax.tree.unflatten(treedef, [leaves[0] + 1e-3] + leaves[1:])
  with pytest.raises(ValueError, match="fitted to a different model"):
    cs.load_curvature(out, other)
  with pytest.raises(ValueError, match="needs params or model_hash"):
    cs.load_curvature(out)
  with pytest.raises(ValueError, match="'ekfac' curvature, expected 'kfac'"):
    cs.load_curvature(out, params, kind="kfac")
  with pytest.raises(ValueError, match=r"meta\['model_hash'\] must be"):
    cs.save_curvature(tmp_path / "x", dense_state(np.eye(2)), {"model_hash": "abc"})
  with pytest.raises(FileNotFoundError, match="no curvature in"):
    cs.load_curvature(tmp_path / "nothing", params)


def test_cli_influence_writes_scores(tiny_run, ekfac_dir, tmp_path):
  from jattr.diffusion import fixed_draws
  from jattr.methods.influence import influence
  from jattr.runs import load_run, training_data

  out, state = ekfac_dir
  scores = tmp_path / "s.npz"
  tau = _cli(["influence", "--run", str(tiny_run), "--curvature", str(out), "--measurement",
              "square_norm", "--queries", "samples", "--tile-size", "4", "--out", str(scores),
              "--quiet"])
  assert tau.shape == (N_SAMPLES, N_TRAIN) and np.all(np.isfinite(tau))
  with np.load(scores) as z:
    np.testing.assert_array_equal(z["tau"], tau)
    assert float(z["damping"]) == 0.01 and str(z["curvature_kind"]) == "ekfac"
    assert json.loads(str(z["queries"]))["num"] == N_SAMPLES
    assert z["train_indices"].shape == (N_TRAIN,)
  # The same scores as the library's influence() with the fitted state (tiles of 4
  # over N = 6 exercise the shifted last tile).
  cfg, apply_fn, params = load_run(tiny_run)
  draws = fixed_draws(jax.random.key(0), K, (8, 8, 1), 50)
  with np.load(tiny_run / "samples.npz") as z:
    samples = z["x"]
  ref = influence(apply_fn, params, cfg.noise_schedule, draws, training_data(cfg)[0].x,
                  samples, state, measurement="square_norm", damping=0.01)
  np.testing.assert_allclose(tau, ref, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(ref))))


def test_cli_refusals(tiny_run, ekfac_dir, tmp_path):
  out, _ = ekfac_dir
  with pytest.raises(ValueError, match=r"--approx dense .* P = [\d,]+ parameters, above the "
                                       r"limit of 5,000"):
    _cli(["fit-curvature", "--run", str(tiny_run), "--out", str(tmp_path / "d"), "--approx",
          "dense", "--max-dense-params", "5000", "--quiet"])
  with pytest.raises(ValueError, match="already holds a curvature"):
    _cli(["fit-curvature", "--run", str(tiny_run), "--out", str(out), "--quiet"])


def test_influence_refuses_a_curvature_of_other_training_images(tiny_run, ekfac_dir,
                                                               monkeypatch):
  from jattr.runs import curvature as workflow

  out, _ = ekfac_dir
  assert cs.read_curvature_meta(out)["dataset"]["images_sha256"]
  real = workflow.training_data

  def changed(cfg):  # the same indices, other pixels: the data at data_dir changed
    ds, idx = real(cfg)
    return ds._replace(x=ds.x[::-1]), idx

  monkeypatch.setattr(workflow, "training_data", changed)
  with pytest.raises(ValueError, match="fitted on other training images"):
    runs.influence_run(tiny_run, out)


def test_sketch_and_low_rank_round_trips_are_exact(tmp_path):
  from jattr.curvature import (LowRankState, SketchState, fit_low_rank_ggn, fit_sketched_ggn,
                               inverse_vp_fn)
  from jattr.diffusion import fixed_draws, schedules
  from jattr.features.projection import ProjectionConfig

  params = toy_params(jax.random.key(0))
  meta = {"model_hash": model_hash(params)}
  x0 = jax.random.uniform(jax.random.key(1), (3, 4, 4, 1), minval=-1, maxval=1)
  draws = fixed_draws(jax.random.key(2), 2, (4, 4, 1), 50)
  schedule = schedules.linear(50)
  v = jax.tree.map(jnp.ones_like, params)
  sk = fit_sketched_ggn(toy_apply, params, schedule, x0, draws,
                        ProjectionConfig(dim=8, kind="sparse", seed=3, nonzeros=4),
                        num_samples=2, key=jax.random.key(0))
  lr = fit_low_rank_ggn(toy_apply, params, schedule, x0, draws, 4, key=jax.random.key(0))
  for name, state, cls in (("sketch", sk, SketchState), ("low_rank", lr, LowRankState)):
    cs.save_curvature(tmp_path / name, state, meta)
    loaded, got = cs.load_curvature(tmp_path / name, params, kind=name)
    assert isinstance(loaded, cls) and got["kind"] == name
    _assert_identical(loaded, state)
    assert jax.tree.structure(loaded) == jax.tree.structure(state)  # projection too
    _assert_identical(inverse_vp_fn(loaded)(v), inverse_vp_fn(state)(v))


@pytest.mark.parametrize("approx, extra", [("sketch", ["--sketch-dim", "64", "--num-samples", "2"]),
                                           ("low_rank", ["--rank", "8"])])
def test_cli_fits_and_scores_the_scalable_curvatures(tiny_run, tmp_path, approx, extra):
  out = tmp_path / approx
  state = _cli(["fit-curvature", "--run", str(tiny_run), "--out", str(out), "--approx", approx,
                "--num-draws", str(K), *extra, "--quiet"])
  meta = cs.read_curvature_meta(out)
  assert meta["kind"] == approx
  tau = _cli(["influence", "--run", str(tiny_run), "--curvature", str(out), "--queries",
              "samples", "--out", str(tmp_path / "s.npz"), "--quiet"])
  assert tau.shape == (N_SAMPLES, N_TRAIN) and np.all(np.isfinite(tau))
  if approx == "sketch":
    assert state.dim == 64 and meta["estimation"]["num_samples"] == 2
