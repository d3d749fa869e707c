"""The sketched GGN against the dense float64 GGN it restricts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jattr.curvature import dense, inverse_vp, sketch
from jattr.features.projection import ProjectionConfig, project, projection_matrix
from ggn_test import mlp_apply, mlp_params, problem


def _setup(n=5, k=3, hidden=3):
  schedule, x0, draws, key = problem(n=n, k=k)
  params = mlp_params(key, hidden=hidden)
  g = np.asarray(dense.dense_ggn(mlp_apply, params, schedule, x0, draws))
  return schedule, x0, draws, params, g


@pytest.mark.parametrize("kind", ["gaussian", "sparse"])
def test_exact_rows_give_projected_dense_ggn(x64, kind):
  schedule, x0, draws, params, g = _setup()
  p = g.shape[0]
  pc = ProjectionConfig(dim=8, kind=kind, seed=3, block_size=16, nonzeros=2)
  pm = np.asarray(projection_matrix(pc, p, jnp.float64))
  for batch, chunk in ((None, None), (2, 7)):  # batches and chunks: the same sum
    gram = sketch.sketch_gram(mlp_apply, params, schedule, x0, draws, pc,
                              estimation_mode="ggn_exact", batch_size=batch, chunk_size=chunk)
    np.testing.assert_allclose(gram, pm.T @ g @ pm, rtol=1e-10, atol=1e-12)


def test_sampled_rows_converge_to_exact_sketch(x64):
  schedule, x0, draws, params, g = _setup()
  pc = ProjectionConfig(dim=6, kind="gaussian", seed=1)
  exact = np.asarray(sketch.sketch_gram(mlp_apply, params, schedule, x0, draws, pc,
                                        estimation_mode="ggn_exact"))
  errors = []
  for s in (1, 16, 256):
    gram = sketch.sketch_gram(mlp_apply, params, schedule, x0, draws, pc, num_samples=s,
                              key=jax.random.key(5))
    errors.append(np.linalg.norm(gram - exact) / np.linalg.norm(exact))
  # Monte-Carlo error ∝ 1/√S: 16x the samples, about 4x smaller
  assert errors[0] > 2 * errors[1] > 4 * errors[2], errors
  assert errors[2] < 0.05


def test_inverse_vp_converges_to_dense_as_k_grows(x64):
  schedule, x0, draws, params, g = _setup()
  p = g.shape[0]
  flat, unravel = ravel_pytree(params)
  v = jax.random.normal(jax.random.PRNGKey(7), flat.shape)
  lam = 0.1 * np.trace(g) / p
  exact = np.linalg.solve(g + lam * np.eye(p), np.asarray(v))
  # the fitted state is the push-through form P(PᵀGP + λI)⁻¹Pᵀ = PPᵀ(GPPᵀ + λI)⁻¹
  pc = ProjectionConfig(dim=p // 2, kind="gaussian", seed=0)
  state = sketch.fit_sketched_ggn(mlp_apply, params, schedule, x0, draws, pc,
                                  estimation_mode="ggn_exact")
  pm = np.asarray(projection_matrix(pc, p, jnp.float64))
  ppt = pm @ pm.T
  reference = ppt @ np.linalg.solve(g @ ppt + lam * np.eye(p), np.asarray(v))
  got = ravel_pytree(sketch.sketch_inverse_vp(state, unravel(v), damping=lam))[0]
  np.testing.assert_allclose(got, reference, rtol=1e-7, atol=1e-9)
  # and it tends to (G + λI)⁻¹ as k grows (the state from the exact G_k = PᵀGP)
  errors = []
  for k in (p // 2, 4 * p, 64 * p):
    errs = []
    for seed in range(3):
      pc = ProjectionConfig(dim=k, kind="gaussian", seed=seed)
      pm = np.asarray(projection_matrix(pc, p, jnp.float64))
      st = sketch.sketch_state(pm.T @ g @ pm, pc, p)
      got = ravel_pytree(sketch.sketch_inverse_vp(st, unravel(v), damping=lam))[0]
      errs.append(np.linalg.norm(got - exact) / np.linalg.norm(exact))
    errors.append(np.mean(errs))
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.2, errors


def test_scores_match_inverse_vp_and_dispatch(x64):
  schedule, x0, draws, params, g = _setup()
  flat, unravel = ravel_pytree(params)
  pc = ProjectionConfig(dim=10, kind="sparse", seed=0, nonzeros=2)
  state = sketch.fit_sketched_ggn(mlp_apply, params, schedule, x0, draws, pc, num_samples=4,
                                  key=jax.random.key(0))
  assert inverse_vp.curvature_kind(state) == "sketch"
  gq = jax.random.normal(jax.random.PRNGKey(1), (3, flat.size))
  gt = jax.random.normal(jax.random.PRNGKey(2), (4, flat.size))
  tau = sketch.sketch_scores(state, project(pc, gq), project(pc, gt), damping_factor=0.01)
  ivp = inverse_vp.inverse_vp_fn(state, damping_factor=0.01)
  ref = np.stack([[np.dot(ravel_pytree(ivp(unravel(q)))[0], t) for t in gt] for q in gq])
  np.testing.assert_allclose(tau, ref, rtol=1e-8, atol=1e-10)
  # it goes through jit as a pytree (the projection static)
  jitted = jax.jit(lambda st, v: sketch.sketch_inverse_vp(st, v, damping=0.1))
  np.testing.assert_allclose(ravel_pytree(jitted(state, unravel(gq[0])))[0],
                             ravel_pytree(sketch.sketch_inverse_vp(state, unravel(gq[0]),
                                                                   damping=0.1))[0], rtol=1e-10)


def test_bad_inputs_raise(x64):
  schedule, x0, draws, params, g = _setup()
  pc = ProjectionConfig(dim=4, kind="gaussian")
  with pytest.raises(ValueError, match="fisher_empirical"):
    sketch.fit_sketched_ggn(mlp_apply, params, schedule, x0, draws, pc,
                            estimation_mode="fisher_empirical")
  state = sketch.sketch_state(np.eye(4), pc, g.shape[0])
  with pytest.raises(ValueError, match="k = 4"):
    sketch.sketch_scores(state, np.zeros((2, 5)), np.zeros((3, 4)))
  with pytest.raises(ValueError, match="projects P"):
    sketch.sketch_inverse_vp(state, {"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match=r"\[k, k\]"):
    sketch.sketch_state(np.eye(3), pc, 10)
