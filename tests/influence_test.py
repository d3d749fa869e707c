"""Influence scores against exact leave-one-out retraining on ridge regression."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jattr.curvature import dense, diagonal, ekfac, ggn, kfac
from jattr.curvature import inverse_vp_fn
from jattr.diffusion import draws as draws_lib
from jattr.diffusion import schedules
from jattr.diffusion.measurements import measurement_fn
from jattr.grads.per_example import per_example_grads
from jattr.methods import influence as inf

T = 50
SHAPE = (2, 2, 1)
D = 4
N, K, Q = 12, 2, 3
ALPHA = 0.05  # ridge: J(θ) = L(θ) + α ‖θ‖²


def features(x_t, t):
  b = x_t.shape[0]
  return jnp.concatenate([x_t.reshape(b, -1), t[:, None].astype(x_t.dtype) / T], axis=1)


def linear_apply(p, x, t):
  """A denoiser linear in its parameters: one dense layer."""
  return (features(x, t) @ p["w"] + p["b"]).reshape(x.shape)


def ridge_fit(schedule, x0, draws, keep):
  """argmin 1/(N K D) Σ_{kept pairs} ‖f − ε‖² + α‖θ‖², by the normal equations.

  The normalisation stays 1/N when examples are dropped: leave-one-out of
  J − ℓ_i/N, the objective whose Newton step the influence function is.
  """
  xb, tb, eb = ggn.example_draw_pairs(x0[keep], draws)
  x_t = schedules.q_sample(schedule, xb, tb, eb)
  f = np.concatenate([np.asarray(features(x_t, tb)), np.ones((xb.shape[0], 1))], axis=1)
  y = np.asarray(eb).reshape(xb.shape[0], D)
  scale = N * K * D
  theta = np.linalg.solve(f.T @ f / scale + ALPHA * np.eye(f.shape[1]), f.T @ y / scale)
  return {"b": jnp.asarray(theta[-1]), "w": jnp.asarray(theta[:-1])}


def setup():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  schedule = schedules.linear(T)
  x0 = jax.random.normal(keys[0], (N,) + SHAPE)
  queries = jax.random.normal(keys[1], (Q,) + SHAPE) + 0.5
  draws = draws_lib.fixed_draws(keys[2], K, SHAPE, T, timesteps="random", dtype=x0.dtype)
  params = ridge_fit(schedule, x0, draws, np.arange(N))
  return schedule, x0, queries, draws, params


def loo_changes(schedule, x0, queries, draws, params, measure):
  """m_q(θ₋ᵢ) − m_q(θ) by retraining without each example, [Q, N]."""
  measure_all = jax.jit(jax.vmap(measure, in_axes=(None, 0)))
  before = measure_all(params, queries)
  out = []
  for i in range(N):
    p_i = ridge_fit(schedule, x0, draws, np.delete(np.arange(N), i))
    out.append(measure_all(p_i, queries) - before)
  return np.stack(out, axis=1)


def test_influence_equals_leave_one_out_on_ridge(x64):
  schedule, x0, queries, draws, params = setup()
  measure = measurement_fn("mean", linear_apply, schedule, draws)  # linear in θ
  loo = loo_changes(schedule, x0, queries, draws, params, measure)
  p = ravel_pytree(params)[0].size
  h = dense.dense_hessian(linear_apply, params, schedule, x0, draws) + 2 * ALPHA * np.eye(p)
  qg = per_example_grads(measure, params, queries)
  loss = measurement_fn("loss", linear_apply, schedule, draws)
  tg = per_example_grads(loss, params, x0)

  # The Newton step on J − ℓ_i/N is exact for a quadratic: with the leave-one-out
  # Hessian H − H_i/N, N·Δm is the influence score to rounding.
  for i in (0, 5, 11):
    h_i = dense.dense_hessian(linear_apply, params, schedule, x0[i:i + 1], draws)
    tau = inf.influence_scores(qg, jax.tree.map(lambda g: g[i:i + 1], tg),
                               inverse_vp_fn(h - h_i / N, damping=0.0))
    np.testing.assert_allclose(tau[:, 0] / N, loo[:, i], rtol=1e-8, atol=1e-12)

  # The influence function drops H_i/N: equal to leave-one-out up to O(1/N).
  tau = inf.influence(linear_apply, params, schedule, draws, x0, queries, h, measurement="mean",
                      damping=0.0, tile_size=5)
  assert np.abs(tau / N - loo).max() < 0.3 * np.abs(loo).max()
  assert np.corrcoef(np.ravel(tau), np.ravel(loo))[0, 1] > 0.99

  # K-FAC is exact for one dense layer under squared error, and the ridge term is
  # a damping of 2α: K-FAC influence equals exact-Hessian influence. So does EK-FAC.
  k_state = kfac.fit_kfac(linear_apply, params, schedule, x0, draws, batch_size=5,
                          estimation_mode="ggn_exact")
  e_state = ekfac.fit_ekfac(linear_apply, params, schedule, x0, draws, k_state, batch_size=6,
                            estimation_mode="ggn_exact")
  for state in (k_state, e_state):
    tau_c = inf.influence(linear_apply, params, schedule, draws, x0, queries, state,
                          measurement="mean", damping=2 * ALPHA, tile_size=5)
    np.testing.assert_allclose(tau_c, tau, rtol=1e-8, atol=1e-10)
  # A diagonal curvature is only an approximation here.
  d_state = diagonal.fit_diagonal(linear_apply, params, schedule, x0, draws)
  tau_d = inf.influence(linear_apply, params, schedule, draws, x0, queries, d_state,
                        measurement="mean", damping=2 * ALPHA)
  assert np.abs(tau_d - tau).max() > 1e-3 * np.abs(tau).max()


def test_driver_matches_precomputed_gradients(x64):
  schedule, x0, queries, draws, params = setup()
  measure = measurement_fn("square_norm", linear_apply, schedule, draws)
  loss = measurement_fn("loss", linear_apply, schedule, draws)
  qg = per_example_grads(measure, params, queries)
  tg = per_example_grads(loss, params, x0)
  state = diagonal.DiagonalState(jax.tree.map(lambda x: jnp.abs(x) + 0.1, params))
  expected = inf.influence_scores(qg, tg, inverse_vp_fn(state, 0.2), tile=(2, 5))
  got = inf.influence(linear_apply, params, schedule, draws, x0, queries, state,
                      measurement="square_norm", damping=0.2, tile_size=5, chunk_size=4)
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  flat_q = np.stack([ravel_pytree(jax.tree.map(lambda g: g[j], qg))[0] for j in range(Q)])
  flat_t = np.stack([ravel_pytree(jax.tree.map(lambda g: g[i], tg))[0] for i in range(N)])
  d = ravel_pytree(state.diag)[0]
  np.testing.assert_allclose(expected, (flat_q / (d + 0.2)) @ flat_t.T, rtol=1e-10)
  # Identity curvature: the gradient dot product.
  dot = inf.influence(linear_apply, params, schedule, draws, x0, queries, None,
                      measurement="square_norm")
  np.testing.assert_allclose(dot, flat_q @ flat_t.T, rtol=1e-10)


def test_damping_factor_scales_the_default(x64):
  """damping_factor c gives λ = c × the mean eigenvalue (dense) or of diag(G) (diagonal)."""
  schedule, x0, queries, draws, params = setup()
  m = dense.dense_ggn(linear_apply, params, schedule, x0, draws)
  v = jax.tree.map(lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) / p.size, params)
  flat, _ = ravel_pytree(v)
  p = flat.size
  for c in (0.01, 0.3):
    got = ravel_pytree(inverse_vp_fn(m, damping_factor=c)(v))[0]
    want = np.linalg.solve(m + c * np.trace(m) / p * np.eye(p), flat)
    np.testing.assert_allclose(got, want, rtol=1e-10)
  state = diagonal.fit_diagonal(linear_apply, params, schedule, x0, draws,
                                estimation_mode="ggn_exact")
  d = ravel_pytree(state.diag)[0]
  got = ravel_pytree(inverse_vp_fn(state, damping_factor=2.0)(v))[0]
  np.testing.assert_allclose(got, flat / (d + 2.0 * d.mean()), rtol=1e-10)
  # The explicit λ wins over the factor; the factor must be positive.
  got = ravel_pytree(inverse_vp_fn(state, damping=0.5, damping_factor=2.0)(v))[0]
  np.testing.assert_allclose(got, flat / (d + 0.5), rtol=1e-10)
  with pytest.raises(ValueError, match="damping_factor must be > 0"):
    inverse_vp_fn(state, damping_factor=0.0)


def test_bad_inputs_raise(x64):
  schedule, x0, queries, draws, params = setup()
  with pytest.raises(ValueError, match="damping must be"):
    inverse_vp_fn(None, damping=-1.0)
  with pytest.raises(TypeError, match="curvature must be None, a KfacState"):
    inverse_vp_fn("kfac")
  with pytest.raises(ValueError, match=r"train_x0 must have shape \[N, 2, 2, 1\]"):
    inf.influence(linear_apply, params, schedule, draws, x0[:, :1], queries)
  with pytest.raises(ValueError, match=r"query_x0 must have shape"):
    inf.influence(linear_apply, params, schedule, draws, x0, queries[0])
  with pytest.raises(ValueError, match="name must be one of"):
    inf.influence(linear_apply, params, schedule, draws, x0, queries, measurement="logit")
  qg = {"b": jnp.ones((Q, D)), "w": jnp.ones((Q, D + 1, D))}
  with pytest.raises(ValueError, match="train_grads have P=7 parameters, query_grads P=24"):
    inf.influence_scores(qg, jnp.ones((N, 7)), lambda v: v)
  with pytest.raises(ValueError, match="same leading axis"):
    inf.influence_scores({"b": jnp.ones((Q, D)), "w": jnp.ones((Q + 1, D + 1, D))},
                         jnp.ones((N, 24)), lambda v: v)
