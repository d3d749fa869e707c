"""Measurements of query losses under trained models, the y of the LDS.

    y[q] = 1/K Σ_k ℓ(θ; x_q, t_k, ε_k)                              (``measure_loss``)

with the K fixed draws (t_k, ε_k) shared by every model and every query, so that
models differ only through their parameters (``jattr.eval.lds``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jattr.diffusion.draws import Draws
from jattr.diffusion.losses import per_example_loss
from jattr.diffusion.schedules import Schedule
from jattr.grads.per_example import to_chunks
from jattr.types import ApplyFn, Parameterization, Params


def measure_loss(apply_fn: ApplyFn, params: Params, schedule: Schedule, images, draws: Draws,
                 *, parameterization: Parameterization = "eps",
                 query_chunk: int = 64) -> jax.Array:
  """y[q] = 1/K Σ_k ℓ(θ; x_q, t_k, ε_k): the loss of each query over fixed draws.

  Args:
    apply_fn, params: ONE model.
    schedule: its noise schedule.
    images: queries [Q, H, W, C].
    draws: the K fixed draws (``jattr.diffusion.fixed_draws``); every query and
      every model sees the same ones.
    parameterization: how the network output is read.
    query_chunk: queries per network call (a call sees query_chunk·K images).

  Returns:
    [Q] mean losses.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[1:] != draws.eps.shape[1:]:
    raise ValueError(f"images must be [Q, *{tuple(draws.eps.shape[1:])}] (the draws' image "
                     f"shape), got {images.shape}")
  q, k = images.shape[0], draws.num_draws
  eps = draws.eps.astype(images.dtype)

  def one_chunk(x):  # x [c, H, W, C]
    c = x.shape[0]
    x0 = jnp.repeat(x, k, axis=0)
    t = jnp.tile(draws.t, c)
    e = jnp.tile(eps, (c,) + (1,) * (eps.ndim - 1))
    loss = per_example_loss(apply_fn, params, schedule, x0, t, e, parameterization)
    return loss.reshape(c, k).mean(axis=1)

  chunks, _ = to_chunks(images, max(1, min(query_chunk, q)))
  return jax.lax.map(one_chunk, chunks).reshape(-1)[:q]


def member_measure_fn(apply_fn: ApplyFn, schedule: Schedule, draws: Draws, *,
                      parameterization: Parameterization = "eps", query_chunk: int = 64):
  """A compiled ``fn(stacked_params, images) -> y [Q, M]`` for models stacked on axis 0.

  The models run one after another (``lax.map``) inside one program; build the
  function once and call it for every batch of models of the same shape, so that
  it compiles once.
  """

  @jax.jit
  def fn(stacked_params, images):
    return jax.lax.map(
        lambda one: measure_loss(apply_fn, one, schedule, images, draws,
                                 parameterization=parameterization, query_chunk=query_chunk),
        stacked_params).T

  return fn


def measure_members(apply_fn: ApplyFn, stacked_params: Params, schedule: Schedule, images,
                    draws: Draws, *, parameterization: Parameterization = "eps",
                    query_chunk: int = 64) -> np.ndarray:
  """``measure_loss`` of each of M models stacked on a leading axis; returns float64 [Q, M]."""
  fn = member_measure_fn(apply_fn, schedule, draws, parameterization=parameterization,
                         query_chunk=query_chunk)
  return np.asarray(fn(stacked_params, jnp.asarray(images)), np.float64)
