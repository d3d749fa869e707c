"""The low-rank-plus-rest GGN against explicit matrices and the dense float64 GGN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from jattr import wrt as wrt_lib
from jattr.curvature import dense, diagonal, kfac, low_rank
from jattr.diffusion import draws as draws_lib
from jattr.diffusion import schedules
from toy_models import tiny_apply

T = 50
SHAPE = (4, 4, 1)
D = 16
HIDDEN = 8  # the tiny conv: P = 9·8 + 8 + 9·8 = 152, its G of full rank


def mlp_apply(p, x, t):
  b = x.shape[0]
  h = jnp.concatenate([x.reshape(b, -1), t[:, None].astype(x.dtype) / T], axis=1)
  h = jnp.tanh(h @ p["l1"]["w"] + p["l1"]["b"])
  return (h @ p["l2"]["w"] + p["l2"]["b"]).reshape(x.shape)


def mlp_params(rng, hidden=4):  # P = 17·4 + 4 + 4·16 + 16 = 152, G of rank 112
  return {"l1": {"w": rng.normal(size=(D + 1, hidden)) / np.sqrt(D + 1),
                 "b": 0.1 * rng.normal(size=(hidden,))},
          "l2": {"w": rng.normal(size=(hidden, D)) / np.sqrt(hidden),
                 "b": 0.1 * rng.normal(size=(D,))}}


def conv_params(rng, hidden=HIDDEN):  # toy_models.tiny_init's shapes and scales
  return {"conv1": 0.3 * rng.normal(size=(3, 3, 1, hidden)),
          "temb": 0.1 * rng.normal(size=(hidden,)),
          "conv2": 0.3 * rng.normal(size=(3, 3, hidden, 1))}


@functools.lru_cache(maxsize=None)
def _problem_np(model="conv", n=6, k=3, seed=0):
  """The tiny problem and its dense G, in float64 (built once per session)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)  # numpy: no compiles for the test data
    x0 = jnp.asarray(rng.normal(size=(n,) + SHAPE))
    draws = draws_lib.fixed_draws(jax.random.PRNGKey(seed), k, SHAPE, T, timesteps="random",
                                  dtype=x0.dtype)
    apply_fn, params = ((tiny_apply, conv_params(rng)) if model == "conv"
                        else (mlp_apply, mlp_params(rng)))
    params = jax.tree.map(jnp.asarray, params)
    g = np.asarray(dense.dense_ggn(apply_fn, params, schedules.linear(T), x0, draws))
    return (np.asarray(x0), tuple(map(np.asarray, draws)),
            jax.tree.map(np.asarray, params), g)


def problem(model="conv"):
  """(apply_fn, schedule, x0, draws, params, G) as float64 jax arrays (inside ``x64``)."""
  x0, draws, params, g = _problem_np(model)
  return ({"conv": tiny_apply, "mlp": mlp_apply}[model], schedules.linear(T), jnp.asarray(x0),
          draws_lib.Draws(*map(jnp.asarray, draws)), jax.tree.map(jnp.asarray, params), g)


