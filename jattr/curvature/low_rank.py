"""Low rank plus rest: the top eigenpairs of G exactly, a cheap model of the rest.

The top of the GGN spectrum (``ggn.py``) carries most of its trace and shapes
the influence scores most, and a Krylov method can find it with a few hundred
matrix-vector products (``ggn_matvec``), without ever forming G or a Jacobian.
Let U [P, r] be orthonormal eigenvectors of G for its r largest eigenvalues
s_1 ≥ … ≥ s_r, and Π = I − U Uᵀ the projector onto their orthogonal complement.
Since span U is invariant under G, G splits *exactly* into two pieces acting
on complementary subspaces:

    G = U S Uᵀ + G_⊥,     G_⊥ = Π G Π,     S = diag(s),

and so does its damped inverse, because U S Uᵀ maps into span U, G_⊥ into its
complement, and λI preserves both:

    (G + λI)⁻¹ = U diag(1/(s + λ)) Uᵀ + Π (G_⊥ + λI)⁻¹ Π.

The first term is computed exactly. The second, on the P − r dimensional
complement, is approximated (``low_rank_inverse_vp``):

* **Scaled identity** (the default): G_⊥ ≈ ρ Π with ρ the *mean remaining
  eigenvalue*,

      ρ = tr(G_⊥) / (P − r) = (tr(G) − Σ_r s_r) / (P − r)      (clipped at ≥ 0),

  which keeps tr exact, tr(U S Uᵀ + ρ Π) = tr(G), and is also the
  Frobenius-nearest multiple of Π (argmin_ρ ‖G_⊥ − ρ Π‖_F = tr(G_⊥)/tr(Π)).
  The complement term becomes Π v / (ρ + λ). ρ = 0 would treat the complement
  as flat (every direction weighted 1/λ); ρ gives it the average curvature the
  top r directions leave over. With the exact trace ρ ≤ s_r (up to the Ritz
  error), being a mean of eigenvalues below s_r.

* **Any other curvature C** for the rest (``rest_inverse_vp``, e.g. K-FAC
  through ``jax.tree_util.Partial(kfac_inverse_vp, kfac_state, damping=λ)``):
  the complement term is Π (C + λI)⁻¹ Π v. The projection on the right is needed
  because the span-U part of v is already handled exactly by the first term and
  must not be counted twice; the projection on the left because (C + λI)⁻¹ does
  not share G's eigenvectors, so it maps Π v partly back into span U, where it
  would corrupt the exact top part. Both sides together also keep the
  approximation symmetric positive definite (the sum of two positive definite
  operators on complementary subspaces). Π (C + λI)⁻¹ Π is not
  (Π C Π + λI)⁻¹ on the complement, only its cheap stand-in: it needs no solve
  inside the complement, only C's own inverse. With C = G it is exact (Π
  commutes with G); otherwise it inherits C's error, including the part that
  comes from C's mistakes on the top directions, which leak into the
  complement through C's cross terms. On the tests' toy conv net (K-FAC alone
  67 % off in (G + λI)⁻¹ v) the K-FAC and diagonal rests were much less accurate
  than ρ at every r < P: measure before preferring them.

**tr(G)**, needed by ρ and by the default λ, is either given (``trace=``) or
estimated by ``fit_diagonal`` in its default sampled mode
(``"ggn_curvature_prop"``: one Rademacher cotangent per example-draw pair,
unbiased, the cost of one backward pass per pair); Σ_p diag(G)_p = tr(G).

**Eigenpairs** come from ``lanczos_eigh``: m ≥ r Lanczos iterations (default
m = 2r, capped at P) with full re-orthogonalisation, the top r Ritz pairs kept.
With m > r the top Ritz pairs converge much faster than the bottom ones; they
are used as if exact (the split above is exact for an invariant subspace). An
eigenvalue of G with multiplicity k > 1 is found only once by m ≪ P iterations
(``lanczos_eigh``, "Repeated eigenvalues"); its k − 1 missed copies then count in
the rest ρ, which still keeps the trace exact.

**Cost.** m GGN matvecs, each one jvp and one vjp over all N·K training pairs
(about one pass over the training set each), plus one backward pass per pair
for the trace estimate, plus O(m²·P) flops to re-orthogonalise. Memory: the
Lanczos basis, m × P (2·m·P at the end, when the Ritz vectors are formed), and
the state's r × P eigenvectors: the limit on r for a large model.

**Exactness.** With r = P (and m = P) the complement is empty and the result is
the exact (G + λI)⁻¹ v, equal to ``dense_state_inverse_vp`` of the dense G up to
round-off; the tests check this in float64. The default λ is
``damping_factor`` × tr(G)/P, the mean eigenvalue of G, as for every curvature of
jattr.

With ``wrt`` (``jattr.wrt``) G is the GGN of the selected parameters only, as in
``dense_ggn``; the vectors of ``low_rank_inverse_vp`` are then shaped like
``jattr.wrt.split(params, wrt)``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jattr.curvature.diagonal import fit_diagonal
from jattr.curvature.ggn import check_damping, check_examples, ggn_matvec
from jattr.curvature.kfac import DEFAULT_DAMPING_FACTOR
from jattr.diffusion.draws import Draws
from jattr.diffusion.schedules import Schedule
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.types import ApplyFn, Params
from jattr.wrt import Selector, restrict


class LowRankState(NamedTuple):
  """G ≈ U diag(s) Uᵀ + ρ (I − U Uᵀ): the top eigenpairs of G and the mean of the rest.

  A pytree of arrays only (so ``jax.tree_util.Partial(low_rank_inverse_vp, state)``
  can enter ``jax.jit``).

  Attributes:
    eigvals: s [r], descending, clipped at 0.
    eigvecs: U [P, r], orthonormal columns, rows in ``ravel_pytree(params)`` order.
    rest: ρ, a scalar array: (tr(G) − Σ s) / (P − r) clipped at 0 (0 when r = P).
    trace: tr(G), a scalar array (given, or estimated: ``fit_low_rank_ggn``).
  """

  eigvals: jax.Array
  eigvecs: jax.Array
  rest: jax.Array
  trace: jax.Array

  @property
  def num_parameters(self) -> int:
    return int(self.eigvecs.shape[0])

  @property
  def rank(self) -> int:
    return int(self.eigvals.shape[0])


@jax.jit
def _lanczos_step(basis, w, j, beta_prev):
  """One Lanczos step after the product w = A q_j (q_j = basis[j]).

  α_j = q_jᵀ w, w ← w − α_j q_j − β_{j−1} q_{j−1}, then two passes of classical
  Gram-Schmidt against every row of ``basis`` (rows after j are zero), β_j = ‖w‖
  and q_{j+1} = w / β_j stored as row j + 1 (dropped when j + 1 = m).
  """
  q = basis[j]
  alpha = jnp.vdot(q, w)
  w = w - alpha * q - beta_prev * basis[jnp.maximum(j - 1, 0)]  # β_{−1} = 0
  for _ in range(2):
    w = w - basis.T @ (basis @ w)
  beta = jnp.linalg.norm(w)
  safe = jnp.where(beta > 0, beta, jnp.ones_like(beta))
  basis = basis.at[j + 1].set(w / safe, mode="drop")
  return basis, alpha, beta


@jax.jit
def _restart_row(basis, z, j):
  """basis[j] = z orthogonalised (two Gram-Schmidt passes) against rows < j, normalised."""
  basis = basis.at[j].set(jnp.zeros_like(z))  # the breakdown's noise vector
  for _ in range(2):
    z = z - basis.T @ (basis @ z)
  return basis.at[j].set(z / jnp.linalg.norm(z))


def lanczos_eigh(matvec: Callable[[jax.Array], jax.Array], dim: int, num_iterations: int,
                 key: jax.Array, dtype=None, *, tol: float | None = None,
                 restart: bool = False, progress: Progress | None = None,
                 desc: str = "lanczos") -> tuple[jax.Array, jax.Array]:
  """Ritz pairs of a symmetric PSD operator by Lanczos with full re-orthogonalisation.

  From q_0 = z/‖z‖ (z standard normal from ``key``), each iteration multiplies
  once by A (``matvec``, the expensive part) and builds the next Lanczos vector,
  orthogonalised by two passes of Gram-Schmidt against *all* previous ones (so
  the basis stays orthonormal to round-off, no ghost eigenvalues). The
  tridiagonal T_m = Qᵀ A Q (α on the diagonal, β off it) is eigendecomposed on
  the host in float64 and its eigenpairs (θ, y) give the Ritz pairs (θ, Q y).

  If β_j ≤ tol · ‖T‖ (a running Gershgorin bound: max_i α_i + β_{i−1} + β_i)
  before the last iteration, the Krylov space is invariant: the iteration stops
  and returns j + 1 < m pairs, which are then exact eigenpairs (to round-off).
  With ``restart`` it continues instead from a new random vector orthogonalised
  against the basis (β_j = 0: T becomes block diagonal), so that m pairs always
  come back and m = dim gives the whole spectrum.

  **Repeated eigenvalues.** A single-vector Krylov space holds one direction per
  distinct eigenvalue (the start vector's component in that eigenspace): an
  eigenvalue of multiplicity k > 1 is found once, and the other k − 1 copies only
  after the space is exhausted and the iteration restarted. Exact multiplicities
  are not rare in a GGN: a last dense layer whose output directions the earlier
  layers do not all reach contributes a block A ⊗ I (the tests' MLP with 4 hidden
  units and 16 outputs has 12-fold eigenvalues). A top-r from m ≪ dim iterations
  then lists such an eigenvalue once and skips its copies (block Lanczos would find
  them; not implemented).

  The iterations run from a host loop over one compiled step (per shape), the
  matvec called eagerly between steps.

  Memory: the basis Q, m × dim (and another dim × m while the Ritz vectors are
  formed). Flops: m matvecs plus O(m² · dim) for the re-orthogonalisation.

  Args:
    matvec: v [dim] -> A v [dim], A symmetric positive semi-definite.
    dim: the dimension of A.
    num_iterations: m, 1 ≤ m ≤ dim; m = dim gives the full spectrum.
    key: PRNG key of the start vector.
    dtype: of the Lanczos vectors (None: the default float dtype, float64 under
      ``jax.enable_x64``).
    tol: the relative tolerance of the invariant-subspace test; None: ε^{3/4} of
      ``dtype`` (1.8e-12 in float64, 6.4e-6 in float32), above the round-off
      level ~ε·‖A‖ of an exhausted Krylov space.
    restart: on an invariant subspace, continue from a fresh random vector
      (``fold_in(key, j + 1)``) instead of stopping.
    progress: called after each iteration (``jattr.progress``), stage ``desc``.
    desc: the stage name given to ``progress``.

  Returns:
    ``(eigvals [m'], eigvecs [dim, m'])``, the Ritz values in descending order and
    their Ritz vectors as columns, m' = m unless the iteration stopped early
    (never with ``restart``).
  """
  dim, m = int(dim), int(num_iterations)
  if dim < 1:
    raise ValueError(f"dim must be >= 1, got {dim}")
  if not 1 <= m <= dim:
    raise ValueError(f"num_iterations must be in [1, dim = {dim}], got {num_iterations}")
  dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
  tol = float(jnp.finfo(dtype).eps) ** 0.75 if tol is None else float(tol)
  report = resolve_progress(progress)
  z = jax.random.normal(key, (dim,), dtype)
  basis = jnp.zeros((m, dim), dtype).at[0].set(z / jnp.linalg.norm(z))
  alphas, betas = [], []
  beta_prev = jnp.zeros((), dtype)
  scale = 0.0
  for j in range(m):
    w = jnp.asarray(matvec(basis[j]), dtype)
    if w.shape != (dim,):
      raise ValueError(f"matvec must return a vector of shape ({dim},), got {w.shape}")
    basis, alpha, beta = _lanczos_step(basis, w, j, beta_prev)
    a, b = float(alpha), float(beta)
    if not (math.isfinite(a) and math.isfinite(b)):
      raise FloatingPointError(f"lanczos: non-finite α = {a}, β = {b} at iteration {j}")
    alphas.append(a)
    scale = max(scale, abs(a) + b + (betas[-1] if betas else 0.0))
    report(desc, j + 1, m)
    if j + 1 == m:
      break
    if b <= tol * scale:  # invariant subspace: T is complete
      if not restart:
        break
      z = jax.random.normal(jax.random.fold_in(key, j + 1), (dim,), dtype)
      basis = _restart_row(basis, z, j + 1)
      beta, b = jnp.zeros((), dtype), 0.0
    betas.append(b)
    beta_prev = beta
  k = len(alphas)
  t = np.diag(np.asarray(alphas, np.float64))
  if k > 1:
    off = np.asarray(betas[:k - 1], np.float64)
    t += np.diag(off, 1) + np.diag(off, -1)
  theta, y = np.linalg.eigh(t)
  order = np.argsort(theta)[::-1]
  theta, y = theta[order], y[:, order]
  vecs = basis[:k].T @ jnp.asarray(y, dtype)
  return jnp.asarray(theta, dtype), vecs


def _check_rank(rank: int, num_params: int) -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise TypeError(f"rank must be an int, got {type(rank).__name__}")
  if not 1 <= rank <= num_params:
    raise ValueError(f"rank must be in [1, P = {num_params}] (the number of parameters of G), "
                     f"got {rank}")
  return int(rank)


def fit_low_rank_ggn(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws,
                     rank: int, *, num_iterations: int | None = None,
                     key: jax.Array | None = None, trace=None, trace_samples: int = 1,
                     chunk_size: int | None = None, progress: Progress | None = None,
                     wrt: Selector = None) -> LowRankState:
  """The top-r eigenpairs of G by Lanczos on ``ggn_matvec``, and the mean ρ of the rest.

  Args:
    apply_fn, params, schedule: as in ``jattr.curvature.ggn``.
    x0: the N training examples (images, or ``(images, cond)``).
    draws: the K fixed (t, ε) draws.
    rank: r, 1 ≤ r ≤ P, the eigenpairs kept.
    num_iterations: m, r ≤ m ≤ P Lanczos iterations (GGN matvecs); None: min(2r, P).
    key: PRNG key (None: ``PRNGKey(0)``), split into the Lanczos start vector's and
      the trace estimate's.
    trace: tr(G) if known (e.g. ``jnp.trace(dense_ggn(...))``); None: estimated
      without bias by ``fit_diagonal`` in its default mode (``"ggn_curvature_prop"``,
      ``trace_samples`` Rademacher cotangents per example-draw pair).
    trace_samples: S of that estimate (its relative noise shrinks as 1/√(N K S)).
    chunk_size: examples per jvp/vjp of the GGN matvecs (``ggn_matvec``) and per pass
      of the trace estimate (``fit_diagonal``'s ``batch_size``); None: all N at once.
    progress: called after each Lanczos iteration (stage ``"low-rank GGN"``) and
      each trace batch (``jattr.progress``).
    wrt: the parameters θ_S of G (``jattr.wrt``; ``None``: all).

  Returns:
    A ``LowRankState`` of rank r. Lanczos runs with ``restart=True``: when the
    Krylov space of G is exhausted (an invariant subspace: G of low rank, or with
    repeated eigenvalues) it continues from a new random vector, so all m
    iterations count and r = m = P is exact for every G.
  """
  check_examples(x0, draws)
  apply_fn, params = restrict(apply_fn, params, wrt)
  flat, unravel = ravel_pytree(params)
  p = int(flat.size)
  rank = _check_rank(rank, p)
  m = min(2 * rank, p) if num_iterations is None else int(num_iterations)
  if not rank <= m <= p:
    raise ValueError(f"num_iterations must be in [rank = {rank}, P = {p}], got {num_iterations}")
  if chunk_size is not None and int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
  key = jax.random.PRNGKey(0) if key is None else key
  start_key, trace_key = jax.random.split(key)

  def matvec(f):
    gv = ggn_matvec(apply_fn, params, schedule, x0, draws, unravel(f), chunk_size=chunk_size)
    return ravel_pytree(gv)[0]

  theta, vecs = lanczos_eigh(matvec, p, m, start_key, flat.dtype, restart=True,
                             progress=progress, desc="low-rank GGN")
  eigvals = jnp.maximum(theta[:rank], 0.0)
  eigvecs = vecs[:, :rank]
  if trace is None:
    diag = fit_diagonal(apply_fn, params, schedule, x0, draws, key=trace_key,
                        num_samples=trace_samples, batch_size=chunk_size, progress=progress)
    trace = sum(jnp.sum(d) for d in jax.tree.leaves(diag.diag))
  else:
    if np.ndim(trace) != 0:
      raise ValueError(f"trace must be a scalar, got shape {np.shape(trace)}")
    if isinstance(trace, (int, float, np.number)) and not trace >= 0:
      raise ValueError(f"trace must be >= 0 (G is PSD), got {trace}")
  trace = jnp.asarray(trace, flat.dtype)
  r = int(eigvals.shape[0])
  rest = (jnp.maximum(trace - jnp.sum(eigvals), 0.0) / (p - r) if r < p
          else jnp.zeros((), flat.dtype))
  return LowRankState(eigvals, eigvecs, rest, trace)


def low_rank_damping(state: LowRankState, damping: float | None = None, *,
                     damping_factor: float = DEFAULT_DAMPING_FACTOR):
  """λ: ``damping``, or ``damping_factor`` × tr(G)/P (the mean eigenvalue of G) when
  None; 1 for an all-zero G (as ``kfac.default_block_damping``)."""
  check_damping(damping)
  if damping is not None:
    return damping
  lam = damping_factor * state.trace / state.num_parameters
  return jnp.where(lam > 0, lam, jnp.ones_like(lam))


def _flat(state: LowRankState, v: Params, name: str = "v"):
  flat, unravel = ravel_pytree(v)
  if flat.shape != (state.num_parameters,):
    raise ValueError(f"the low-rank curvature has P = {state.num_parameters} parameters but "
                     f"{name} has {flat.size}")
  return flat, unravel


def low_rank_inverse_vp(state: LowRankState, v: Params, damping: float | None = None, *,
                        damping_factor: float = DEFAULT_DAMPING_FACTOR,
                        rest_inverse_vp: Callable[[Params], Params] | None = None) -> Params:
  """(G + λI)⁻¹ v ≈ U diag(1/(s + λ)) Uᵀ v + Π R⁻¹ Π v, Π = I − U Uᵀ (module docstring).

  Args:
    state: from ``fit_low_rank_ggn``.
    v: a params-shaped vector (``ravel_pytree`` order, as the state's rows).
    damping: λ ≥ 0; None: ``damping_factor`` × tr(G)/P.
    damping_factor: the 0.1 of the default (used only when ``damping`` is None).
    rest_inverse_vp: R⁻¹ on the complement, a function of one params-shaped vector
      returning one, the damped inverse of some curvature C *with its own λ*, e.g.
      ``jax.tree_util.Partial(kfac_inverse_vp, kfac_state, damping=λ)`` (a ``Partial``
      keeps the whole operator a pytree for ``jax.jit``). None: R⁻¹ = 1/(ρ + λ).

  Returns:
    The approximation of (G + λI)⁻¹ v, shaped like ``v``. With r = P it is exact
    (the complement is empty and ``rest_inverse_vp`` is not called).
  """
  flat, unravel = _flat(state, v)
  lam = low_rank_damping(state, damping, damping_factor=damping_factor)
  u = jnp.asarray(state.eigvecs, flat.dtype)
  s = jnp.asarray(state.eigvals, flat.dtype)
  coef = u.T @ flat
  out = u @ (coef / (s + lam))
  if state.rank == state.num_parameters:  # no complement
    return unravel(out)
  perp = flat - u @ coef
  if rest_inverse_vp is None:
    return unravel(out + perp / (jnp.asarray(state.rest, flat.dtype) + lam))
  z, _ = _flat(state, rest_inverse_vp(unravel(perp)), "rest_inverse_vp(v)")
  z = jnp.asarray(z, flat.dtype)
  return unravel(out + z - u @ (u.T @ z))


def low_rank_matvec(state: LowRankState, v: Params) -> Params:
  """(U diag(s) Uᵀ + ρ (I − U Uᵀ)) v, the undamped curvature the default inverse inverts."""
  flat, unravel = _flat(state, v)
  u = jnp.asarray(state.eigvecs, flat.dtype)
  coef = u.T @ flat
  out = u @ (jnp.asarray(state.eigvals, flat.dtype) * coef)
  if state.rank < state.num_parameters:
    out = out + jnp.asarray(state.rest, flat.dtype) * (flat - u @ coef)
  return unravel(out)
