"""The on-disk LDS cache: layout, reuse without retraining, resume after a kill."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr.io import checkpoint
from jattr.bench import lds_cache
from jattr.diffusion import draws as draws_lib
from toy_models import TINY_LDS_SPEC as SPEC
from toy_models import tiny_apply, tiny_init


MODEL = (tiny_init, tiny_apply)


def _build(root, spec=SPEC):
  return lds_cache.build(spec, root, model=MODEL, progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("lds")
  return root, _build(root)


def test_build_layout_and_shapes(built):
  root, cache = built
  d = cache.directory
  assert d == lds_cache.cache_dir(SPEC, root) and d.name.startswith("digits-")
  for name in ("spec.json", "split.npz", "queries.npz", "timing.json", "y/replicate_0.npz",
               "y/replicate_1.npz"):
    assert (d / name).exists(), name
  assert json.loads((d / "spec.json").read_text())["digest"] == SPEC.digest()
  assert cache.masks.shape == (4, 16) and np.all(cache.masks.sum(1) == 8)
  assert cache.train_images.shape == (16, 8, 8, 1)
  for name, q in (("validation", 3), ("test", 3), ("generated", 2)):
    assert cache.splits[name].y.shape == (q, 4, 2)
    assert cache.splits[name].queries.images.shape == (q, 8, 8, 1)
  assert cache.splits["generated"].queries.sample_keys.shape[0] == 2
  assert np.all(np.isfinite(cache.splits["test"].y))
  # Seed replicates differ; subsets within a replicate differ.
  y = cache.splits["validation"].y
  assert not np.allclose(y[..., 0], y[..., 1])
  assert not np.allclose(y[:, 0, 0], y[:, 1, 0])
  # Held-out queries are not training images.
  train = {r.tobytes() for r in cache.train_images}
  assert not any(r.tobytes() in train for r in cache.splits["test"].queries.images)


def test_reuse_never_retrains_or_remeasures(built, monkeypatch):
  root, cache = built

  def forbidden(*a, **k):
    raise AssertionError("the cache was rebuilt")

  monkeypatch.setattr(lds_cache, "train_many", forbidden)
  monkeypatch.setattr(lds_cache, "member_measure_fn", lambda *a, **k: forbidden)
  monkeypatch.setattr(lds_cache, "generate", forbidden)
  again = _build(root)
  for name in cache.splits:
    np.testing.assert_array_equal(again.splits[name].y, cache.splits[name].y)
  jax.tree.map(np.testing.assert_array_equal, again.full_params, cache.full_params)


def test_killed_build_resumes_to_the_same_numbers(built, tmp_path, monkeypatch):
  _, cache = built
  # Start from the finished cache minus its subset models and measurements, so the
  # build has to retrain every replicate; then kill it after the first checkpoint.
  d = lds_cache.cache_dir(SPEC, tmp_path)
  shutil.copytree(cache.directory, d, ignore=shutil.ignore_patterns("models", "y"))
  real_save = checkpoint.save
  calls = {"n": 0}

  def save_then_die(*args, **kwargs):
    real_save(*args, **kwargs)
    calls["n"] += 1
    if calls["n"] == 1:  # the first segment (of 2) of replicate 0 is on disk
      raise KeyboardInterrupt("killed")

  monkeypatch.setattr(checkpoint, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    _build(tmp_path)
  assert checkpoint.latest_step(d / "models" / "replicate_0") == 2
  assert not (d / "y" / "replicate_0.npz").exists()
  monkeypatch.setattr(checkpoint, "save", real_save)
  resumed = _build(tmp_path)
  for name in cache.splits:
    np.testing.assert_allclose(resumed.splits[name].y, cache.splits[name].y, rtol=1e-6)


def test_spec_hash_and_validation(tmp_path):
  other = lds_cache.LdsSpec.from_dict({**SPEC.to_dict(), "num_subsets": 5})
  assert other.digest() != SPEC.digest()
  assert lds_cache.cache_dir(other, tmp_path) != lds_cache.cache_dir(SPEC, tmp_path)
  assert lds_cache.LdsSpec.from_dict(SPEC.to_dict()).digest() == SPEC.digest()
  with pytest.raises(ValueError, match="unknown LdsSpec fields"):
    lds_cache.LdsSpec.from_dict({"num_subset": 3})
  with pytest.raises(ValueError, match="alpha"):
    lds_cache.LdsSpec(alpha=1.0)
  with pytest.raises(ValueError, match="num_validation"):
    lds_cache.LdsSpec(num_validation=0)
  d = lds_cache.cache_dir(SPEC, tmp_path)
  d.mkdir(parents=True)
  (d / "spec.json").write_text(json.dumps({"digest": "something else"}))
  with pytest.raises(ValueError, match="different spec"):
    _build(tmp_path)


def test_run_lds_prints_table_and_writes_record(built, tmp_path, monkeypatch, capsys):
  from jattr.bench import drivers as cli

  _, cache = built
  monkeypatch.setattr(cli, "build_cache", lambda config, progress=True: cache)
  n = cache.masks.shape[1]
  scores_path = tmp_path / "ones.npz"
  np.savez(scores_path, **{s: np.ones((cache.splits[s].y.shape[0], n)) for s in cache.splits})
  results = tmp_path / "out" / "results.json"
  record = cli.run_lds({"spec": SPEC.to_dict(), "bootstrap": {"num_resamples": 50}},
                       methods=["random", "pixel_cosine"], scores={"ones": str(scores_path)},
                       results_path=str(results))
  out = capsys.readouterr().out
  assert "| random |" in out and "| pixel_cosine |" in out and "| ones |" in out
  assert "noise ceiling" in out
  saved = json.loads(results.read_text())
  assert [r["method"] for r in saved["reports"]] == ["random", "pixel_cosine", "ones"]
  assert set(saved["timing"]) == {"random", "pixel_cosine"}
  assert saved["timing"]["random"]["grid_size"] == 1 and "setup_s" in saved["timing"]["random"]
  assert all(r["selected_on"] == "validation" for r in saved["reports"])
  assert set(saved["reports"][0]["results"]) == {"test", "generated"}
  # Constant scores give a constant prediction: no ranking, LDS 0.
  assert saved["reports"][2]["results"]["test"]["mean"] == 0.0
  assert record["spec_digest"] == SPEC.digest()
  with pytest.raises(ValueError, match="unknown methods"):
    cli.run_lds({"spec": SPEC.to_dict()}, methods=["nope"])


def test_cli_parsers():
  from jattr import cli
  from jattr.cli import lds

  parser = cli.build_parser()
  args = parser.parse_args(["lds", "--config", "c.json", "--method", "random",
                            "--scores", "trak=t.npz"])
  assert args.func is lds.cmd_lds and args.method == ["random"]
  assert lds.parse_scores(args.scores) == {"trak": "t.npz"}
  args = parser.parse_args(["counterfactual", "--config", "c.json", "--ks", "10", "50"])
  assert args.func is lds.cmd_counterfactual and args.ks == [10, 50]
  with pytest.raises(ValueError, match="NAME=PATH"):
    lds.parse_scores(["oops"])


def test_gradient_methods_match_exact_gradients(built, x64):
  """The harness's grad-dot / TRAK features are projections of the exact per-example
  gradients of the full-data model (JL-accurate at k ≫ P), on the cache's draws."""
  from jax.flatten_util import ravel_pytree

  from jattr.diffusion import draws as draws_lib
  from jattr.diffusion.measurements import measurement_fn
  from jattr.bench import gradient_methods as gm
  from jattr.grads.per_example import per_example_flat_grads

  _, cache = built
  queries = cache.splits["test"].queries
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), cache.full_params)
  cache64 = dataclasses.replace(cache, full_params=params,
                                train_images=np.asarray(cache.train_images, np.float64))
  opts = dict(num_draws=3, dim=8192, kind="gaussian", draw_seed=1)
  score_fn, grid = gm.grad_similarity_method(cache64, similarity="dot", **opts)
  assert grid == [{}]
  got = score_fn({}, queries)
  draws = draws_lib.fixed_draws(jax.random.key(1), 3, (8, 8, 1), 50)
  fn = measurement_fn("loss", cache.apply_fn, cache.schedule, draws)
  g = per_example_flat_grads(fn, params, jnp.asarray(cache64.train_images))
  gq = per_example_flat_grads(fn, params, jnp.asarray(queries.images, jnp.float64))
  exact = np.asarray(gq @ g.T)
  scale = np.linalg.norm(gq, axis=1)[:, None] * np.linalg.norm(g, axis=1)[None, :]
  # JL: each projected inner product errs by ~ ‖g_q‖‖g_i‖ / √k ≈ 0.011 of the scale.
  assert np.max(np.abs(got - exact) / scale) < 0.06
  assert ravel_pytree(params)[0].size < 200  # k ≫ P
  # TRAK over the λ grid: finite, and the largest damping tends to grad-dot / λ.
  trak_fn, trak_grid = gm.trak_method(cache64, **opts)
  assert [h["relative_damping"] for h in trak_grid] == list(gm.RELATIVE_DAMPING_GRID)
  for h in trak_grid:
    assert np.all(np.isfinite(trak_fn(h, queries)))


