"""MUCS and the unlearning baseline on a tiny MLP denoiser (4×4×1 images)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr import diffusion
from jattr.diffusion.measurements import measurement_fn
from jattr.methods import mucs
from jattr.train import TrainConfig, member_keys, train

SCHED = diffusion.linear(50)
SHAPE = (4, 4, 1)


def mlp_init(key, hidden=64):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"fc1": {"kernel": jax.random.normal(k1, (16, hidden)) / 4.0,
                  "bias": jnp.zeros(hidden)},
          "temb": jax.random.normal(k2, (hidden,)) * 0.5,
          "fc2": {"kernel": jax.random.normal(k3, (hidden, 16)) * 0.1 / np.sqrt(hidden),
                  "bias": jnp.zeros(16)}}


def mlp_apply(params, x, t):
  h = (x.reshape(x.shape[0], -1) @ params["fc1"]["kernel"] + params["fc1"]["bias"]
       + (t[:, None] / 50.0) * params["temb"])
  out = jax.nn.gelu(h) @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  return out.reshape(x.shape)


@pytest.fixture(scope="module")
def problem():
  """A trained tiny model, its data, queries (= training images 0..2), draws, L_null."""
  data = jax.random.uniform(jax.random.key(3), (16, *SHAPE), minval=-1, maxval=1)
  init_key, train_key = member_keys(0)
  cfg = TrainConfig(num_steps=200, batch_size=16, learning_rate=1e-2, warmup_steps=5,
                    segment_steps=200)
  state, _ = train(mlp_apply, mlp_init(init_key), SCHED, data, cfg, train_key, progress=False)
  queries = data[:3]
  draws = diffusion.fixed_draws(jax.random.key(7), 8, SHAPE, SCHED.num_timesteps)
  null = mucs.null_loss(mlp_apply, mlp_init, jax.random.split(jax.random.key(11), 4), SCHED,
                        queries, draws)
  return state.params, data, queries, draws, null


@pytest.fixture(scope="module")
def bounded(problem):
  params, data, queries, draws, null = problem
  cfg = mucs.mucs_config(num_steps=40, learning_rate=0.01, retain_batch_size=8)
  return cfg, mucs.unlearn(mlp_apply, params, SCHED, data, queries, null, jax.random.key(1),
                           draws, cfg, query_chunk_size=2)


def test_skew_is_zero_for_equal_losses_and_antisymmetric():
  a = jax.random.uniform(jax.random.key(0), (3, 5, 4), minval=0.01, maxval=2.0)
  b = jax.random.uniform(jax.random.key(1), (5, 4), minval=0.01, maxval=2.0)
  np.testing.assert_array_equal(mucs.skew_scores(a[1:2], a[1]), 0.0)
  np.testing.assert_allclose(mucs.skew(a, b), -mucs.skew(b, a), rtol=1e-6)
  np.testing.assert_allclose(mucs.skew_scores(a, b), -mucs.skew_scores(b[None], a), rtol=1e-6)
  assert np.all(np.abs(mucs.skew_scores(a, b)) < 1)


def test_identical_models_score_zero(problem):
  params, data, queries, draws, null = problem
  cfg = mucs.mucs_config(num_steps=3, learning_rate=0.0, retain_batch_size=4)
  res = mucs.mucs_scores(mlp_apply, params, SCHED, data, queries, null, jax.random.key(5), draws,
                         cfg)
  assert res.scores.shape == (3, 16)
  np.testing.assert_allclose(res.scores, 0.0, atol=1e-6)


def test_independent_noise_adds_noise_to_the_skew(problem):
  params, data, _, draws, _ = problem
  other = diffusion.fixed_draws(jax.random.key(8), 8, SHAPE, SCHED.num_timesteps)
  lo = mucs.per_draw_losses(mlp_apply, params, SCHED, data, draws)
  lo2 = mucs.per_draw_losses(mlp_apply, params, SCHED, data, other, chunk_size=5)
  assert lo.shape == (16, 8)
  np.testing.assert_array_equal(mucs.skew_scores(lo, lo), 0.0)
  assert np.mean(np.abs(mucs.skew_scores(lo2, lo))) > 0.05


def test_bound_keeps_forget_loss_below_null(problem, bounded):
  params, data, queries, draws, null = problem
  cfg, res = bounded
  f = measurement_fn("loss", mlp_apply, SCHED, draws)
  final = jax.vmap(f)(res.params, queries)
  np.testing.assert_allclose(final, res.forget_loss[:, 1], rtol=1e-5)
  assert np.all(res.forget_loss[:, 0] < 0.5 * null)  # there was something to unlearn
  assert np.all(final <= null)
  assert np.all(final >= cfg.stop_ratio * null) and np.all(res.steps < cfg.num_steps)
  free = mucs.unlearn(mlp_apply, params, SCHED, data, queries, null, jax.random.key(1), draws,
                      dataclasses.replace(cfg, bounded=False))
  assert np.all(free.forget_loss[:, 1] > null)  # without the bound it overshoots
  assert np.all(free.steps == cfg.num_steps) and np.all(free.rejected == 0)


def test_vmapped_queries_equal_one_at_a_time(problem, bounded):
  params, data, queries, draws, null = problem
  cfg, res = bounded
  assert len(set(np.asarray(res.steps).tolist())) > 1  # queries stop at different steps
  kernel = jax.jit(mucs.make_unlearn_fn(mlp_apply, SCHED, draws, cfg))
  for q in range(queries.shape[0]):
    p, (l_f, _, steps, _) = kernel(params, None, data, queries[q], null[q], jax.random.key(1))
    assert int(steps) == int(res.steps[q])
    np.testing.assert_allclose(l_f, res.forget_loss[q], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[q], rtol=1e-4, atol=1e-6),
                 p, res.params)


def test_duplicate_of_query_ranks_first(problem):
  params, data, queries, draws, null = problem
  cfg = mucs.mucs_config(num_steps=40, learning_rate=0.01, retain_batch_size=8)
  res = mucs.mucs_scores(mlp_apply, params, SCHED, data, queries, null, jax.random.key(1), draws,
                         cfg, query_chunk_size=2, train_chunk_size=5)
  np.testing.assert_array_equal(np.argmax(res.scores, axis=1), [0, 1, 2])
  assert np.all(res.unlearn.forget_loss[:, 1] <= null)


def test_mask_freezes_parameters(problem):
  params, data, queries, draws, null = problem
  mask = mucs.trainable_mask(params, "fc2")
  assert mask == {"fc1": {"kernel": False, "bias": False}, "temb": False,
                  "fc2": {"kernel": True, "bias": True}}
  assert mucs.trainable_mask(params, lambda path: path.endswith("kernel"))["fc1"]["kernel"]
  res = mucs.unlearn(mlp_apply, params, SCHED, data, queries[:1], null[:1], jax.random.key(0),
                     draws, mucs.mucs_config(num_steps=5, learning_rate=0.01,
                                             retain_batch_size=4), mask=mask)
  for name in ("fc1", "temb"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b), res.params[name],
                 params[name])
  assert not np.allclose(res.params["fc2"]["kernel"][0], params["fc2"]["kernel"])
  with pytest.raises(ValueError, match="matches no parameter"):
    mucs.trainable_mask(params, "nothing_here")


def test_baseline_ascends_with_ewc(problem):
  params, data, queries, draws, null = problem
  cfg = mucs.unlearning_baseline_config(num_steps=10, learning_rate=0.005, ewc_weight=10.0)
  with pytest.raises(ValueError, match="needs fisher"):
    mucs.unlearn(mlp_apply, params, SCHED, data, queries, null, jax.random.key(0), draws, cfg)
  fisher = mucs.ewc_fisher(mlp_apply, params, SCHED, data, draws)
  assert jax.tree.structure(fisher) == jax.tree.structure(params)
  assert all(np.all(np.asarray(f) >= 0) for f in jax.tree.leaves(fisher))
  res = mucs.mucs_scores(mlp_apply, params, SCHED, data, queries, null, jax.random.key(0), draws,
                         cfg, fisher=fisher)
  u = res.unlearn
  assert np.all(u.forget_loss[:, 1] > u.forget_loss[:, 0])
  assert np.all(u.retain_loss == 0) and np.all(u.steps == 10)
  np.testing.assert_array_equal(np.argmax(res.scores, axis=1), [0, 1, 2])


def test_errors_name_the_argument(problem):
  params, data, queries, draws, null = problem
  cfg = mucs.mucs_config(num_steps=2)
  with pytest.raises(ValueError, match="null_loss must have shape"):
    mucs.unlearn(mlp_apply, params, SCHED, data, queries, null[:2], jax.random.key(0), draws,
                 cfg)
  with pytest.raises(ValueError, match="queries must be"):
    mucs.unlearn(mlp_apply, params, SCHED, data, queries[:, :2], null, jax.random.key(0), draws,
                 cfg)
  with pytest.raises(ValueError, match="stop_ratio"):
    mucs.mucs_config(stop_ratio=1.5)


def test_mucs_scores_chunked_equal_unchunked_and_report_progress(problem):
  params, data, queries, draws, null = problem
  cfg = mucs.mucs_config(num_steps=5, learning_rate=0.01, retain_batch_size=4)
  whole = mucs.mucs_scores(mlp_apply, params, SCHED, data, queries, null, jax.random.key(1),
                           draws, cfg)
  calls = []
  chunked = mucs.mucs_scores(mlp_apply, params, SCHED, data, queries, null, jax.random.key(1),
                             draws, cfg, query_chunk_size=2, train_chunk_size=5,
                             progress=lambda *a, **k: calls.append(a))
  # Q = 3 in chunks of 2: the last chunk is shifted back (queries 1, 2), not padded
  assert calls == [("mucs", 2, 3), ("mucs", 3, 3)]
  np.testing.assert_allclose(chunked.scores, whole.scores, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(chunked.unlearn.steps, whole.unlearn.steps)


def test_returned_losses_give_the_scores(problem):
  params, data, queries, draws, null = problem
  cfg = mucs.mucs_config(num_steps=5, learning_rate=0.01, retain_batch_size=4)
  res = mucs.mucs_scores(mlp_apply, params, SCHED, data, queries, null, jax.random.key(1), draws,
                         cfg, return_losses=True)
  assert res.losses.shape == (3, 16, 8)
  lo = mucs.per_draw_losses(mlp_apply, params, SCHED, data, draws)
  np.testing.assert_allclose(mucs.skew_scores(res.losses, lo), res.scores, rtol=1e-5,
                             atol=1e-7)


def test_lds_method_shares_unlearning_between_mucs_and_independent_noise(problem, tmp_path,
                                                                         monkeypatch):
  from types import SimpleNamespace

  from jattr.bench import mucs_method
  from jattr.eval.selection import Queries

  params, data, queries, _, _ = problem
  cache = SimpleNamespace(directory=tmp_path, apply_fn=mlp_apply, full_params=params,
                          init_fn=mlp_init, schedule=SCHED, train_images=np.asarray(data),
                          train_config=TrainConfig(), memo={})
  opts = dict(num_draws=8, null_models=2, query_chunk=2, train_chunk=8)
  hp = {"learning_rate": 0.01, "num_steps": 10, "retain_batch_size": 8}
  q = Queries("validation", np.asarray(queries))
  calls = []
  real = mucs_method.mucs_attribute
  monkeypatch.setattr(mucs_method, "mucs_attribute",
                      lambda *a, **k: calls.append(k["variant"]) or real(*a, **k))
  scores = {}
  for v in ("mucs", "independent_noise"):
    score_fn, grid = mucs_method.mucs_lds_method(cache, v, grid=[hp], **opts)
    assert grid == [hp]
    scores[v] = score_fn(hp, q)
  assert calls == ["mucs"]  # the ablation reused the unlearned models
  for v in ("mucs", "independent_noise"):
    direct, _ = real(mlp_apply, params, mlp_init, SCHED, data, queries, variant=v,
                     config=mucs.variant_config(v, **hp), draw_seed=1, **opts)
    np.testing.assert_allclose(scores[v], direct, rtol=1e-4, atol=1e-6)
  assert not np.allclose(scores["mucs"], scores["independent_noise"])
  assert set(mucs_method.LDS_VARIANTS) == {"mucs", "mucs_independent_noise", "mucs_no_bound",
                                              "unlearning_baseline"}
