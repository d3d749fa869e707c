"""Baseline attribution scores: pixel similarity, gradient dot/cosine, TracIn.

    pixel_cosine[q, i] = ⟨x_q, x_i⟩ / (‖x_q‖ ‖x_i‖)        (images flattened)
    grad_dot[q, i]     = g_qᵀ g_i
    grad_cosine[q, i]  = g_qᵀ g_i / (‖g_q‖ ‖g_i‖)
    tracin[q, i]       = Σ_c η_c g_{q,c}ᵀ g_{i,c}             (c over checkpoints)

g may be full or projected gradients (``jattr.features``); with projected ones
the scores are the JL estimates of the full ones. A zero vector has cosine 0 with
everything (its norm is floored at the smallest normal number of the dtype).
All are computed with ``jattr.methods.scoring.tiled_scores``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattr.methods.scoring import dot_scores, tiled_scores, tiled_scores_into


def _check_pair(a, b, names):
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"{names[0]} and {names[1]} must have shapes [Q, k] and [N, k], got "
                     f"{a.shape} and {b.shape}")


def normalize_rows(x: jax.Array) -> jax.Array:
  """Each row divided by its L2 norm (rows of norm 0 stay 0)."""
  norm = jnp.linalg.norm(x, axis=1, keepdims=True)
  return x / jnp.maximum(norm, jnp.finfo(x.dtype).tiny)


def pixel_cosine(query_images: jax.Array, train_images: jax.Array, *,
                 tile: tuple[int, int] = (1024, 8192)) -> jax.Array:
  """Cosine similarity of flattened images.

  Args:
    query_images: [Q, ...].
    train_images: [N, ...], same per-image shape.
    tile: (tile_q, tile_n).

  Returns:
    τ, [Q, N].
  """
  if query_images.shape[1:] != train_images.shape[1:]:
    raise ValueError(f"query_images and train_images must share the image shape, got "
                     f"{query_images.shape} and {train_images.shape}")
  q = normalize_rows(jnp.reshape(query_images, (query_images.shape[0], -1)))
  t = normalize_rows(jnp.reshape(train_images, (train_images.shape[0], -1)))
  return tiled_scores(q, t, *tile)


def cosine_scores(a: jax.Array, b: jax.Array) -> jax.Array:
  """cos(a_q, b_i) for every pair of rows: a tile function of the tiled scorers."""
  return dot_scores(normalize_rows(a), normalize_rows(b))


def grad_dot(query_features: jax.Array, train_features: jax.Array, *,
             tile: tuple[int, int] = (1024, 8192), out: np.ndarray | None = None) -> jax.Array:
  """τ[q, i] = g_qᵀ g_i for query [Q, k] and train [N, k] gradients; returns [Q, N].

  With ``out`` (a host array [Q, N], e.g. a memmap), τ is written into it tile by
  tile (``tiled_scores_into``; the inputs may be host arrays too) and returned.
  """
  _check_pair(query_features, train_features, ("query_features", "train_features"))
  if out is not None:
    return tiled_scores_into(out, query_features, train_features, *tile)
  return tiled_scores(query_features, train_features, *tile)


def grad_cosine(query_features: jax.Array, train_features: jax.Array, *,
                tile: tuple[int, int] = (1024, 8192), out: np.ndarray | None = None
                ) -> jax.Array:
  """τ[q, i] = cos(g_q, g_i) for query [Q, k] and train [N, k] gradients; returns [Q, N].

  ``out``: as in ``grad_dot``.
  """
  _check_pair(query_features, train_features, ("query_features", "train_features"))
  if out is not None:
    return tiled_scores_into(out, query_features, train_features, *tile, fn=cosine_scores)
  return tiled_scores(normalize_rows(query_features), normalize_rows(train_features), *tile)


def tracin(checkpoints: Sequence[tuple[jax.Array, jax.Array, float]], *,
           tile: tuple[int, int] = (1024, 8192)) -> jax.Array:
  """TracIn-CP (Pruthi et al. 2020): learning-rate-weighted gradient dots over checkpoints.

  Args:
    checkpoints: C triples (query_features [Q, k_c], train_features [N, k_c], η_c).
    tile: (tile_q, tile_n).

  Returns:
    τ = Σ_c η_c G_{q,c} G_{i,c}ᵀ, [Q, N].
  """
  if len(checkpoints) == 0:
    raise ValueError("checkpoints must hold at least one (query, train, lr) triple")
  total = None
  for query_features, train_features, lr in checkpoints:
    scores = lr * grad_dot(query_features, train_features, tile=tile)
    total = scores if total is None else total + scores
  return total