def test_influence_methods_match_the_library_call(built):
  """The harness's cached-gradient influence equals ``methods.influence.influence``."""
  from jattr.curvature import dense
  from jattr.bench import curvature_methods as cm
  from jattr.methods.influence import influence

  _, cache = built
  queries = cache.splits["validation"].queries
  train = jnp.asarray(cache.train_images)
  score_fn, grid = cm.influence_method(cache, approx="diagonal", num_draws=3, batch_size=8,
                                       grid=(0.01, 1.0))
  assert grid == [{"damping_factor": 0.01}, {"damping_factor": 1.0}]
  state, draws, seconds = cm._fit_once(cache, approx="diagonal", weight_sharing="expand",
                                       num_draws=3, draw_seed=1, batch_size=8,
                                       estimation_mode="ggn_curvature_prop")
  assert seconds > 0
  for h in grid:
    want = influence(cache.apply_fn, cache.full_params, cache.schedule, draws, train,
                     jnp.asarray(queries.images), state, damping_factor=h["damping_factor"])
    np.testing.assert_allclose(score_fn(h, queries), want, rtol=2e-4, atol=1e-6)
  # The dense GGN, eigendecomposed once, against the library's dense solve.
  dense_fn, _ = cm.influence_method(cache, approx="dense", num_draws=3, batch_size=5,
                                    grid=(0.01, 1.0))
  g = dense.dense_ggn(cache.apply_fn, cache.full_params, cache.schedule, train, draws)
  for h in grid:
    want = influence(cache.apply_fn, cache.full_params, cache.schedule, draws, train,
                     jnp.asarray(queries.images), g, damping_factor=h["damping_factor"])
    np.testing.assert_allclose(dense_fn(h, queries), want, rtol=2e-3, atol=1e-5)
  # Its block-diagonal part: the GGN within each layer (leaves sharing a parent;
  # the toy model's leaves are all one layer, so only the plumbing is checked here).
  nested = {"a": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}, "b": {"w": jnp.zeros(2)}}
  np.testing.assert_array_equal(cm.layer_ids(nested), [0] * 9 + [1] * 2)  # leaf order: a, b
  block_fn, _ = cm.influence_method(cache, approx="dense_blockdiag", num_draws=3, batch_size=5,
                                    grid=(0.01,))
  layer = cm.layer_ids(cache.full_params)
  g_block = jnp.where(layer[:, None] == layer[None, :], g, 0.0)
  want = influence(cache.apply_fn, cache.full_params, cache.schedule, draws, train,
                   jnp.asarray(queries.images), g_block, damping_factor=0.01)
  np.testing.assert_allclose(block_fn({"damping_factor": 0.01}, queries), want, rtol=2e-3,
                             atol=1e-5)
  with pytest.MonkeyPatch.context() as mp, pytest.raises(ValueError,
                                                        match="above the limit of 10 "):
    mp.setattr(cm, "MAX_DENSE_PARAMS", 10)  # refused before any fitting
    cm.fit_curvature(cache, approx="dense", num_draws=3)
  dot_fn, dot_grid = cm.influence_method(cache, approx="identity", num_draws=3, tune=False)
  assert dot_grid == [{}]
  want = influence(cache.apply_fn, cache.full_params, cache.schedule, draws, train,
                   jnp.asarray(queries.images), None)
  np.testing.assert_allclose(dot_fn({}, queries), want, rtol=2e-4, atol=1e-6)


