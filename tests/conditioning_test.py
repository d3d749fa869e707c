"""Conditional models through the core: losses, measurements, per-example gradients,
every curvature, influence, TRAK and Journey-TRAK (float64).

Two checks carry most of the weight: an unconditional model gives the same numbers
whether its examples carry no condition or a condition the model ignores (so the
condition is threaded through without changing anything else), and a model that
does use its condition gives the gradients of the hand-written conditional loss
(so the condition reaches the model with the right example)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr.curvature import dense, diagonal, ekfac, ggn, kfac
from jattr.diffusion import conditioning, losses, samplers, schedules
from jattr.diffusion import draws as draws_lib
from jattr.diffusion.measurements import measurement_fn, trajectory_step_measurement
from jattr.features import ProjectionConfig, featurize
from jattr.grads.per_example import per_example_grads
from jattr.methods import influence as inf
from jattr.methods import trak

T = 50
SHAPE = (4, 4, 1)
NUM_CLASSES = 3


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def init(key, hidden=3):
  k = jax.random.split(key, 4)
  return {"c1": 0.5 * jax.random.normal(k[0], (3, 3, 1, hidden)),
          "temb": 0.1 * jax.random.normal(k[1], (hidden,)),
          "c2": 0.5 * jax.random.normal(k[2], (3, 3, hidden, 1)),
          "emb": 0.5 * jax.random.normal(k[3], (NUM_CLASSES, hidden))}


def hidden(p, x, t):
  return _conv(x, p["c1"]) + (t[:, None, None, None] / T) * p["temb"]


def uncond_apply(p, x, t):
  return _conv(jnp.tanh(hidden(p, x, t)), p["c2"])


def ignoring_apply(p, x, t, cond):  # takes a condition and ignores it
  del cond
  return uncond_apply(p, x, t)


def cond_apply(p, x, t, cond):  # a class embedding added to the first layer's output
  h = hidden(p, x, t) + p["emb"][cond][:, None, None, :]
  return _conv(jnp.tanh(h), p["c2"])


@pytest.fixture
def problem(x64):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  n, q = 5, 3
  x0 = jax.random.normal(keys[0], (n,) + SHAPE)
  xq = jax.random.normal(keys[1], (q,) + SHAPE)
  draws = draws_lib.fixed_draws(keys[2], 2, SHAPE, T, timesteps="random", dtype=x0.dtype)
  y = jnp.arange(n) % NUM_CLASSES
  yq = jnp.arange(q) % NUM_CLASSES
  return schedules.linear(T), init(keys[3]), x0, xq, y, yq, draws


def _close(a, b, rtol=1e-10, atol=1e-12):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def _kfac_dense(state, params):
  return dense.dense_operator(functools.partial(kfac.kfac_matvec, state), params)


def test_an_ignored_condition_changes_no_score(problem):
  schedule, params, x0, xq, y, yq, draws = problem
  params = {k: v for k, v in params.items() if k != "emb"}  # the unconditional model's
  plain, labelled = x0, (x0, y)
  queries, labelled_q = xq, (xq, yq)
  u, c = uncond_apply, ignoring_apply

  np.testing.assert_allclose(losses.per_example_loss(u, params, schedule, x0, draws.t[:1].repeat(5),
                                                     jnp.broadcast_to(draws.eps[0], x0.shape)),
                             losses.per_example_loss(c, params, schedule, labelled,
                                                     draws.t[:1].repeat(5),
                                                     jnp.broadcast_to(draws.eps[0], x0.shape)))
  for name in ("loss", "square_norm", "elbo"):
    gu = per_example_grads(measurement_fn(name, u, schedule, draws), params, plain, chunk_size=2)
    gc = per_example_grads(measurement_fn(name, c, schedule, draws), params, labelled,
                           chunk_size=2)
    _close(gu, gc)

  v = jax.tree.map(jnp.ones_like, params)
  _close(ggn.ggn_matvec(u, params, schedule, plain, draws, v, chunk_size=2),
         ggn.ggn_matvec(c, params, schedule, labelled, draws, v, chunk_size=2))
  _close(dense.dense_ggn(u, params, schedule, plain, draws, batch_size=2),
         dense.dense_ggn(c, params, schedule, labelled, draws, batch_size=2))
  key = jax.random.PRNGKey(1)
  # The default sampled mode (ggn_exact: the one-pair K-FAC test below).
  ku = kfac.fit_kfac(u, params, schedule, plain, draws, key=key, batch_size=3, chunk_size=4)
  kc = kfac.fit_kfac(c, params, schedule, labelled, draws, key=key, batch_size=3, chunk_size=4)
  _close(_kfac_dense(ku, params), _kfac_dense(kc, params))
  _close(ekfac.fit_ekfac(u, params, schedule, plain, draws, ku, batch_size=3, key=key),
         ekfac.fit_ekfac(c, params, schedule, labelled, draws, kc, batch_size=3, key=key))
  _close(diagonal.fit_diagonal(u, params, schedule, plain, draws, key=key, chunk_size=3),
         diagonal.fit_diagonal(c, params, schedule, labelled, draws, key=key, chunk_size=3))

  tu = inf.influence(u, params, schedule, draws, plain, queries, ku, tile_size=2, chunk_size=2)
  tc = inf.influence(c, params, schedule, draws, labelled, labelled_q, kc, tile_size=2,
                     chunk_size=2)
  np.testing.assert_allclose(tu, tc, rtol=1e-10)
  assert np.abs(np.asarray(tu)).max() > 0

  config = ProjectionConfig(dim=8, kind="sparse", seed=0)
  fu = featurize(measurement_fn("loss", u, schedule, draws), params, plain, config, chunk_size=2)
  fc = featurize(measurement_fn("loss", c, schedule, draws), params, labelled, config,
                 chunk_size=2)
  np.testing.assert_allclose(fu, fc, rtol=1e-10)


def test_journey_trak_carries_the_sampling_condition(problem):
  schedule, params, x0, xq, y, yq, draws = problem
  key = jax.random.PRNGKey(2)
  traj = samplers.ddim_sample(uncond_apply, params, schedule, key, (3,) + SHAPE, num_steps=4, dtype=jnp.float64,
                              return_trajectory=True)
  config = ProjectionConfig(dim=8, seed=0)
  plain = trak.journey_trak_scores(uncond_apply, params, schedule, traj, [0, 2], x0, key, config)
  labelled = trak.journey_trak_scores(ignoring_apply, params, schedule, traj, [0, 2], (x0, y),
                                      key, config, query_cond=yq)
  np.testing.assert_allclose(plain, labelled, rtol=1e-10)
  used = trak.journey_trak_scores(cond_apply, params, schedule, traj, [0, 2], (x0, y), key,
                                  config, query_cond=yq)
  assert not np.allclose(used, plain)
  with pytest.raises(ValueError, match="query_cond"):
    trak.journey_trak_scores(cond_apply, params, schedule, traj, [0], (x0, y), key, config)


def test_conditional_gradients_are_those_of_the_conditional_loss(problem):
  schedule, params, x0, _, y, _, draws = problem
  ab = jnp.asarray(schedule.alphas_bar)

  def by_hand(p, x, label):  # 1/K Σ_k mean ‖ε_k − ε_θ(x_t^k, t_k, label)‖², written out
    a = ab[draws.t][:, None, None, None]
    xt = jnp.sqrt(a) * x[None] + jnp.sqrt(1 - a) * draws.eps
    out = cond_apply(p, xt, draws.t, jnp.full((draws.t.shape[0],), label))
    return jnp.mean(jnp.square(out - draws.eps))

  f = measurement_fn("loss", cond_apply, schedule, draws)
  got = per_example_grads(f, params, (x0, y), chunk_size=2)
  want = jax.vmap(jax.grad(by_hand), in_axes=(None, 0, 0))(params, x0, y)
  _close(got, want)
  # Only the example's own class row of the embedding gets a gradient.
  emb = np.asarray(got["emb"])
  for i, label in enumerate(np.asarray(y)):
    assert np.abs(emb[i, label]).max() > 0
    assert np.all(emb[i, np.arange(NUM_CLASSES) != label] == 0)

  # The training-loss gradient of a batch of pairs, through losses.batch_loss.
  t = jnp.asarray(draws.t[:1]).repeat(5)
  eps = jnp.broadcast_to(draws.eps[0], x0.shape)
  g = jax.grad(losses.batch_loss, argnums=1)(cond_apply, params, schedule, (x0, y), t, eps)
  xt = schedules.q_sample(schedule, x0, t, eps)
  want = jax.grad(lambda p: jnp.mean(jnp.square(cond_apply(p, xt, t, y) - eps)))(params)
  _close(g, want)


def test_a_label_change_changes_the_measurement(problem):
  schedule, params, x0, _, y, _, draws = problem
  for name in ("loss", "square_norm", "mean"):
    f = measurement_fn(name, cond_apply, schedule, draws)
    a, b = f(params, (x0[0], jnp.asarray(0))), f(params, (x0[0], jnp.asarray(1)))
    assert abs(float(a) - float(b)) > 1e-6, name
  step = trajectory_step_measurement(cond_apply, schedule)
  a = step(params, (x0[0], jnp.asarray(0)), jnp.asarray(10), draws.eps[0])
  b = step(params, (x0[0], jnp.asarray(2)), jnp.asarray(10), draws.eps[0])
  assert abs(float(a) - float(b)) > 1e-6


def mlp_cond_apply(p, x, t, cond):
  b = x.shape[0]
  h = x.reshape(b, -1) @ p["l1"] + (t[:, None] / T) * p["temb"] + p["emb"][cond]
  return (jnp.tanh(h) @ p["l2"]).reshape(x.shape)


def test_conditional_kfac_is_exact_for_one_example_draw(problem):
  # The registry traces apply_fn with the condition; the class embedding (read by a
  # gather, not a matmul) gets a diagonal block. For one example-draw with ggn_exact,
  # K-FAC of a dense layer is exact: each Kronecker block equals the dense GGN's.
  schedule, _, x0, _, y, _, draws = problem
  k = jax.random.split(jax.random.PRNGKey(3), 4)
  params = {"l1": jax.random.normal(k[0], (16, 3)), "temb": jax.random.normal(k[1], (3,)),
            "emb": jax.random.normal(k[2], (NUM_CLASSES, 3)),
            "l2": jax.random.normal(k[3], (3, 16))}
  d1 = draws_lib.Draws(draws.t[:1], draws.eps[:1])
  sizes = [x.size for x in jax.tree.leaves(params)]
  offsets = np.cumsum([0] + sizes)
  fits = []
  for label in (0, 2):
    one = (x0[:1], jnp.array([label]))
    g = dense.dense_ggn(mlp_cond_apply, params, schedule, one, d1)
    with pytest.warns(UserWarning, match="emb"):
      state = kfac.fit_kfac(mlp_cond_apply, params, schedule, one, d1,
                            estimation_mode="ggn_exact")
    approx = _kfac_dense(state, params)
    assert sum(lay.kind == "kronecker" for lay in state.layout) == 2
    for lay in state.layout:
      if lay.kind == "kronecker":
        idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in lay.leaf_indices])
        np.testing.assert_allclose(approx[np.ix_(idx, idx)], g[np.ix_(idx, idx)], atol=1e-10)
    fits.append(approx)
  assert not np.allclose(fits[0], fits[1])  # the condition reached the fit


def test_the_output_shape_is_checked_on_the_first_call(problem):
  schedule, params, x0, _, _, _, draws = problem

  def flat_apply(p, x, t):  # forgets to reshape its output back to the image shape
    return uncond_apply(p, x, t).reshape(x.shape[0], -1)

  t = jnp.zeros((5,), jnp.int32)
  with pytest.raises(ValueError, match=r"x_t's shape \(5, 4, 4, 1\).*\(5, 16\)"):
    losses.per_example_loss(flat_apply, params, schedule, x0, t, jnp.zeros_like(x0))
  f = measurement_fn("loss", flat_apply, schedule, draws)
  with pytest.raises(ValueError, match=r"\(2, 4, 4, 1\).*\(2, 16\)"):
    per_example_grads(f, params, x0)
  with pytest.raises(ValueError, match=r"x_t's shape"):
    kfac.fit_kfac(flat_apply, params, schedule, x0, draws)
  with pytest.raises(ValueError, match=r"x_t's shape"):
    jax.jit(f)(params, x0[0])


def test_bad_conditions_raise(problem):
  schedule, params, x0, xq, y, _, draws = problem
  with pytest.raises(ValueError, match="leading axis N = 5"):
    kfac.fit_kfac(cond_apply, params, schedule, (x0, y[:3]), draws)
  with pytest.raises(ValueError, match="leading axis N = 5"):
    inf.influence(cond_apply, params, schedule, draws, (x0, y[:4]), (xq, y[:3]))
  with pytest.raises(ValueError, match="pair"):
    conditioning.split((x0, y, y))


def test_a_leaf_the_model_never_reads_scores_zero_not_nan(problem):
  # Its K-FAC / EK-FAC block is all zero; the default damping must not divide 0 by 0.
  schedule, params, x0, xq, _, _, draws = problem  # params["emb"] is unused by uncond_apply
  with pytest.warns(UserWarning, match="emb"):
    state = kfac.fit_kfac(uncond_apply, params, schedule, x0, draws)
  for curvature in (state, ekfac.fit_ekfac(uncond_apply, params, schedule, x0, draws, state)):
    tau = inf.influence(uncond_apply, params, schedule, draws, x0, xq, curvature)
    assert np.all(np.isfinite(tau)) and np.abs(np.asarray(tau)).max() > 0


def test_mucs_with_an_ignored_condition_gives_the_same_scores(problem):
  from jattr.methods import mucs
  schedule, params, x0, xq, y, yq, draws = problem
  params = {k: v for k, v in params.items() if k != "emb"}
  cfg = mucs.mucs_config(num_steps=4, learning_rate=0.01, retain_batch_size=4)
  null = jnp.full((3,), 2.0)
  key = jax.random.key(1)
  plain = mucs.mucs_scores(uncond_apply, params, schedule, x0, xq, null, key, draws, cfg)
  labelled = mucs.mucs_scores(ignoring_apply, params, schedule, (x0, y), (xq, yq), null, key,
                              draws, cfg)
  np.testing.assert_allclose(plain.scores, labelled.scores, rtol=1e-10, atol=1e-14)
  assert np.abs(np.asarray(plain.scores)).max() > 0
  used = mucs.mucs_scores(cond_apply, init(jax.random.PRNGKey(0)), schedule, (x0, y), (xq, yq),
                          null, key, draws, cfg)
  assert np.all(np.isfinite(used.scores))
  with pytest.raises(ValueError, match="only one of them"):
    mucs.mucs_scores(cond_apply, params, schedule, (x0, y), xq, null, key, draws, cfg)


def test_an_ensemble_of_conditional_members_passes_the_condition(problem):
  from jattr.methods.ensembles import ensemble_apply_fn, ensemble_params
  schedule, params, x0, _, y, _, draws = problem
  stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), params)
  ens = ensemble_params(stacked)
  t = jnp.arange(5) * 7
  got = ensemble_apply_fn(cond_apply)(ens, x0, t, y)
  want = 0.5 * (cond_apply(params, x0, t, y)
                + cond_apply(jax.tree.map(lambda a: 0.5 * a, params), x0, t, y))
  np.testing.assert_allclose(got, want, rtol=1e-12)
  plain = {k: v for k, v in stacked.items() if k != "emb"}
  np.testing.assert_allclose(ensemble_apply_fn(ignoring_apply)(ensemble_params(plain), x0, t, y),
                             ensemble_apply_fn(uncond_apply)(ensemble_params(plain), x0, t),
                             rtol=1e-12)
