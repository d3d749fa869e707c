"""The dense GGN and its eigendecomposed state, for models small enough to hold G.

G [P, P] is the exact curvature every other approximation in ``jattr.curvature``
stands in for (``ggn.py`` derives it):

    G = 2/(D N K) Σ_{i,k} J_ikᵀ J_ik,                                 (``dense_ggn``)

J_ik = ∂f_θ(x_t(x_i, t_k, ε_k), t_k)/∂θ [D, P] the network's Jacobian at pair
(i, k). Influence needs (G + λI)⁻¹ for many vectors and several λ; with the
eigendecomposition G = U diag(s) Uᵀ, computed once (``dense_state``),

    (G + λI)⁻¹ v = U diag(1/(s + λ)) Uᵀ v                          (``dense_state_inverse_vp``)

costs two [P, P] products per vector and any λ costs a rescaling, where a solve
(``dense_inverse_vp``) refactorises G + λI every time. The default λ is
0.1 × the mean eigenvalue, 0.1·tr(G)/P, as for every curvature of jattr.

Memory is P² (G) plus P² (U): the limit is ``MAX_DENSE_PARAMS``.

With ``wrt`` (``jattr.wrt``) G is the GGN in the selected parameters θ_S alone,
the others held fixed: J_ik = ∂f/∂θ_S [D, P_S] and G [P_S, P_S], rows in the
``ravel_pytree`` order of ``jattr.wrt.split(params, wrt)`` — the [S, S] block of
the full G.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jattr import host_memory
from jattr.curvature.ggn import (_outputs, check_damping, check_examples, example_draw_pairs,
                                 training_loss)
from jattr.diffusion import conditioning
from jattr.diffusion.draws import Draws
from jattr.grads.per_example import sum_chunks
from jattr.diffusion.schedules import Schedule
from jattr.progress import Progress
from jattr.types import ApplyFn, Parameterization, Params
from jattr.wrt import Selector, restrict

MAX_DENSE_PARAMS = 20_000
"""The largest P the dense curvature is built for: G and U in float64 are 3 GiB each."""


class DenseState(NamedTuple):
  """G = U diag(s) Uᵀ: an eigendecomposed dense curvature.

  Attributes:
    eigvals: s [P], clipped at 0 (G is PSD; eigh returns tiny negatives).
    eigvecs: U [P, P], columns the eigenvectors, rows in ``ravel_pytree`` order.
  """

  eigvals: jax.Array
  eigvecs: jax.Array

  @property
  def num_parameters(self) -> int:
    return int(self.eigvals.shape[0])


def check_dense_size(num_params: int, max_params: int = MAX_DENSE_PARAMS, *,
                     what: str = "the dense GGN") -> None:
  """Raises ValueError, before any work, if G [P, P] would exceed ``max_params``."""
  if num_params > max_params:
    raise ValueError(
        f"{what} materialises the [P, P] GGN: P = {num_params:,} parameters, above the limit "
        f"of {max_params:,} ({8 * num_params ** 2 / 2**30:.1f} GiB in float64 for G alone); "
        "use kfac, ekfac or diagonal")


def dense_state(matrix) -> DenseState:
  """Eigendecomposes a dense symmetric PSD curvature (e.g. ``dense_ggn``) once.

  Runs in float64 on the host (numpy's eigh) whatever the input dtype, and keeps
  float64: the eigenvectors of a near-singular G lose accuracy in float32.
  """
  g = np.asarray(matrix, np.float64)
  if g.ndim != 2 or g.shape[0] != g.shape[1]:
    raise ValueError(f"matrix must be square [P, P], got shape {g.shape}")
  s, u = np.linalg.eigh(g)
  return DenseState(np.maximum(s, 0.0), u)


def dense_damping(state: DenseState, damping: float | None = None, *,
                  damping_factor: float = 0.1):
  """λ: ``damping``, or ``damping_factor`` × the mean eigenvalue when it is None."""
  check_damping(damping)
  return damping_factor * jnp.mean(state.eigvals) if damping is None else damping


def dense_state_inverse_vp(state: DenseState, v: Params, damping: float | None = None, *,
                           damping_factor: float = 0.1) -> Params:
  """(G + λI)⁻¹ v = U diag(1/(s + λ)) Uᵀ v for an eigendecomposed G.

  Args:
    state: ``dense_state(G)``.
    v: a params-shaped vector (``ravel_pytree`` order matches G's rows).
    damping: λ ≥ 0; None: ``damping_factor`` × the mean eigenvalue.
    damping_factor: the 0.1 of the default.

  Returns:
    (G + λI)⁻¹ v, shaped like ``v``.
  """
  flat, unravel = ravel_pytree(v)
  if state.eigvals.shape != (flat.size,):
    raise ValueError(f"the dense curvature has P = {state.eigvals.shape[0]} parameters but v "
                     f"has {flat.size}")
  lam = dense_damping(state, damping, damping_factor=damping_factor)
  u = jnp.asarray(state.eigvecs, flat.dtype)
  s = jnp.asarray(state.eigvals, flat.dtype)
  return unravel(u @ ((u.T @ flat) / (s + lam)))


def dense_ggn(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws, *,
              batch_size: int | None = None, progress: Progress | None = None,
              wrt: Selector = None, mesh=None):
  """G as a dense [P, P] matrix, 2/(D N K) Σ_{i,k} J_ikᵀ J_ik (small models only).

  Rows and columns follow ``ravel_pytree(params)``. Run under float64 for a
  reference. Each pair's Jacobian J_ik [D, P] is built by reverse mode (D
  cotangents; forward mode when P < D), and the sum runs ``batch_size`` examples
  at a time, so J exists for one batch of pairs only: [batch · K · D, P].

  Args:
    apply_fn, params, schedule: as in ``ggn_matvec``.
    x0: training images [N, H, W, C].
    draws: the K fixed (t, ε) draws.
    batch_size: examples per batch (None: all N at once).
    progress: called after each batch (``jattr.progress``).
    wrt: the parameters θ_S of G (module docstring; ``None``: all).
    mesh: a ``jax.sharding.Mesh``: the examples split over its ``"data"`` axis,
      one partial sum per device, added at the end (``jattr.devices``); ``None``:
      ``jattr.devices.current_mesh()``.

  Returns:
    G, shape [P, P] (P = P_S with ``wrt``).
  """
  check_examples(x0, draws)
  apply_fn, params = restrict(apply_fn, params, wrt)
  flat, unravel = ravel_pytree(params)
  dim = math.prod(draws.eps.shape[1:])
  jacobian = jax.jacrev if dim < flat.size else jax.jacfwd

  def pair_jacobian(flat, x, t, eps):  # J_ik, [D, P]
    one = jax.tree.map(lambda a: a[None], x)
    return jacobian(lambda f: _outputs(apply_fn, unravel(f), schedule, one, t[None],
                                       eps[None]).reshape(-1))(flat)

  k = draws.num_draws

  def ggn_sum(args, xb, mask):  # Σ over the chunk's unmasked pairs of J_ikᵀ J_ik
    flat, draws = args
    jac = jax.vmap(pair_jacobian, (None, 0, 0, 0))(flat, *example_draw_pairs(xb, draws))
    jac = jac * jnp.repeat(mask, k).astype(jac.dtype)[:, None, None]
    jac = jac.reshape(-1, flat.size)
    return jac.T @ jac

  n = conditioning.count(x0)
  batch = n if batch_size is None else int(batch_size)
  if batch < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  total = sum_chunks(ggn_sum, (flat, draws), x0, chunk_size=batch, progress=progress,
                     desc="dense GGN", mesh=mesh)
  host_memory.release_free_memory()
  return (2.0 / (dim * n * draws.num_draws)) * total


def dense_hessian(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws,
                  parameterization: Parameterization = "eps", *, wrt: Selector = None):
  """The exact Hessian ∇²L of ``training_loss`` as a dense [P, P] matrix.

  Equals ``dense_ggn`` when the model is linear in θ (or where the residuals
  f − y vanish); otherwise differs by the residual-weighted second derivatives
  of the network, which can make it indefinite.

  ``wrt``: the Hessian in the selected parameters only (the [S, S] block), as for
  ``dense_ggn``.

  Returns:
    ∇²L, shape [P, P], rows in ``ravel_pytree(params)`` order.
  """
  apply_fn, params = restrict(apply_fn, params, wrt)
  flat, unravel = ravel_pytree(params)
  loss = lambda f, x0, draws: training_loss(apply_fn, unravel(f), schedule, x0, draws,
                                            parameterization)
  return jax.jit(jax.hessian(loss))(flat, x0, draws)


def dense_operator(matvec: Callable[[Params], Params], params: Params):
  """Materialises a linear map on params-shaped vectors as a [P, P] matrix.

  Column j is ``matvec(e_j)`` with e_j the j-th unit vector of
  ``ravel_pytree(params)``; use it to compare an approximation (e.g.
  ``functools.partial(kfac_matvec, state)``) with ``dense_ggn`` on small models.
  """
  flat, unravel = ravel_pytree(params)
  eye = jnp.eye(flat.size, dtype=flat.dtype)
  cols = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0])(eye)
  return cols.T


def dense_inverse_vp(matrix, v: Params, damping: float | None = None, *,
                     damping_factor: float = 0.1) -> Params:
  """(M + λ I)⁻¹ v for a dense curvature M (e.g. ``dense_ggn``, ``dense_hessian``).

  Args:
    matrix: M, [P, P] in ``ravel_pytree`` order of ``v``.
    v: a params-shaped vector.
    damping: λ ≥ 0; ``None`` uses 0.1 × the mean eigenvalue of M (0.1·tr(M)/P).
    damping_factor: the 0.1 of the default (used only when ``damping`` is None).

  Returns:
    (M + λ I)⁻¹ v, shaped like ``v``.
  """
  check_damping(damping)
  flat, unravel = ravel_pytree(v)
  if matrix.shape != (flat.size, flat.size):
    raise ValueError(f"matrix must have shape [P, P] = {(flat.size, flat.size)} for this v, "
                     f"got {matrix.shape}")
  lam = damping_factor * jnp.trace(matrix) / flat.size if damping is None else damping
  return unravel(jnp.linalg.solve(matrix + lam * jnp.eye(flat.size, dtype=matrix.dtype), flat))