def test_a_cache_refuses_other_training_images_and_writes_nothing(built, tmp_path,
                                                                  monkeypatch):
  _, cache = built
  d = lds_cache.cache_dir(SPEC, tmp_path)
  shutil.copytree(cache.directory, d)
  assert json.loads((d / "data.json").read_text())["num_train"] == 16
  before = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}
  real = lds_cache.load_data

  def permuted(spec, data_dir=None):  # the same images in another order: another dataset
    ds = real(spec, data_dir)
    order = np.random.default_rng(0).permutation(len(ds))
    return ds._replace(x=ds.x[order], y=ds.y[order])

  monkeypatch.setattr(lds_cache, "load_data", permuted)
  with pytest.raises(ValueError, match="built from other training images"):
    _build(tmp_path)
  assert {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()} == before


def test_a_failing_dataset_leaves_no_stray_cache_directory(tmp_path):
  spec = lds_cache.LdsSpec.from_dict({**SPEC.to_dict(), "dataset": "fashion_mnist"})
  with pytest.raises(FileNotFoundError):
    lds_cache.build(spec, tmp_path / "root", data_dir=tmp_path / "nothing", model=MODEL)
  assert not (tmp_path / "root").exists()


def test_results_accumulate_by_method_and_refuse_another_benchmark(built, tmp_path,
                                                                   monkeypatch):
  from jattr.bench import drivers

  _, cache = built
  monkeypatch.setattr(drivers, "build_cache", lambda config, progress=None: cache)
  config = {"spec": SPEC.to_dict(), "bootstrap": {"num_resamples": 20}}
  results = tmp_path / "r.json"
  drivers.run_lds(config, methods=["random"], results_path=str(results))
  first = json.loads(results.read_text())
  record = drivers.run_lds(config, methods=["pixel_cosine"], results_path=str(results))
  saved = json.loads(results.read_text())
  assert [r["method"] for r in saved["reports"]] == ["random", "pixel_cosine"]
  assert saved["reports"][0] == first["reports"][0]  # the earlier run's row is kept as it was
  assert "| random |" in saved["table"] and "| pixel_cosine |" in saved["table"]
  assert set(saved["timing"]) == {"random", "pixel_cosine"} and record == saved
  drivers.run_lds(config, methods=["random"], results_path=str(results))  # replaces its row
  assert [r["method"] for r in json.loads(results.read_text())["reports"]] == [
      "random", "pixel_cosine"]
  other = {**saved, "spec_digest": "0" * 64}
  results.write_text(json.dumps(other))
  with pytest.raises(ValueError, match="results of another benchmark"):
    drivers.run_lds(config, methods=["random"], results_path=str(results))
  assert json.loads(results.read_text()) == other


