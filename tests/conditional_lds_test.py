"""The class-conditional LDS benchmark: labelled training pairs, labelled queries,
guided generated splits, and methods that attribute under each query's label."""

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr.bench import curvature_methods as cm
from jattr.bench import gradient_methods as gm
from jattr.bench import lds_cache
from jattr.eval.measure import measure_loss
from jattr.methods.influence import influence
from toy_models import TINY_LDS_SPEC, tiny_apply, tiny_cond_apply, tiny_cond_init, tiny_init

SPEC = dataclasses.replace(
    TINY_LDS_SPEC, conditional=True, guidance_scales=(1.0, 3.0),
    model={"name": "tiny_conv_cond", "num_classes": 10},
    train={**TINY_LDS_SPEC.train, "cond_dropout": 0.25})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("lds_cond")
  return lds_cache.build(SPEC, root, model=(tiny_cond_init_10, tiny_cond_apply), progress=False)


def tiny_cond_init_10(key):
  return tiny_cond_init(key, num_classes=10)  # digits: labels 0..9, null class 10


def test_conditional_cache_carries_labels_and_guided_splits(built):
  cache = built
  ds = lds_cache.load_data(SPEC)
  split = dict(np.load(cache.directory / "split.npz"))
  np.testing.assert_array_equal(cache.train_cond, ds.y[split["train"]])
  assert isinstance(cache.train_examples, tuple)
  for name in ("validation", "test"):
    np.testing.assert_array_equal(cache.splits[name].queries.cond, ds.y[split[name]])
  assert set(cache.splits) == {"validation", "test", "generated", "generated_g3"}
  gen, gen3 = cache.splits["generated"].queries, cache.splits["generated_g3"].queries
  np.testing.assert_array_equal(gen.cond, lds_cache.generated_labels(SPEC, cache.train_cond))
  np.testing.assert_array_equal(gen.cond, gen3.cond)
  assert not np.allclose(gen.images, gen3.images)  # guidance changed the samples
  for qs in cache.splits.values():
    assert qs.y.shape[1:] == (4, 2) and np.all(np.isfinite(qs.y))
  # Each query is measured under its own label.
  draws = cache.draws
  y0 = measure_loss(cache.apply_fn, cache.full_params, cache.schedule,
                    (jnp.asarray(gen.images), jnp.asarray(gen.cond)), draws)
  other = measure_loss(cache.apply_fn, cache.full_params, cache.schedule,
                       (jnp.asarray(gen.images), jnp.asarray((gen.cond + 1) % 10)), draws)
  assert not np.allclose(y0, other)
  # Sample j regenerates from its key and label alone.
  keys = jax.random.wrap_key_data(jnp.asarray(gen.sample_keys))
  again = lds_cache.generate(cache.apply_fn, cache.full_params, SPEC, keys, (8, 8, 1),
                             gen.cond, 3.0)
  np.testing.assert_allclose(again, gen3.images, atol=1e-6)


def test_an_unconditional_spec_keeps_its_digest():
  # The new fields are left out of an unconditional spec's record, so existing caches
  # keep their names.
  d = TINY_LDS_SPEC.to_dict()
  assert "conditional" not in d and "guidance_scales" not in d
  assert "conditional" in SPEC.to_dict() and SPEC.digest() != TINY_LDS_SPEC.digest()
  with pytest.raises(ValueError, match="guidance_scales"):
    dataclasses.replace(TINY_LDS_SPEC, guidance_scales=(1.0, 3.0))
  with pytest.raises(ValueError, match="num_classes"):
    dataclasses.replace(SPEC, model={"name": "tiny_conv_cond"})


def test_conditional_methods_equal_the_library_calls(built):
  cache = built
  queries = cache.splits["generated_g3"].queries
  train = (jnp.asarray(cache.train_images), jnp.asarray(cache.train_cond))
  score_fn, _ = cm.influence_method(cache, approx="diagonal", num_draws=3, batch_size=8,
                                    grid=(0.1,))
  state, draws, _ = cm._fit_once(cache, approx="diagonal", weight_sharing="expand",
                                 num_draws=3, draw_seed=1, batch_size=8,
                                 estimation_mode="ggn_curvature_prop")
  want = influence(cache.apply_fn, cache.full_params, cache.schedule, draws, train,
                   (jnp.asarray(queries.images), jnp.asarray(queries.cond)), state,
                   damping_factor=0.1)
  got = score_fn({"damping_factor": 0.1}, queries)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  # Attributing under another label gives other scores: the label reaches the method.
  relabelled = queries._replace(cond=(queries.cond + 1) % 10)
  assert not np.allclose(score_fn({"damping_factor": 0.1}, relabelled), got, rtol=1e-3)
  trak_fn, grid = gm.trak_method(cache, num_draws=3, dim=64)
  tau = trak_fn(grid[3], queries)
  assert tau.shape == (2, 16) and np.all(np.isfinite(tau))


def test_an_unconditional_model_refuses_labels(tmp_path):
  # A conditional spec with a three-argument model is an error on the first call,
  # not a silent unconditional benchmark.
  with pytest.raises(TypeError):
    lds_cache.build(SPEC, tmp_path, model=(tiny_init, tiny_apply), progress=False)


def test_conditional_counterfactual_regenerates_under_each_label(built, tmp_path,
                                                               monkeypatch):
  from jattr.bench import drivers
  config = {"spec": SPEC.to_dict(), "cache_root": str(built.directory.parent),
            "methods": ["pixel_cosine"]}
  monkeypatch.setattr(drivers, "build_cache", lambda config, progress=None: built)
  record = drivers.run_counterfactual(config, method="pixel_cosine", num_queries=2, ks=(2,),
                                      results_path=str(tmp_path / "cf.json"), out=io.StringIO())
  (row,) = record["summary"]
  assert row["k"] == 2 and np.isfinite(row["l2_attributed"]) and np.isfinite(row["l2_random"])
