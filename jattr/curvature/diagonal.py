"""The simplest curvature approximations: the diagonal of G, and the identity.

Diagonal: keep only diag(G) = 1/(N K) Σ_r γ_r ⊙ γ_r over the GGN rows of
``jattr.curvature.ggn.ggn_sqrt_grads`` (exact with ``"ggn_exact"``, unbiased with
the sampled modes; ``"fisher_empirical"`` gives the empirical-Fisher diagonal
1/(N K) Σ_{i,k} ∇ℓ_ik ⊙ ∇ℓ_ik, the per-draw loss gradients squared). Then
(diag(G) + λ I)⁻¹ is an elementwise division.

Identity: G ≈ I. The influence score becomes the plain gradient dot product
∇m_qᵀ ∇ℓ_i (grad-dot, TracIn at a single checkpoint with unit step); damping is
meaningless there and ignored.

Same split as K-FAC: ``fit_diagonal`` once, ``diagonal_inverse_vp`` per vector.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattr.curvature.ggn import (DEFAULT_ESTIMATION_MODE, EstimationMode, accumulate_sqrt_grads,
                                 check_damping)
from jattr.curvature.kfac import DEFAULT_DAMPING_FACTOR
from jattr.diffusion.draws import Draws
from jattr.diffusion.schedules import Schedule
from jattr.progress import Progress
from jattr.types import ApplyFn, Parameterization, Params
from jattr.wrt import Selector, restrict


class DiagonalState(NamedTuple):
  """diag(G), a pytree shaped like the parameters."""

  diag: Params


def _sum_of_squares(rows, _):
  """Σ_r γ_r², leaf by leaf (module-level: refits reuse the compiled pass)."""
  return jax.tree.map(lambda g: jnp.sum(jnp.square(g), axis=0), rows)


def fit_diagonal(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws, *,
                 estimation_mode: EstimationMode = DEFAULT_ESTIMATION_MODE,
                 key: jax.Array | None = None, num_samples: int = 1, batch_size: int | None = None,
                 chunk_size: int | None = None,
                 parameterization: Parameterization = "eps",
                 progress: Progress | None = None, wrt: Selector = None) -> DiagonalState:
  """diag(G) = 1/(N K) Σ_r γ_r², accumulated ``batch_size`` examples at a time.

  With ``wrt`` (``jattr.wrt``) only the selected leaves θ_S are differentiated (the
  others held fixed): the state is diag(G) on θ_S, shaped like
  ``jattr.wrt.split(params, wrt)`` (``None`` at the unselected leaves), the entries
  of the full diagonal there.

  Args:
    apply_fn, params, schedule: as in ``jattr.curvature.ggn``.
    x0: training images [N, H, W, C].
    draws: the K fixed (t, ε) draws.
    estimation_mode: ``ggn.ESTIMATION_MODES``; ``"fisher_empirical"`` for the
      empirical Fisher diagonal.
    key, num_samples: of the sampled modes.
    batch_size: examples per pass; chunk_size: rows per ``vmap``.
    parameterization: only ``"fisher_empirical"`` uses it.
    progress: called after each batch with examples done, stage ``"diagonal"``
      (``jattr.progress``).
    wrt: the parameters of the diagonal (``None``: all).

  Returns:
    A ``DiagonalState``.
  """
  apply_fn, params = restrict(apply_fn, params, wrt)
  diag = accumulate_sqrt_grads(
      _sum_of_squares, None,
      apply_fn, params, schedule, x0, draws, estimation_mode=estimation_mode, key=key,
      num_samples=num_samples, batch_size=batch_size, chunk_size=chunk_size,
      parameterization=parameterization, progress=progress, desc="diagonal")
  return DiagonalState(diag)


def _check_like(state: DiagonalState, v: Params):
  if jax.tree.structure(v) != jax.tree.structure(state.diag) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(state.diag))):
    raise ValueError(
        "v must be shaped like the parameters of the diagonal state, got leaves "
        f"{[x.shape for x in jax.tree.leaves(v)]}, expected "
        f"{[x.shape for x in jax.tree.leaves(state.diag)]}")


def diagonal_inverse_vp(state: DiagonalState, v: Params, damping: float | None = None, *,
                        damping_factor: float = DEFAULT_DAMPING_FACTOR) -> Params:
  """(diag(G) + λ I)⁻¹ v.

  Args:
    state: from ``fit_diagonal``.
    v: a params-shaped vector.
    damping: λ ≥ 0; ``None`` uses 0.1 × the mean of diag(G) over all parameters.
    damping_factor: the 0.1 of the default (used only when ``damping`` is None).

  Returns:
    v / (diag(G) + λ), shaped like ``v``.
  """
  check_damping(damping)
  _check_like(state, v)
  if damping is None:
    leaves = jax.tree.leaves(state.diag)
    damping = damping_factor * (sum(jnp.sum(d) for d in leaves)
                                        / sum(d.size for d in leaves))
  return jax.tree.map(lambda d, x: x / (d + damping), state.diag, v)


def diagonal_matvec(state: DiagonalState, v: Params) -> Params:
  """diag(G) ⊙ v."""
  _check_like(state, v)
  return jax.tree.map(jnp.multiply, state.diag, v)


def identity_inverse_vp(state: None, v: Params, damping: float | None = None) -> Params:
  """G ≈ I: returns v unchanged (``state`` and ``damping`` are ignored).

  With it the influence score is the gradient dot product ∇m_qᵀ ∇ℓ_i.
  """
  del state
  check_damping(damping)
  return v