def test_sketch_method_matches_the_library_call(built):
  """The harness's sketched-GGN scores equal ``influence`` with the fitted SketchState."""
  from jattr.bench import curvature_methods as cm
  from jattr.curvature import fit_sketched_ggn
  from jattr.features.projection import ProjectionConfig
  from jattr.methods.influence import influence

  _, cache = built
  queries = cache.splits["validation"].queries
  train = jnp.asarray(cache.train_images)
  score_fn, grid = cm.sketch_method(cache, dim=16, num_samples=2, num_draws=3,
                                    grid=(0.01, 1.0), batch_size=8)
  assert grid == [{"damping_factor": 0.01}, {"damping_factor": 1.0}]
  assert score_fn.timing["fit_s"] > 0 and score_fn.timing["featurize_train_s"] > 0
  draws = draws_lib.fixed_draws(jax.random.key(1), 3, (8, 8, 1), 50)
  state = fit_sketched_ggn(cache.apply_fn, cache.full_params, cache.schedule, train, draws,
                           ProjectionConfig(dim=16, kind="sparse", nonzeros=4),
                           num_samples=2, key=jax.random.key(2), batch_size=8)
  for h in grid:
    want = influence(cache.apply_fn, cache.full_params, cache.schedule, draws, train,
                     jnp.asarray(queries.images), state, damping_factor=h["damping_factor"])
    np.testing.assert_allclose(score_fn(h, queries), want, rtol=2e-3, atol=1e-6)
