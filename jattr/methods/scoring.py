"""Tiled computation of score matrices τ[q, i] = s(a_q, b_i).

A score matrix between Q queries and N training examples can be far larger than the
features it is computed from (e.g. 10⁴ × 10⁶). Both functions here evaluate it one
tile of at most tile_q × tile_n entries at a time:

- ``tiled_scores`` keeps the output on the device: the [Q, N] result is the only
  large buffer, written tile by tile in place (``lax.fori_loop`` with
  ``dynamic_update_slice``).
- ``tiled_scores_into`` writes each tile into a caller-owned numpy array, e.g. a
  ``np.memmap``, so the full Q × N can live on disk; the device holds one tile.

A tile function ``fn(a [tq, k], b [tn, k]) -> [tq, tn]`` must compute each entry from
its own row pair only (``a @ b.T`` by default), since edge tiles are shifted back to
stay inside the matrix and recompute some entries.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec

from jattr import devices
from jattr.grads.per_example import in_trace
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress

TileFn = Callable[[jax.Array, jax.Array], jax.Array]
"""``fn(a [tq, k], b [tn, k]) -> [tq, tn]``."""


def dot_scores(a: jax.Array, b: jax.Array) -> jax.Array:
  """τ[q, i] = a_qᵀ b_i."""
  return a @ b.T


def _check(query, train, tile_q, tile_n):
  if query.ndim != 2 or train.ndim != 2 or query.shape[1] != train.shape[1]:
    raise ValueError(f"query and train must have shapes [Q, k] and [N, k], got {query.shape} "
                     f"and {train.shape}")
  for name, v in (("tile_q", tile_q), ("tile_n", tile_n)):
    if int(v) < 1:
      raise ValueError(f"{name} must be a positive int, got {v}")


def tiled_scores(query: jax.Array, train: jax.Array, tile_q: int = 1024, tile_n: int = 8192,
                 fn: TileFn = dot_scores, *, mesh=None) -> jax.Array:
  """τ = [fn(query tile, train tile)] assembled on the device, tile by tile.

  One compiled program (a ``lax.fori_loop`` over the tiles): there is no host loop
  to report progress from; ``tiled_scores_into`` has one.

  Args:
    query: [Q, k].
    train: [N, k].
    tile_q, tile_n: tile shape; intermediates never exceed tile_q × tile_n entries.
    fn: the tile function (default ``dot_scores``).
    mesh: a ``jax.sharding.Mesh`` (``None``: ``jattr.devices.current_mesh()``).
      On a mesh, called eagerly, the training rows are split over its ``"data"``
      axis and every device tiles its own columns of τ against all the queries
      (replicated); the columns are gathered on one device.

  Returns:
    τ, shape [Q, N].
  """
  _check(query, train, tile_q, tile_n)
  if not in_trace(query, train):
    mesh = devices.current_mesh(mesh)
    if mesh is not None:
      return _sharded_scores(query, train, int(tile_q), int(tile_n), fn, mesh)
  return _tiled_scores(query, train, int(tile_q), int(tile_n), fn)


def _sharded_scores(query, train, tile_q, tile_n, fn, mesh):
  n = train.shape[0]
  train, block = devices.pad_rows(train, n, devices.data_size(mesh))
  train = devices.put(train, devices.split_rows(mesh))
  query = devices.put_args(query, mesh)
  tau = _sharded_tiles(query, train, tile_q, tile_n, fn, mesh)
  return devices.to_host_device(tau[:, :n] if tau.shape[1] != n else tau, mesh)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _sharded_tiles(query, train, tile_q, tile_n, fn, mesh):
  body = lambda q, b: _tiled_scores(q, b, tile_q, tile_n, fn)  # noqa: E731
  return jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(devices.DATA)),
                       out_specs=PartitionSpec(None, devices.DATA),
                       axis_names=frozenset({devices.DATA}), check_vma=False)(query, train)


@functools.partial(jax.jit, static_argnames=("tile_q", "tile_n", "fn"))
def _tiled_scores(query, train, tile_q, tile_n, fn):
  nq_total, nn_total = query.shape[0], train.shape[0]
  tq, tn = min(int(tile_q), nq_total), min(int(tile_n), nn_total)
  nq, nn = -(-nq_total // tq), -(-nn_total // tn)
  out_dtype = jax.eval_shape(fn, query[:tq], train[:tn]).dtype

  def body(idx, out):
    # The last tile of each axis starts at (size − tile) instead of running past the
    # end, so every tile has the same static shape.
    qs = jnp.minimum((idx // nn) * tq, nq_total - tq)
    ns = jnp.minimum((idx % nn) * tn, nn_total - tn)
    a = jax.lax.dynamic_slice_in_dim(query, qs, tq)
    b = jax.lax.dynamic_slice_in_dim(train, ns, tn)
    return jax.lax.dynamic_update_slice(out, fn(a, b).astype(out_dtype), (qs, ns))

  return jax.lax.fori_loop(0, nq * nn, body, jnp.zeros((nq_total, nn_total), out_dtype))


def tiled_scores_into(out: np.ndarray, query, train, tile_q: int = 1024, tile_n: int = 8192,
                      fn: TileFn = dot_scores, *,
                      progress: Progress | None = None) -> np.ndarray:
  """Writes τ = [fn(query tile, train tile)] into ``out`` (numpy array or memmap).

  Each tile is computed on the device and copied into ``out[q0:q1, n0:n1]``; the
  inputs may themselves be numpy arrays or memmaps (tiles are moved to the device
  one at a time).

  Args:
    out: preallocated array [Q, N], written in place.
    query: [Q, k].
    train: [N, k].
    tile_q, tile_n: tile shape.
    fn: the tile function (default ``dot_scores``).
    progress: called after each tile is written, with tiles done out of
      ⌈Q/tile_q⌉·⌈N/tile_n⌉, stage ``"scores"`` (``jattr.progress``).

  Returns:
    ``out``.
  """
  _check(query, train, tile_q, tile_n)
  nq_total, nn_total = query.shape[0], train.shape[0]
  if tuple(out.shape) != (nq_total, nn_total):
    raise ValueError(f"out must have shape [Q, N]=({nq_total}, {nn_total}), got {out.shape}")
  tq, tn = min(int(tile_q), nq_total), min(int(tile_n), nn_total)
  tile_fn = jax.jit(fn)
  report = resolve_progress(progress)
  total, done = -(-nq_total // tq) * -(-nn_total // tn), 0
  for q0 in range(0, nq_total, tq):
    # Same shifted-edge tiles as tiled_scores: one compiled shape.
    q0 = min(q0, nq_total - tq)
    a = jnp.asarray(query[q0:q0 + tq])
    for n0 in range(0, nn_total, tn):
      n0 = min(n0, nn_total - tn)
      out[q0:q0 + tq, n0:n0 + tn] = np.asarray(tile_fn(a, jnp.asarray(train[n0:n0 + tn])))
      done += 1
      report("scores", done, total)
  return out
