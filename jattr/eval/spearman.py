"""Rank correlation along the last axis, vectorised over every leading axis.

Spearman's ρ is Pearson's correlation of the ranks. Ties get the *average* of the
ranks they span ("fractional" ranking, as in ``scipy.stats.rankdata(method="average")``):
for a row x of length n, the 1-based rank of x_j is

    r_j = #{k : x_k < x_j} + (#{k : x_k = x_j} + 1) / 2
        = (#{k : x_k < x_j} + #{k : x_k ≤ x_j} + 1) / 2,

which two binary searches into the sorted row give in O(n log n). Then

    ρ(x, y) = Σ_j (r_j − r̄)(s_j − s̄) / √(Σ_j (r_j − r̄)² Σ_j (s_j − s̄)²).

A row with no spread (all values equal) has no ranking, so its correlation is
undefined and comes back as NaN, as ``scipy.stats.spearmanr`` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _rank_row(x: jax.Array) -> jax.Array:
  s = jnp.sort(x)
  below = jnp.searchsorted(s, x, side="left")
  at_most = jnp.searchsorted(s, x, side="right")
  return (below + at_most + 1).astype(jnp.result_type(x.dtype, jnp.float32)) / 2


def rankdata(x: jax.Array) -> jax.Array:
  """Average ranks (1-based, ties averaged) along the last axis.

  Args:
    x: real array [..., n]; NaNs are not supported.

  Returns:
    Ranks, floating, same shape as ``x``.
  """
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError(f"x must have at least one axis to rank along, got a scalar {x}")
  flat = x.reshape(-1, x.shape[-1])
  return jax.vmap(_rank_row)(flat).reshape(x.shape)


def pearson(x: jax.Array, y: jax.Array) -> jax.Array:
  """Pearson correlation of ``x`` and ``y`` along the last axis.

  Args:
    x, y: real arrays broadcastable to a common shape [..., n], n ≥ 2.

  Returns:
    Correlations [...]; NaN where ``x`` or ``y`` is constant along the axis.
  """
  x, y = jnp.broadcast_arrays(jnp.asarray(x), jnp.asarray(y))
  if x.ndim == 0 or x.shape[-1] < 2:
    raise ValueError(f"x and y need at least 2 entries along the last axis, got shape {x.shape}")
  dx = x - jnp.mean(x, axis=-1, keepdims=True)
  dy = y - jnp.mean(y, axis=-1, keepdims=True)
  sxy = jnp.sum(dx * dy, axis=-1)
  sxx = jnp.sum(dx * dx, axis=-1)
  syy = jnp.sum(dy * dy, axis=-1)
  denom = jnp.sqrt(sxx * syy)
  return jnp.where(denom > 0, sxy / jnp.where(denom > 0, denom, 1), jnp.nan)


def spearman(x: jax.Array, y: jax.Array) -> jax.Array:
  """Spearman rank correlation of ``x`` and ``y`` along the last axis.

  Args:
    x, y: real arrays of the same shape [..., n], n ≥ 2; each row is ranked on its
      own (average ranks for ties).

  Returns:
    ρ, shape [...]; NaN for a row where ``x`` or ``y`` is constant.

  Example:
    >>> spearman(y_measured, y_predicted)   # [Q, M] each -> [Q], one ρ per query
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
  return pearson(rankdata(x), rankdata(y))
