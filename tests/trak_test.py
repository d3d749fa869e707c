"""TRAK against the exact Gauss–Newton influence; tiled scoring; baselines; Journey-TRAK."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr.diffusion import samplers
from jattr.diffusion import schedules
from jattr.diffusion.measurements import trajectory_step_measurement
from jattr.features import projection as proj
from jattr.methods import baselines
from jattr.methods import scoring
from jattr.methods import trak


def _features(seed, n, p):
  """Test data from numpy (no jax.random: each new shape would cost an XLA compile)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, p)))


def _exact_influence(gq, g, lam):
  """g_qᵀ (GᵀG + λI)⁻¹ g_i with the full gradients, numpy float64."""
  gq, g = np.asarray(gq), np.asarray(g)
  h = g.T @ g + lam * np.eye(g.shape[1])
  return gq @ np.linalg.solve(h, g.T)


@pytest.mark.parametrize("k", [30, 45])
def test_orthogonal_projection_gives_exact_influence(x64, k):
  p, lam = 30, 0.3
  g = _features(0, 20, p)
  gq = _features(1, 4, p)
  # P [p, k] with orthonormal rows (P Pᵀ = I): square orthogonal for k = p.
  q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((k, p)))
  pmat = jnp.asarray(q.T)
  state = trak.trak_fit(g @ pmat, damping=lam)
  got = trak.trak_score(state, gq @ pmat, tile=(3, 7))
  np.testing.assert_allclose(got, _exact_influence(gq, g, lam), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n", [12, 60])
def test_dual_and_primal_forms_equal_exact(x64, n):
  """N < k takes the N×N (dual) factorisation, N ≥ k the k×k one: both are exact."""
  k, lam = 40, 0.05
  phi, phiq = _features(3, n, k), _features(4, 5, k)
  state = trak.trak_fit(phi, damping=lam)
  assert trak.is_dual(state) == (n < k)
  assert state.cholesky.shape == ((n, n) if n < k else (k, k))
  np.testing.assert_allclose(trak.trak_score(state, phiq, tile=(2, 7)),
                             _exact_influence(phiq, phi, lam), rtol=1e-9, atol=1e-12)
  out = np.zeros((5, n))
  assert trak.trak_score(state, phiq, out=out) is out
  np.testing.assert_allclose(out, _exact_influence(phiq, phi, lam), rtol=1e-9, atol=1e-12)


def test_float32_small_damping_with_few_examples_stays_finite():
  """ΦᵀΦ of rank N ≪ k with c = 1e-6 broke the k×k Cholesky in float32; the dual holds."""
  rng = np.random.default_rng(0)
  phi = jnp.asarray(rng.standard_normal((50, 1000)) * np.logspace(0, 3, 1000), jnp.float32)
  phiq = jnp.asarray(rng.standard_normal((4, 1000)), jnp.float32)
  tau = trak.trak_score(trak.trak_fit(phi, relative_damping=1e-6), phiq)
  want = _exact_influence(np.asarray(phiq, np.float64), np.asarray(phi, np.float64),
                          1e-6 * float(np.sum(np.asarray(phi, np.float64) ** 2)) / 1000)
  np.testing.assert_allclose(tau, want, rtol=2e-2, atol=1e-3 * np.abs(want).max())


def test_default_damping_is_scale_free(x64):
  phi = _features(0, 40, 8)
  phiq = _features(1, 3, 8)
  fixed = trak.trak_fit(phi, relative_damping=1e-3)
  np.testing.assert_allclose(fixed.damping, 1e-3 * np.sum(np.asarray(phi) ** 2) / 8, rtol=1e-12)
  state = trak.trak_fit(phi)  # the default: the effective-dimension rule
  s = np.linalg.eigvalsh(np.asarray(phi).T @ np.asarray(phi))
  np.testing.assert_allclose(np.sum(s / (s + float(state.damping))), 8 / 4, rtol=1e-9)
  scaled = trak.trak_score(trak.trak_fit(7.0 * phi), 7.0 * phiq)
  np.testing.assert_allclose(scaled, trak.trak_score(state, phiq), rtol=1e-10)
  out = np.zeros((3, 40))
  assert trak.trak_score(state, phiq, tile=(2, 16), out=out) is out
  np.testing.assert_allclose(out, trak.trak_score(state, phiq), rtol=1e-12)


def test_effective_dimension_damping(x64):
  """d(λ) = ρ·r at the default λ, r the numerical rank; N < k uses the N × N Gram."""
  rng = np.random.default_rng(3)
  phi = rng.standard_normal((30, 200)) * np.logspace(0, 2, 200)  # N < k: rank 30
  lam = float(trak.effective_dimension_damping(phi, fraction=0.4))
  s = trak.kernel_eigenvalues(phi)
  assert s.shape == (30,)
  np.testing.assert_allclose(trak.effective_dimension(s, lam), 0.4 * 30, rtol=1e-9)
  dup = np.concatenate([phi[:10], phi[:10]])  # rank 10 of 20 rows
  lam = float(trak.effective_dimension_damping(dup))
  np.testing.assert_allclose(trak.effective_dimension(trak.kernel_eigenvalues(dup), lam),
                             10 / 4, rtol=1e-6)
  # the same λ for features rescaled by any constant, times the scale²
  np.testing.assert_allclose(float(trak.effective_dimension_damping(3.0 * phi)) / 9,
                             float(trak.effective_dimension_damping(phi)), rtol=1e-9)
  with pytest.raises(ValueError, match="fraction"):
    trak.effective_dimension_damping(phi, fraction=1.0)
  with pytest.raises(ValueError, match="all zero"):
    trak.effective_dimension_damping(np.zeros((3, 4)))


def test_ensemble_is_mean_of_models(x64):
  models = [(_features(i, 25, 6), _features(10 + i, 3, 6))
            for i in range(3)]
  got = trak.trak_ensemble_score(models, damping=0.5)
  want = np.mean([_exact_influence(q, t, 0.5) for t, q in models], axis=0)
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_trak_errors():
  with pytest.raises(ValueError, match=r"train_features must have shape \[N, k\]"):
    trak.trak_fit(jnp.ones(4))
  with pytest.raises(ValueError, match="damping must be >= 0"):
    trak.trak_fit(jnp.ones((4, 2)), damping=-1.0)
  state = trak.trak_fit(jnp.eye(4, 3), damping=1.0)
  with pytest.raises(ValueError, match=r"query_features must have shape \[Q, k=3\]"):
    trak.trak_score(state, jnp.ones((2, 4)))


def test_trak_fit_rejects_nonfinite_and_zero_features():
  phi = np.ones((5, 3), np.float32)
  phi[1, 2], phi[3, 0] = np.nan, np.inf
  with pytest.raises(ValueError, match=r"train_features hold 2 non-finite entries"):
    trak.trak_fit(jnp.asarray(phi))
  with pytest.raises(ValueError, match=r"train_features hold 2 non-finite entries"):
    trak.trak_fit(jnp.asarray(phi), damping=1.0)  # not a damping problem
  for damping in (None, 1.0):
    with pytest.raises(ValueError, match="all zero.*does not depend on the parameters"):
      trak.trak_fit(jnp.zeros((5, 3)), damping=damping)


@pytest.mark.parametrize("tiles", [(1, 1), (3, 4), (7, 11), (100, 100)])
def test_tiled_equals_untiled(x64, tiles, tmp_path):
  a = _features(0, 7, 5)
  b = _features(1, 11, 5)
  np.testing.assert_allclose(scoring.tiled_scores(a, b, *tiles), a @ b.T, rtol=1e-13)
  neg_dist = lambda x, y: -jnp.sum((x[:, None] - y[None]) ** 2, -1)
  np.testing.assert_allclose(scoring.tiled_scores(a, b, *tiles, fn=neg_dist), neg_dist(a, b),
                             rtol=1e-13)
  out = np.lib.format.open_memmap(tmp_path / "tau.npy", "w+", np.float64, (7, 11))
  scoring.tiled_scores_into(out, np.asarray(a), np.asarray(b), *tiles)
  out.flush()
  np.testing.assert_allclose(np.load(tmp_path / "tau.npy"), a @ b.T, rtol=1e-13)


def test_baselines(x64):
  qi = _features(0, 3, 12).reshape(3, 2, 2, 3)
  ti = _features(1, 5, 12).reshape(5, 2, 2, 3)
  qf, tf = np.asarray(qi).reshape(3, -1), np.asarray(ti).reshape(5, -1)
  cos = (qf @ tf.T) / np.outer(np.linalg.norm(qf, axis=1), np.linalg.norm(tf, axis=1))
  np.testing.assert_allclose(baselines.pixel_cosine(qi, ti), cos, rtol=1e-12)
  np.testing.assert_allclose(baselines.grad_cosine(qf, tf), cos, rtol=1e-12)
  np.testing.assert_allclose(baselines.grad_dot(qf, tf), qf @ tf.T, rtol=1e-12)
  got = baselines.tracin([(qf, tf, 0.1), (2 * qf, tf, 0.01)])
  np.testing.assert_allclose(got, 0.12 * qf @ tf.T, rtol=1e-12)
  zero = baselines.grad_cosine(jnp.zeros((1, 12)), tf)
  np.testing.assert_array_equal(zero, np.zeros((1, 5)))


def test_journey_trak_matches_manual(x64):
  T, shape = 20, (2, 2, 1)

  def apply_fn(params, x_t, t):
    b = x_t.shape[0]
    h = jnp.concatenate([x_t.reshape(b, -1), (t.astype(x_t.dtype) / T)[:, None]], 1)
    return (jnp.tanh(h @ params["w1"]) @ params["w2"]).reshape(x_t.shape)

  params = {"w1": _features(0, 5, 6) / 2, "w2": _features(1, 6, 4) / 2}
  schedule = schedules.linear(T)
  traj = samplers.ddim_sample(apply_fn, params, schedule, jax.random.key(5), (2,) + shape,
                              num_steps=4, return_trajectory=True, dtype=jnp.float64)
  train = _features(2, 6, 4).reshape((6,) + shape)
  config = proj.ProjectionConfig(16, "gaussian", seed=0, block_size=64)
  key = jax.random.key(9)
  got = trak.journey_trak_scores(apply_fn, params, schedule, traj, [1, 3], train, key, config,
                                 damping=0.1, chunk_size=4)
  assert got.shape == (2, 2, 6)

  # Step 3 by hand, with full gradients and P materialised.
  f = trajectory_step_measurement(apply_fn, schedule)
  eps = jax.random.normal(jax.random.fold_in(key, 3), shape, jnp.float64)

  @jax.jit
  def features(x):
    gs = jax.vmap(jax.grad(lambda p, z: f(p, z, traj.t[3], eps)), in_axes=(None, 0))(params, x)
    flat = jnp.concatenate([gs["w1"].reshape(x.shape[0], -1), gs["w2"].reshape(x.shape[0], -1)], 1)
    return flat @ proj.projection_matrix(config, 5 * 6 + 6 * 4, jnp.float64)

  phi, phiq = features(train), features(traj.x0_pred[3])
  want = np.asarray(phiq) @ np.linalg.solve(np.asarray(phi.T @ phi) + 0.1 * np.eye(16),
                                            np.asarray(phi.T))
  np.testing.assert_allclose(got[1], want, rtol=1e-8, atol=1e-12)
  with pytest.raises(ValueError, match=r"steps must be a non-empty list of indices in \[0, S=4\)"):
    trak.journey_trak_scores(apply_fn, params, schedule, traj, [4], train, key, config)