def _psd(dim, eigvals, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
  return (q * eigvals) @ q.T


def _vec(size, seed=7):
  return jnp.asarray(np.random.default_rng(seed).normal(size=size))


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_lanczos_full_run_is_eigh(x64):
  dim = 40
  b = np.random.default_rng(1).normal(size=(dim, dim))
  a = b @ b.T / dim
  vals, vecs = low_rank.lanczos_eigh(lambda v: jnp.asarray(a) @ v, dim, dim,
                                     jax.random.PRNGKey(0))
  ref, ref_vecs = np.linalg.eigh(a)
  ref, ref_vecs = ref[::-1], ref_vecs[:, ::-1]
  assert vals.shape == (dim,) and vecs.shape == (dim, dim)
  np.testing.assert_allclose(vals, ref, rtol=0, atol=1e-8 * ref[0])
  np.testing.assert_allclose(np.asarray(vecs).T @ vecs, np.eye(dim), atol=1e-10)
  # The top eigenvectors up to sign (the spectrum of B Bᵀ is simple).
  np.testing.assert_allclose(np.abs(np.sum(np.asarray(vecs[:, :5]) * ref_vecs[:, :5], 0)), 1.0,
                             atol=1e-8)


def test_lanczos_few_iterations_find_the_top_of_a_spread_spectrum(x64):
  dim = 200
  spectrum = 0.7 ** np.arange(dim)
  a = jnp.asarray(_psd(dim, spectrum))
  vals, vecs = low_rank.lanczos_eigh(lambda v: a @ v, dim, 30, jax.random.PRNGKey(3))
  assert vals.shape == (30,) and vecs.shape == (dim, 30)
  assert np.all(np.diff(np.asarray(vals)) <= 0)  # descending
  np.testing.assert_allclose(vals[:5], spectrum[:5], rtol=1e-8)
  # Ritz pairs: residual ‖A u − θ u‖ small for the converged ones.
  res = np.linalg.norm(np.asarray(a @ vecs[:, :5] - vecs[:, :5] * vals[:5]), axis=0)
  assert res.max() < 1e-7, res


def test_lanczos_stops_at_an_invariant_subspace_or_restarts(x64):
  dim, rank = 30, 5
  spectrum = np.concatenate([np.arange(rank, 0, -1.0), np.zeros(dim - rank)])
  a = jnp.asarray(_psd(dim, spectrum, seed=2))
  calls = []
  vals, vecs = low_rank.lanczos_eigh(lambda v: calls.append(1) or a @ v, dim, dim,
                                     jax.random.PRNGKey(0))
  # The Krylov space of a rank-5 A is the 5 eigenvectors plus the start's null part.
  assert vals.shape[0] == len(calls) <= rank + 1 < dim
  np.testing.assert_allclose(vals[:rank], spectrum[:rank], atol=1e-10)
  assert vecs.shape == (dim, vals.shape[0])
  # restart=True: all dim iterations, the whole spectrum, an orthonormal basis.
  vals, vecs = low_rank.lanczos_eigh(lambda v: a @ v, dim, dim, jax.random.PRNGKey(0),
                                     restart=True)
  np.testing.assert_allclose(vals, spectrum, atol=1e-10)
  np.testing.assert_allclose(np.asarray(vecs).T @ vecs, np.eye(dim), atol=1e-10)


def test_lanczos_repeated_eigenvalues_need_the_restart(x64):
  dim = 24  # 4 distinct eigenvalues, each 6 times
  spectrum = np.repeat([4.0, 3.0, 2.0, 1.0], 6)
  a = jnp.asarray(_psd(dim, spectrum, seed=4))
  vals, _ = low_rank.lanczos_eigh(lambda v: a @ v, dim, dim, jax.random.PRNGKey(1))
  assert vals.shape == (4,)  # one copy of each
  np.testing.assert_allclose(vals, [4.0, 3.0, 2.0, 1.0], rtol=1e-10)
  vals, vecs = low_rank.lanczos_eigh(lambda v: a @ v, dim, dim, jax.random.PRNGKey(1),
                                     restart=True)
  np.testing.assert_allclose(vals, spectrum, rtol=1e-10)
  np.testing.assert_allclose(a @ vecs, vecs * vals, atol=1e-10)


def test_full_rank_equals_dense_inverse(x64):
  apply_fn, schedule, x0, draws, params, g = problem()
  p = g.shape[0]
  state = low_rank.fit_low_rank_ggn(apply_fn, params, schedule, x0, draws, p,
                                    trace=np.trace(g))
  assert state.rank == p and state.num_parameters == p
  assert float(state.rest) == 0.0
  np.testing.assert_allclose(state.eigvals, np.linalg.eigvalsh(g)[::-1], rtol=0,
                             atol=1e-9 * np.linalg.eigvalsh(g).max())
  flat, unravel = ravel_pytree(params)
  v = unravel(_vec(flat.size, 7))
  ref_state = dense.dense_state(g)
  for lam in (None, 1e-3 * np.trace(g) / p):  # the default λ is 0.1·tr(G)/P for both
    got = ravel_pytree(low_rank.low_rank_inverse_vp(state, v, lam))[0]
    want = ravel_pytree(dense.dense_state_inverse_vp(ref_state, v, lam))[0]
    assert _rel(got, want) < 1e-8
  np.testing.assert_allclose(ravel_pytree(low_rank.low_rank_matvec(state, v))[0],
                             g @ ravel_pytree(v)[0], rtol=1e-8, atol=1e-12)
  # A pytree: through jit as a Partial, the state an argument.
  fn = Partial(low_rank.low_rank_inverse_vp, state)
  jitted = jax.jit(lambda f, v: f(v))(fn, v)
  np.testing.assert_allclose(ravel_pytree(jitted)[0],
                             ravel_pytree(low_rank.low_rank_inverse_vp(state, v))[0], rtol=1e-12)


def test_error_shrinks_as_rank_grows(x64):
  apply_fn, schedule, x0, draws, params, g = problem()
  p = g.shape[0]
  ref = np.linalg.eigvalsh(g)[::-1]
  flat, unravel = ravel_pytree(params)
  v = _vec(flat.size, 7)
  lam = 0.1 * np.trace(g) / p
  exact = np.linalg.solve(g + lam * np.eye(p), np.asarray(v))
  errors = []
  for r in (p // 8, p // 4, p // 2, p):
    state = low_rank.fit_low_rank_ggn(apply_fn, params, schedule, x0, draws, r,
                                      trace=np.trace(g), key=jax.random.PRNGKey(r))
    assert state.rank == r and state.eigvecs.shape == (p, r)
    # The top Ritz values are converged; ρ is the mean of the true remaining eigenvalues.
    np.testing.assert_allclose(state.eigvals[:3], ref[:3], rtol=1e-8)
    want_rest = (np.trace(g) - ref[:r].sum()) / (p - r) if r < p else 0.0
    np.testing.assert_allclose(state.rest, want_rest, rtol=1e-3, atol=1e-12 * ref[0])
    np.testing.assert_allclose(state.trace, np.trace(g), rtol=1e-12)
    errors.append(_rel(ravel_pytree(low_rank.low_rank_inverse_vp(state, unravel(v)))[0],
                       exact))
  assert all(b <= 1.05 * a for a, b in zip(errors, errors[1:])), errors
  assert errors[0] > 1e-3 and errors[-1] < 1e-8, errors


def test_estimated_trace_is_close(x64):
  apply_fn, schedule, x0, draws, params, g = problem()
  p = g.shape[0]
  state = low_rank.fit_low_rank_ggn(apply_fn, params, schedule, x0, draws, p // 4,
                                    trace_samples=16, chunk_size=3)
  np.testing.assert_allclose(state.trace, np.trace(g), rtol=0.1)
  assert float(state.rest) >= 0.0
  # The default λ is damping_factor × tr(G)/P of the (estimated) trace.
  np.testing.assert_allclose(low_rank.low_rank_damping(state), 0.1 * state.trace / p)
  np.testing.assert_allclose(low_rank.low_rank_damping(state, damping_factor=0.5),
                             0.5 * state.trace / p)


@pytest.mark.parametrize("kind", ["kfac", "diagonal"])
def test_kfac_and_diagonal_rests(x64, kind):
  apply_fn, schedule, x0, draws, params, g = problem()
  p = g.shape[0]
  lam = 0.1 * np.trace(g) / p
  flat, unravel = ravel_pytree(params)
  v = unravel(_vec(flat.size, 7))
  exact = np.linalg.solve(g + lam * np.eye(p), np.asarray(ravel_pytree(v)[0]))
  if kind == "kfac":  # conv1 and conv2 Kronecker blocks, temb a diagonal block
    k_state = kfac.fit_kfac(apply_fn, params, schedule, x0, draws, estimation_mode="ggn_exact")
    rest = Partial(kfac.kfac_inverse_vp, k_state, damping=lam)
  else:
    d_state = diagonal.fit_diagonal(apply_fn, params, schedule, x0, draws,
                                    estimation_mode="ggn_exact")
    rest = Partial(diagonal.diagonal_inverse_vp, d_state, damping=lam)
  full = low_rank.fit_low_rank_ggn(apply_fn, params, schedule, x0, draws, p, trace=np.trace(g))
  part = low_rank.fit_low_rank_ggn(apply_fn, params, schedule, x0, draws, p // 4,
                                   trace=np.trace(g))
  a, b = (_vec(flat.size, i) for i in (1, 2))
  got = low_rank.low_rank_inverse_vp(full, v, lam, rest_inverse_vp=rest)
  assert _rel(ravel_pytree(got)[0], exact) < 1e-8
  # Below full rank the rest is used: Π (C + λI)⁻¹ Π v, not Π v / (ρ + λ).

  def complement(x):
    x = ravel_pytree(x)[0]
    return x - part.eigvecs @ (part.eigvecs.T @ x)

  got = low_rank.low_rank_inverse_vp(part, v, lam, rest_inverse_vp=rest)
  np.testing.assert_allclose(complement(got), complement(rest(unravel(complement(v)))),
                             rtol=1e-10, atol=1e-12)
  assert _rel(ravel_pytree(got)[0], ravel_pytree(low_rank.low_rank_inverse_vp(part, v, lam))[0]
              ) > 1e-3
  # Below full rank: runs (also jitted, the rest a Partial inside a Partial), and the
  # projection on both sides keeps the operator symmetric.
  op = Partial(low_rank.low_rank_inverse_vp, part, damping=lam, rest_inverse_vp=rest)
  got = jax.jit(lambda f, v: f(v))(op, v)
  np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(op(v))[0], rtol=1e-12)
  assert np.all(np.isfinite(ravel_pytree(got)[0]))
  fa, fb = (ravel_pytree(op(unravel(x)))[0] for x in (a, b))
  np.testing.assert_allclose(jnp.vdot(fa, b), jnp.vdot(a, fb), rtol=1e-10)
  # The span-U part is exact whatever the rest: F u_i = u_i / (s_i + λ).
  for i in (0, 5, part.rank - 1):
    u = part.eigvecs[:, i]
    np.testing.assert_allclose(ravel_pytree(op(unravel(u)))[0], u / (part.eigvals[i] + lam),
                               rtol=0, atol=1e-8 / lam)


def test_wrt_equals_dense_block(x64):
  apply_fn, schedule, x0, draws, params, _ = problem()
  g = np.asarray(dense.dense_ggn(apply_fn, params, schedule, x0, draws, wrt="^conv2$"))
  p = g.shape[0]
  assert p == 9 * HIDDEN
  state = low_rank.fit_low_rank_ggn(apply_fn, params, schedule, x0, draws, p,
                                    trace=np.trace(g), wrt="^conv2$")
  flat, unravel = ravel_pytree(wrt_lib.split(params, "^conv2$"))
  v = unravel(_vec(flat.size, 7))
  got = ravel_pytree(low_rank.low_rank_inverse_vp(state, v))[0]
  want = ravel_pytree(dense.dense_state_inverse_vp(dense.dense_state(g), v))[0]
  assert _rel(got, want) < 1e-8


def test_rank_deficient_ggn_with_repeated_eigenvalues_is_exact_at_full_rank(x64):
  # The MLP's G has rank 112 of P = 152 and 12-fold eigenvalues (its last layer is
  # A ⊗ I on the 12 output directions the 4 hidden units do not reach): Lanczos
  # exhausts its Krylov space early and restarts, and r = P is still exact.
  apply_fn, schedule, x0, draws, params, g = problem("mlp")
  p = g.shape[0]
  ref = np.linalg.eigvalsh(g)[::-1]
  assert np.sum(ref > 1e-12 * ref[0]) < p
  assert np.sum(np.isclose(ref[:60], ref[11], rtol=1e-9)) == 12
  state = low_rank.fit_low_rank_ggn(apply_fn, params, schedule, x0, draws, p,
                                    trace=np.trace(g))
  assert state.rank == p and float(state.rest) == 0.0
  np.testing.assert_allclose(state.eigvals, np.maximum(ref, 0), rtol=0, atol=1e-10 * ref[0])
  flat, unravel = ravel_pytree(params)
  v = unravel(_vec(flat.size, 7))
  got = ravel_pytree(low_rank.low_rank_inverse_vp(state, v))[0]
  want = ravel_pytree(dense.dense_state_inverse_vp(dense.dense_state(g), v))[0]
  assert _rel(got, want) < 1e-8


def test_bad_inputs_raise(x64):
  apply_fn, schedule, x0, draws, params, g = problem()
  p = g.shape[0]
  fit = functools.partial(low_rank.fit_low_rank_ggn, apply_fn, params, schedule, x0, draws)
  for rank in (0, -1, p + 1):
    with pytest.raises(ValueError, match=rf"rank must be in \[1, P = {p}\]"):
      fit(rank)
  with pytest.raises(TypeError, match="rank must be an int"):
    fit(2.5)
  with pytest.raises(ValueError, match="num_iterations must be in"):
    fit(4, num_iterations=3)
  with pytest.raises(ValueError, match="num_iterations must be in"):
    fit(4, num_iterations=p + 1)
  with pytest.raises(ValueError, match="trace must be >= 0"):
    fit(2, num_iterations=2, trace=-1.0)
  with pytest.raises(ValueError, match="num_iterations must be in"):
    low_rank.lanczos_eigh(lambda v: v, 5, 0, jax.random.PRNGKey(0))
  state = fit(2, num_iterations=2, trace=np.trace(g))
  with pytest.raises(ValueError, match=f"P = {p} parameters but v has 3"):
    low_rank.low_rank_inverse_vp(state, jnp.ones(3))
  with pytest.raises(ValueError, match="damping must be"):
    low_rank.low_rank_inverse_vp(state, params, -1.0)
  bad_rest = lambda v: jnp.ones(3)  # noqa: E731
  with pytest.raises(ValueError, match="rest_inverse_vp"):
    low_rank.low_rank_inverse_vp(state, params, rest_inverse_vp=bad_rest)
