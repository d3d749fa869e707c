"""The GGN of the diffusion loss against dense float64 references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jattr.curvature import dense, diagonal, ggn
from jattr.diffusion import draws as draws_lib
from jattr.diffusion import schedules

T = 50
SHAPE = (2, 2, 1)
D = 4


def mlp_apply(p, x, t):
  b = x.shape[0]
  h = jnp.concatenate([x.reshape(b, -1), t[:, None].astype(x.dtype) / T], axis=1)
  h = jnp.tanh(h @ p["l1"]["w"] + p["l1"]["b"])
  return (h @ p["l2"]["w"] + p["l2"]["b"]).reshape(x.shape)


def linear_apply(p, x, t):
  b = x.shape[0]
  h = jnp.concatenate([x.reshape(b, -1), t[:, None].astype(x.dtype) / T], axis=1)
  return (h @ p["w"] + p["b"]).reshape(x.shape)


def mlp_params(key, hidden=3):
  k = jax.random.split(key, 4)
  return {"l1": {"w": jax.random.normal(k[0], (D + 1, hidden)),
                 "b": 0.1 * jax.random.normal(k[1], (hidden,))},
          "l2": {"w": jax.random.normal(k[2], (hidden, D)) / np.sqrt(hidden),
                 "b": 0.1 * jax.random.normal(k[3], (D,))}}


def problem(n=5, k=3, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  x0 = jax.random.normal(keys[0], (n,) + SHAPE)
  draws = draws_lib.fixed_draws(keys[1], k, SHAPE, T, timesteps="random", dtype=x0.dtype)
  return schedules.linear(T), x0, draws, keys[2]


def test_matvec_equals_dense_ggn(x64):
  schedule, x0, draws, key = problem()
  params = mlp_params(key)
  g = dense.dense_ggn(mlp_apply, params, schedule, x0, draws)
  flat, unravel = ravel_pytree(params)
  v = jax.random.normal(jax.random.PRNGKey(7), flat.shape)
  for chunk in (None, 2):  # 5 examples in chunks of 2: padded and masked
    gv = ggn.ggn_matvec(mlp_apply, params, schedule, x0, draws, unravel(v), chunk_size=chunk)
    np.testing.assert_allclose(ravel_pytree(gv)[0], g @ v, rtol=1e-10, atol=1e-12)
  assert np.linalg.eigvalsh(g).min() > -1e-12  # PSD
  # Summed over batches of 2 examples (the last one short): the same matrix.
  np.testing.assert_allclose(dense.dense_ggn(mlp_apply, params, schedule, x0, draws, batch_size=2),
                             g, rtol=1e-12, atol=1e-14)


def test_ggn_equals_hessian_for_linear_model(x64):
  schedule, x0, draws, key = problem()
  params = {"w": jax.random.normal(key, (D + 1, D)), "b": jnp.zeros(D)}
  g = dense.dense_ggn(linear_apply, params, schedule, x0, draws)
  for parameterization in ("eps", "x0", "v"):
    h = dense.dense_hessian(linear_apply, params, schedule, x0, draws, parameterization)
    np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-12)


def test_ggn_differs_from_hessian_for_nonlinear_model(x64):
  schedule, x0, draws, key = problem()
  params = mlp_params(key)
  g = dense.dense_ggn(mlp_apply, params, schedule, x0, draws)
  h = dense.dense_hessian(mlp_apply, params, schedule, x0, draws)
  assert np.abs(g - h).max() > 1e-3 * np.abs(h).max()


def test_sqrt_grads_rebuild_ggn(x64):
  schedule, x0, draws, key = problem(n=3, k=2)
  params = mlp_params(key)
  g = dense.dense_ggn(mlp_apply, params, schedule, x0, draws)
  rows = ggn.ggn_sqrt_grads(mlp_apply, params, schedule, x0, draws, estimation_mode="ggn_exact",
                            chunk_size=5)
  r = jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(rows)], axis=1)
  assert r.shape[0] == 3 * 2 * D
  np.testing.assert_allclose(r.T @ r / 6, g, rtol=1e-10, atol=1e-12)
  # Monte Carlo rows average to G.
  for mode in ("ggn_curvature_prop", "fisher_gradients"):
    rows = ggn.ggn_sqrt_grads(mlp_apply, params, schedule, x0, draws, estimation_mode=mode,
                              key=jax.random.PRNGKey(1), num_samples=300)
    r = jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(rows)], axis=1)
    assert np.abs(r.T @ r / 6 - g).max() < 0.15 * np.abs(g).max()


def test_diagonal_equals_dense_diagonal(x64):
  schedule, x0, draws, key = problem(n=4)
  params = mlp_params(key)
  g = dense.dense_ggn(mlp_apply, params, schedule, x0, draws)
  state = diagonal.fit_diagonal(mlp_apply, params, schedule, x0, draws, batch_size=2,
                                estimation_mode="ggn_exact")
  np.testing.assert_allclose(ravel_pytree(state.diag)[0], np.diag(g), rtol=1e-10, atol=1e-12)
  v = jax.tree.map(jnp.ones_like, params)
  out = diagonal.diagonal_inverse_vp(state, diagonal.diagonal_matvec(state, v), damping=0.0)
  np.testing.assert_allclose(ravel_pytree(out)[0], 1.0, rtol=1e-8)
  # The empirical Fisher diagonal is the mean of squared per-draw loss gradients.
  ef = diagonal.fit_diagonal(mlp_apply, params, schedule, x0, draws,
                             estimation_mode="fisher_empirical")
  xb, tb, eb = ggn.example_draw_pairs(x0, draws)
  grad = jax.jit(jax.vmap(jax.grad(lambda p, x, t, e: jnp.mean(
      (mlp_apply(p, schedules.q_sample(schedule, x[None], t[None], e[None]), t[None]) - e) ** 2)),
                          in_axes=(None, 0, 0, 0)))(params, xb, tb, eb)
  expected = jax.tree.map(lambda x: jnp.mean(x ** 2, axis=0), grad)
  np.testing.assert_allclose(ravel_pytree(ef.diag)[0], ravel_pytree(expected)[0], rtol=1e-10)


def test_dense_inverse_vp(x64):
  m = jnp.array([[2.0, 1.0], [1.0, 3.0]])
  v = {"a": jnp.array([1.0, -1.0])}
  out = dense.dense_inverse_vp(m, v, damping=0.5)
  np.testing.assert_allclose((m + 0.5 * jnp.eye(2)) @ out["a"], v["a"], rtol=1e-12)
  default = dense.dense_inverse_vp(m, v)  # λ = 0.1·tr(M)/P = 0.25
  np.testing.assert_allclose((m + 0.25 * jnp.eye(2)) @ default["a"], v["a"], rtol=1e-12)


def test_bad_inputs_raise(x64):
  schedule, x0, draws, key = problem(n=2, k=2)
  params = mlp_params(key)
  with pytest.raises(ValueError, match="draws.eps must have shape"):
    dense.dense_ggn(mlp_apply, params, schedule, x0[:, :1], draws)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    dense.dense_ggn(mlp_apply, params, schedule, x0, draws, batch_size=0)
  with pytest.raises(ValueError, match="v must have the tree structure"):
    ggn.ggn_matvec(mlp_apply, params, schedule, x0, draws, {"w": 1.0})
  with pytest.raises(ValueError, match="damping must be"):
    dense.dense_inverse_vp(jnp.eye(2), {"a": jnp.ones(2)}, damping=-1.0)
  with pytest.raises(ValueError, match=r"matrix must have shape \[P, P\] = \(2, 2\)"):
    dense.dense_inverse_vp(jnp.eye(3), {"a": jnp.ones(2)})
  with pytest.raises(ValueError, match="estimation_mode must be one of"):
    ggn.ggn_sqrt_grads(mlp_apply, params, schedule, x0, draws, estimation_mode="exact")
  with pytest.raises(ValueError, match="needs a key"):
    ggn.ggn_sqrt_grads(mlp_apply, params, schedule, x0, draws, estimation_mode="fisher_gradients")
  state = diagonal.DiagonalState(jax.tree.map(jnp.ones_like, params))
  with pytest.raises(ValueError, match="v must be shaped like the parameters"):
    diagonal.diagonal_inverse_vp(state, {"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="damping must be"):
    diagonal.diagonal_inverse_vp(state, params, damping=-0.1)
  assert functools.partial(diagonal.identity_inverse_vp, None)(params) is params
