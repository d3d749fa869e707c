"""Influence-function scores for diffusion models (K-FAC / EK-FAC influence).

With the training loss L(θ) = 1/N Σ_i ℓ_i(θ), ℓ_i the diffusion loss of example i
averaged over the K fixed (t, ε) draws (``measurement_fn("loss")``), and a
measurement m_q(θ) of query q (any of ``jattr.diffusion.measurements.MEASUREMENTS``),
the influence score is

    τ[q, i] = ∇m_q(θ)ᵀ (G + λ I)⁻¹ ∇ℓ_i(θ),

G the GGN of L (``jattr.curvature``) or an approximation of it. Sign and scale:
removing example i and retraining moves the measurement by

    m_q(θ₋ᵢ) − m_q(θ) ≈ τ[q, i] / N

(one Newton step from θ on L − ℓ_i/N, docs/influence.md), so with m = loss a
positive τ marks a training example that *lowers* the query's loss (a proponent).
This is the sign of TRAK's φ_qᵀ(ΦᵀΦ + λI)⁻¹φ_i (``jattr.methods.trak``).

With respect to a subset θ_S of the parameters (``jattr.wrt``; the LoRA adapter,
the last layers), every gradient is ∇_{θ_S} and C is the curvature of L in θ_S
alone, the other parameters held fixed: fit it with the same selector
(``fit_kfac``, ``fit_ekfac``, ``fit_diagonal``, ``dense_ggn``: all take ``wrt=``) and
pass that selector to ``influence(..., wrt=...)``.

Split as elsewhere: the curvature is fitted once (``jattr.curvature.fit_kfac``,
``fit_ekfac``, ``fit_diagonal``; ``None`` = identity), the Q query gradients are
preconditioned once (``precondition``), and the training gradients are computed
tile by tile and dotted with them (``influence``), so memory is bounded by the tile
size and never grows with N.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jattr.curvature.inverse_vp import InverseVP, inverse_vp_fn
from jattr.curvature.kfac import DEFAULT_DAMPING_FACTOR
from jattr.diffusion.checks import check_finite_params
from jattr.diffusion import conditioning
from jattr.diffusion.draws import Draws
from jattr.diffusion.measurements import measurement_fn
from jattr.diffusion.schedules import Schedule
from jattr.grads.per_example import apply_chunks, flatten_per_example, per_example_grads
from jattr.methods.scoring import tiled_scores
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.types import ApplyFn, Parameterization, Params
from jattr.wrt import Selector, describe, restrict

def _leading(tree, name: str) -> int:
  leaves = jax.tree.leaves(tree)
  if not leaves or any(jnp.ndim(x) < 1 for x in leaves):
    raise ValueError(f"{name} must be a pytree of arrays with a leading example axis")
  sizes = {x.shape[0] for x in leaves}
  if len(sizes) != 1:
    raise ValueError(f"every leaf of {name} must have the same leading axis, got {sorted(sizes)}")
  return sizes.pop()


def _preconditioned_rows(ivp, grads):
  """A chunk of Ψ: the curvature ``ivp`` (a ``Partial``) travels as a jit argument."""
  return flatten_per_example(jax.vmap(ivp)(grads))


@dataclasses.dataclass(frozen=True)
class _PreconditionedRows:
  """A chunk of Ψ for an ``inverse_vp`` that is a plain (static) function."""

  ivp: Callable

  def __call__(self, _, grads):
    return flatten_per_example(jax.vmap(self.ivp)(grads))


@dataclasses.dataclass(frozen=True)
class _TrainRows:
  """τ[:, chunk]ᵀ [c, Q] from a chunk's training gradients [c, P] and Ψ [Q, P]
  (hashable by the loss: a second ``influence`` call reuses the compiled program)."""

  loss_fn: Callable

  def __call__(self, args, xt):
    p, psi = args
    g = flatten_per_example(jax.vmap(jax.grad(self.loss_fn), in_axes=(None, 0))(p, xt))
    return g.astype(psi.dtype) @ psi.T


def precondition(query_grads: Params, inverse_vp: InverseVP, *,
                 chunk_size: int | None = None) -> jax.Array:
  """ψ_q = (C + λ I)⁻¹ ∇m_q for every query, flattened.

  Called eagerly with chunk_size < Q, the chunks run from a host loop over one
  compiled chunk program (``jattr.grads.loop_chunks``); under ``jit`` with ``lax.map``.

  Args:
    query_grads: params-like pytree with a leading axis Q (``per_example_grads``).
    inverse_vp: from ``inverse_vp_fn``.
    chunk_size: queries per ``vmap`` of ``inverse_vp``.

  Returns:
    Ψ, [Q, P], rows in ``ravel_pytree`` order (as ``flatten_per_example``).
  """
  _leading(query_grads, "query_grads")
  if isinstance(inverse_vp, Partial):  # the curvature travels as a jit argument
    return apply_chunks(_preconditioned_rows, inverse_vp, query_grads, chunk_size=chunk_size)
  return apply_chunks(_PreconditionedRows(inverse_vp), None, query_grads,
                      chunk_size=chunk_size)


def influence_scores(query_grads: Params, train_grads, inverse_vp: InverseVP, *,
                     tile: tuple[int, int] = (1024, 8192),
                     chunk_size: int | None = None) -> jax.Array:
  """τ[q, i] = ∇m_qᵀ (C + λ I)⁻¹ ∇ℓ_i from precomputed gradients.

  The Q query gradients are preconditioned once, then dotted with the training
  gradients tile by tile (``jattr.methods.scoring.tiled_scores``). For a
  training set whose gradients do not fit in memory use ``influence``.

  Args:
    query_grads: ∇m_q, params-like with leading axis Q.
    train_grads: ∇ℓ_i, params-like with leading axis N, or flat [N, P]
      (``per_example_flat_grads``).
    inverse_vp: from ``inverse_vp_fn``.
    tile: (tile_q, tile_n) of the score assembly.
    chunk_size: queries per ``vmap`` of ``inverse_vp``.

  Returns:
    τ, [Q, N].
  """
  psi = precondition(query_grads, inverse_vp, chunk_size=chunk_size)
  if isinstance(train_grads, (jax.Array, np.ndarray)) and train_grads.ndim == 2:
    train = jnp.asarray(train_grads)
  else:
    _leading(train_grads, "train_grads")
    train = flatten_per_example(train_grads)
  if train.shape[1] != psi.shape[1]:
    raise ValueError(f"train_grads have P={train.shape[1]} parameters, query_grads "
                     f"P={psi.shape[1]}")
  return tiled_scores(psi, train.astype(psi.dtype), *tile)


def _check_curvature_fits(inverse_vp: InverseVP, params: Params, wrt: Selector) -> None:
  """Raises ValueError, before any gradient, unless (C + λI)⁻¹ accepts a vector shaped
  like ``params`` (the selected leaves): a curvature fitted with another ``wrt``."""
  try:
    jax.eval_shape(inverse_vp, params)
  except (ValueError, TypeError) as e:
    n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    raise ValueError(
        f"the curvature does not fit the parameters the gradients are taken with respect to "
        f"(wrt={describe(wrt)!r}: {len(jax.tree.leaves(params))} leaves, {n:,} parameters): "
        f"{e}. Fit the curvature with the same wrt") from None


def _check_images(x, draws: Draws, name: str):
  x, cond = conditioning.split(x)
  conditioning.check_cond(cond, jnp.shape(x)[0] if jnp.ndim(x) else 0, f"{name}'s cond")
  if jnp.ndim(x) != draws.eps.ndim or tuple(x.shape[1:]) != tuple(draws.eps.shape[1:]):
    raise ValueError(f"{name} must have shape [N, {', '.join(map(str, draws.eps.shape[1:]))}] "
                     f"(the draws' image shape), got {tuple(jnp.shape(x))}")


def influence(apply_fn: ApplyFn, params: Params, schedule: Schedule, draws: Draws, train_x0,
              query_x0, curvature=None, *, measurement: str = "loss",
              damping: float | None = None, damping_factor: float = DEFAULT_DAMPING_FACTOR,
              parameterization: Parameterization = "eps",
              time: int | None = None, weights=None, query_draws: Draws | None = None,
              tile_size: int = 256, chunk_size: int | None = None,
              out: np.ndarray | None = None, progress: Progress | None = None,
              wrt: Selector = None) -> jax.Array:
  """τ[q, i] = ∇m_qᵀ (C + λ I)⁻¹ ∇ℓ_i for all queries and training examples.

  m_q = ``measurement_fn(measurement, ...)`` on query q (averaged over
  ``query_draws``, default ``draws``); ℓ_i = ``measurement_fn("loss", ...)`` on
  training example i, averaged over ``draws`` (use the draws the curvature was
  fitted with). Training gradients are computed ``chunk_size`` examples at a time
  (one ``vmap``) and dotted with the preconditioned queries inside the same compiled
  chunk program, run from a host loop (``jattr.grads.loop_chunks``); the scores come
  back ``tile_size`` training examples at a time. Peak memory is about
  (Q + chunk_size)·P + Q·tile_size (chunk_size ``None``: tile_size in place of it).

  Args:
    apply_fn: ``apply_fn(params, x_t [B,H,W,C], t [B]) -> [B,H,W,C]``.
    params: the trained parameters θ.
    schedule: the noise schedule.
    draws: the K fixed (t, ε) draws of the training loss.
    train_x0: training images [N, H, W, C], or conditional examples ``(x0, cond)``
      (``jattr.diffusion.conditioning``; then ``apply_fn`` takes ``cond``).
    query_x0: query images [Q, H, W, C] (held-out or generated), or ``(x0, cond)``:
      a generated query carries the condition it was sampled with.
    curvature: see ``inverse_vp_fn`` (``None``: identity, i.e. grad-dot).
    measurement: the query measurement's name (``MEASUREMENTS``).
    damping: λ; ``None`` for the curvature's default.
    damping_factor: the factor of that default (``inverse_vp_fn``).
    parameterization: how the network output is read.
    time, weights: extra arguments of ``loss_at_time`` / ``weighted_loss``.
    query_draws: the draws of the measurement (default ``draws``).
    tile_size: training examples per gradient tile.
    chunk_size: examples per ``vmap`` inside a tile (and queries per vmap).
    out: optional host array [Q, N] the tiles are written into as they are made
      (then only one tile of scores is on the device at a time).
    progress: called after each training tile (``jattr.progress``).
    wrt: the parameters θ_S of the gradients (``jattr.wrt``; ``None``: all), the
      others held fixed; ``curvature`` must have been fitted with the same selector
      (its dimension is checked against the selection before any gradient).

  Returns:
    τ, [Q, N]; τ/N ≈ m_q(θ₋ᵢ) − m_q(θ). ``out`` itself when given.

  Raises:
    ValueError: the curvature does not fit the selected parameters, ``wrt``
      selects nothing, or the inputs are malformed.
  """
  check_finite_params(params)  # a diverged model gives NaN scores, not an answer
  _check_images(train_x0, draws, "train_x0")
  _check_images(query_x0, draws if query_draws is None else query_draws, "query_x0")
  if int(tile_size) < 1:
    raise ValueError(f"tile_size must be >= 1, got {tile_size}")
  # One selection for everything: the gradients below are with respect to θ_S.
  apply_fn, params = restrict(apply_fn, params, wrt)
  inverse_vp = inverse_vp_fn(curvature, damping, damping_factor=damping_factor)
  if wrt is not None:
    _check_curvature_fits(inverse_vp, params, wrt)
  m_fn = measurement_fn(measurement, apply_fn, schedule,
                        draws if query_draws is None else query_draws,
                        parameterization=parameterization, time=time, weights=weights)
  loss_fn = measurement_fn("loss", apply_fn, schedule, draws, parameterization=parameterization)
  query_grads = per_example_grads(m_fn, params, query_x0, chunk_size=chunk_size)
  psi = precondition(query_grads, inverse_vp, chunk_size=chunk_size)
  del query_grads

  train_rows = _TrainRows(loss_fn)

  def tile_scores(p, psi, xt):
    # One compiled chunk program for every chunk of every tile (a host loop when
    # chunk_size < tile_size; jattr.grads.loop_chunks).
    return apply_chunks(train_rows, (p, psi), xt, chunk_size=chunk_size).T

  n, q = conditioning.count(train_x0), conditioning.count(query_x0)
  if out is not None and out.shape != (q, n):
    raise ValueError(f"out must have shape [Q, N] = {(q, n)}, got {out.shape}")
  report = resolve_progress(progress)
  tn = min(int(tile_size), n)
  tiles = []
  for start in range(0, n, tn):
    # The last tile is shifted back to end at N (one compiled shape); drop the overlap.
    s = min(start, n - tn)
    tile = tile_scores(params, psi, conditioning.rows(train_x0, s, s + tn))[:, start - s:]
    if out is None:
      tiles.append(tile)
    else:
      out[:, start:start + tile.shape[1]] = np.asarray(tile)
    report("influence", min(start + tn, n), n)
  return out if out is not None else jnp.concatenate(tiles, axis=1)
