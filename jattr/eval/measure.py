"""Measurements of query losses under trained models, the y of the LDS.

    y[q] = 1/K Σ_k ℓ(θ; x_q, t_k, ε_k)                              (``measure_loss``)

with the K fixed draws (t_k, ε_k) shared by every model and every query, so that
models differ only through their parameters (``jattr.eval.lds``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jattr.diffusion import conditioning
from jattr.diffusion.draws import Draws
from jattr.diffusion.losses import per_example_loss
from jattr.diffusion.schedules import Schedule
from jattr.grads.per_example import apply_chunks, in_trace, loop_chunks
from jattr.types import ApplyFn, Parameterization, Params


@dataclasses.dataclass(frozen=True)
class _QueryLoss:
  """The chunk kernel of ``measure_loss``: mean loss over the K draws of each query.

  ``args`` = (params, t [K], eps [K, ...]), or (stacked params, m, t, eps) with
  ``member=True`` (model m of a stack, indexed inside the program)."""

  apply_fn: ApplyFn
  schedule: Schedule
  parameterization: str
  member: bool = False

  def __call__(self, args, x):  # x [c, H, W, C], or (x, cond) for a conditional model
    if self.member:
      stacked, m, t, eps = args
      params = jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, m, keepdims=False),
                            stacked)
    else:
      params, t, eps = args
    c, k = conditioning.count(x), t.shape[0]
    x0 = jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), x)  # each query's cond K times
    loss = per_example_loss(self.apply_fn, params, self.schedule, x0, jnp.tile(t, c),
                            jnp.tile(eps, (c,) + (1,) * (eps.ndim - 1)), self.parameterization)
    return loss.reshape(c, k).mean(axis=1)


def measure_loss(apply_fn: ApplyFn, params: Params, schedule: Schedule, images, draws: Draws,
                 *, parameterization: Parameterization = "eps",
                 query_chunk: int = 64) -> jax.Array:
  """y[q] = 1/K Σ_k ℓ(θ; x_q, t_k, ε_k): the loss of each query over fixed draws.

  Args:
    apply_fn, params: ONE model.
    schedule: its noise schedule.
    images: queries [Q, H, W, C], or ``(images, cond)`` for a conditional model.
    draws: the K fixed draws (``jattr.diffusion.fixed_draws``); every query and
      every model sees the same ones.
    parameterization: how the network output is read.
    query_chunk: queries per network call (a call sees query_chunk·K images).
      Called eagerly, the chunks run from a host loop over one compiled chunk
      program; under ``jit``/``lax.map`` (``member_measure_fn``'s traced path) with
      ``lax.map``. The same y either way.

  Returns:
    [Q] mean losses.
  """
  images = _check_queries(images, draws)
  kernel = _QueryLoss(apply_fn, schedule, parameterization)
  args = (params, draws.t, draws.eps.astype(conditioning.images(images).dtype))
  return apply_chunks(kernel, args, images, chunk_size=max(1, int(query_chunk)))


def _check_queries(queries, draws: Draws):
  """The queries as device arrays, images [Q, *image] checked (and any condition)."""
  images, cond = conditioning.split(conditioning.asarray(queries))
  if images.ndim != 4 or images.shape[1:] != draws.eps.shape[1:]:
    raise ValueError(f"images must be [Q, *{tuple(draws.eps.shape[1:])}] (the draws' image "
                     f"shape), got {images.shape}")
  conditioning.check_cond(cond, images.shape[0], "the queries' cond")
  return conditioning.join(images, cond)


def member_measure_fn(apply_fn: ApplyFn, schedule: Schedule, draws: Draws, *,
                      parameterization: Parameterization = "eps", query_chunk: int = 64):
  """``fn(stacked_params, images) -> y [Q, M]`` for models stacked on axis 0.

  Called eagerly, ``fn`` runs a host loop over (model, query chunk) pairs, all
  through ONE compiled program that picks model m and chunk s inside it (both are
  traced arguments), so the models run one after another at the speed of single
  calls. Under a transformation (``fn`` inside a caller's ``jit``) the models run
  with ``lax.map`` inside that program. Build ``fn`` once and call it for every
  batch of models of the same shape, so that it compiles once.
  """
  kernel = _QueryLoss(apply_fn, schedule, parameterization, member=True)

  def traced(stacked_params, images):
    return jax.lax.map(
        lambda one: measure_loss(apply_fn, one, schedule, images, draws,
                                 parameterization=parameterization, query_chunk=query_chunk),
        stacked_params).T

  def fn(stacked_params, images):
    if in_trace(stacked_params, images):
      return traced(stacked_params, images)
    images = _check_queries(images, draws)
    stacked_params = jax.device_put(stacked_params)
    sizes = {x.shape[0] for x in jax.tree.leaves(stacked_params)}
    if len(sizes) != 1:
      raise ValueError(f"stacked_params must share a leading model axis M, got {sorted(sizes)}")
    num_models = sizes.pop()
    t, eps = draws.t, draws.eps.astype(conditioning.images(images).dtype)
    columns = [loop_chunks(kernel, (stacked_params, jnp.int32(m), t, eps), images,
                           chunk_size=max(1, int(query_chunk)))
               for m in range(num_models)]
    return jnp.stack(columns, axis=1)

  return fn


def measure_members(apply_fn: ApplyFn, stacked_params: Params, schedule: Schedule, images,
                    draws: Draws, *, parameterization: Parameterization = "eps",
                    query_chunk: int = 64) -> np.ndarray:
  """``measure_loss`` of each of M models stacked on a leading axis; returns float64 [Q, M]."""
  fn = member_measure_fn(apply_fn, schedule, draws, parameterization=parameterization,
                         query_chunk=query_chunk)
  return np.asarray(fn(stacked_params, jnp.asarray(images)), np.float64)
