"""The encoded ensemble beside an LDS cache: design, resumable cached training,
member measurements, and the harness method."""

import dataclasses

import jax
import numpy as np
import pytest

from jattr.bench import ensemble_cache, ensemble_method, lds_cache
from jattr.io import checkpoint
from jattr.methods import ensembles
from toy_models import TINY_LDS_SPEC, tiny_apply, tiny_init


SPEC = dataclasses.replace(TINY_LDS_SPEC, num_subsets=2, num_seeds=1)
ENS = ensemble_cache.EnsembleSpec(num_members=10, design="binary_code", seed=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  root = tmp_path_factory.mktemp("lds")
  return lds_cache.build(SPEC, root, model=(tiny_init, tiny_apply), progress=False)


@pytest.fixture(scope="module")
def built(cache):
  return ensemble_cache.build(cache, ENS, progress=False)


def test_build_layout_design_and_members(cache, built):
  d = built.directory
  assert d.parent == cache.directory / "ensembles"
  for name in ("spec.json", "design.npz", "timing.json"):
    assert (d / name).exists(), name
  assert checkpoint.latest_step(d / "members") == 4
  assert built.masks.shape == (10, 16)
  np.testing.assert_array_equal(built.masks.sum(axis=0), 5)  # each example out of M/2
  np.testing.assert_array_equal(built.masks, ensembles.design_splits(16, 10, "binary_code"))
  assert jax.tree.leaves(built.params)[0].shape[0] == 10
  # Members differ by their data only: equal seeds, different subsets, different models.
  assert not np.allclose(built.params["conv1"][0], built.params["conv1"][5])
  assert built.timing["train_members"]["wall_s"] > 0


def test_reload_trains_nothing_and_other_specs_get_other_directories(cache, built, monkeypatch):
  def forbidden(*a, **k):
    raise AssertionError("a finished ensemble was trained again")

  monkeypatch.setattr(checkpoint, "save", forbidden)
  again = ensemble_cache.build(cache, ENS, progress=False)
  jax.tree.map(np.testing.assert_array_equal, again.params, built.params)
  other = ensemble_cache.EnsembleSpec(num_members=10, design="binary_code", seed=3)
  assert ensemble_cache.ensemble_dir(cache, other) != built.directory
  (built.directory / "spec.json").write_text('{"digest": "x"}')
  with pytest.raises(ValueError, match="holds a different spec"):
    ensemble_cache.build(cache, ENS, progress=False)
  (built.directory / "spec.json").unlink()  # restored by the next build


def test_class_design_puts_whole_classes_in_or_out(cache):
  spec = ensemble_cache.EnsembleSpec(num_members=8, design="binary_code", group_by="class")
  labels = ensemble_cache.train_labels(cache)
  masks = ensemble_cache.build(cache, spec, progress=False).masks
  for c in np.unique(labels):
    cols = masks[:, labels == c]
    assert np.all(cols == cols[:, :1])
  keep = ensembles.forget(masks, labels == labels[0])
  assert not masks[keep][:, labels == labels[0]].any()


def test_measurements_are_cached_and_scores_are_the_contrast(cache, built, monkeypatch):
  y = ensemble_cache.measure_splits(built, cache, num_draws=3, draw_seed=1)
  assert {s: v.shape for s, v in y.items()} == {"validation": (3, 10), "test": (3, 10),
                                                "generated": (2, 10)}
  monkeypatch.setattr(ensemble_cache, "member_measure_fn",
                      lambda *a, **k: pytest.fail("measured twice"))
  again = ensemble_cache.measure_splits(built, cache, num_draws=3, draw_seed=1)
  np.testing.assert_array_equal(again["test"], y["test"])
  score_fn, grid = ensemble_method.ensemble_method(cache, num_members=10, num_draws=3)
  assert grid == [{}]
  tau = score_fn({}, cache.splits["test"].queries)
  np.testing.assert_allclose(tau, ensembles.ensemble_scores(y["test"], built.masks), rtol=1e-6)
