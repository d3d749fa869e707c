"""One training step, compiled segments of steps, and the single-model loop.

Randomness. A model's training stream is one key ``train_key``; step n uses
``fold_in(train_key, n)`` to draw its batch positions, timesteps and noise, so the
stream does not depend on how steps are grouped into segments, and a run resumed
from a checkpoint at step n continues exactly as if it had never stopped.

Subsets. A model trains on ``data[indices[:count]]``: batch positions are
u ~ U[0, 1) mapped to ``indices[floor(u · count)]``. Models given the same key but
different subsets therefore see the same u, t and ε at every step (common random
numbers) and differ only in which examples those positions pick.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jattr.diffusion.losses import batch_loss
from jattr.diffusion.schedules import Schedule
from jattr.io import checkpoint
from jattr.train.state import TrainConfig, TrainState, ema_update, init_state, make_optimizer
from jattr.types import ApplyFn

SegmentFn = Callable[..., tuple[TrainState, jax.Array]]


def draw_batch(key, data, indices, count, batch_size: int, num_timesteps: int):
  """Batch positions, timesteps and noise for one step (see module docstring)."""
  k_pos, k_t, k_eps = jax.random.split(key, 3)
  u = jax.random.uniform(k_pos, (batch_size,))
  pos = jnp.minimum(jnp.floor(u * count).astype(jnp.int32), count - 1)
  x0 = data[indices[pos]]
  t = jax.random.randint(k_t, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  return x0, t, eps


def make_segment_fn(apply_fn: ApplyFn, schedule: Schedule, config: TrainConfig,
                    optimizer: optax.GradientTransformation | None = None) -> SegmentFn:
  """Builds ``segment(state, data, indices, count, train_key, num_steps)``.

  The returned function runs ``num_steps`` (static) optimizer steps of ONE model
  with ``lax.scan`` and returns ``(state, losses [num_steps])``. It is pure, so it
  can be jitted as is or mapped over a member axis (see ``train_many``).
  """
  optimizer = optimizer or make_optimizer(config)

  def step(carry, _):
    state, data, indices, count, train_key = carry
    key = jax.random.fold_in(train_key, state.step)
    x0, t, eps = draw_batch(key, data, indices, count, config.batch_size,
                            schedule.num_timesteps)
    loss, grads = jax.value_and_grad(
        lambda p: batch_loss(apply_fn, p, schedule, x0, t, eps, config.parameterization))(
            state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, state.step, config.ema_decay)
    new = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    return (new, data, indices, count, train_key), loss

  def segment(state, data, indices, count, train_key, num_steps: int):
    (state, *_), losses = jax.lax.scan(step, (state, data, indices, count, train_key), None,
                                       length=num_steps)
    return state, losses

  return segment


def _segments(start: int, total: int, size: int):
  """(start, length) of each remaining segment; the last may be shorter."""
  return [(s, min(size, total - s)) for s in range(start, total, size)]


def train(apply_fn: ApplyFn, params, schedule: Schedule, data, config: TrainConfig,
          train_key: jax.Array, *, indices=None, checkpoint_dir: str | os.PathLike | None = None,
          meta: dict | None = None, progress: bool = True) -> tuple[TrainState, np.ndarray]:
  """Trains one denoiser; resumable when ``checkpoint_dir`` is given.

  Args:
    apply_fn, params: the model and its initial parameters.
    schedule: the noise schedule.
    data: training images [N, H, W, C].
    config: the recipe.
    train_key: PRNG key of the training stream (see module docstring).
    indices: optional int array selecting the training subset (default: all N).
    checkpoint_dir: if given, the state is saved after every segment and a run
      finding a checkpoint there continues from it (with identical results).
    meta: extra JSON-able metadata stored with each checkpoint and checked on
      resume (e.g. the model config).
    progress: show a progress bar.

  Returns:
    ``(state, losses)``: the final state and the loss of every step [num_steps].
  """
  data = jnp.asarray(data)
  if data.ndim != 4:
    raise ValueError(f"data must be [N, H, W, C], got shape {data.shape}")
  indices = jnp.arange(data.shape[0], dtype=jnp.int32) if indices is None else jnp.asarray(
      indices, jnp.int32)
  count = jnp.asarray(indices.shape[0], jnp.int32)
  optimizer = make_optimizer(config)
  segment = jax.jit(make_segment_fn(apply_fn, schedule, config, optimizer),
                    static_argnames="num_steps")
  state = init_state(params, optimizer)
  losses: list[float] = []
  job = {"kind": "train", "config": _config_dict(config), "n": int(indices.shape[0]),
         "key": np.asarray(jax.random.key_data(train_key)).tolist(), **(meta or {})}
  if checkpoint_dir is not None and checkpoint.latest_step(checkpoint_dir) is not None:
    state, saved, _ = checkpoint.restore(checkpoint_dir, state)
    _check_same_job(checkpoint_dir, saved.get("job"), job)
    losses = list(saved["losses"])
  start = int(state.step)
  bar = tqdm(total=config.num_steps, initial=start, desc="train", disable=not progress,
             unit="step")
  for _, length in _segments(start, config.num_steps, config.segment_steps):
    state, seg_losses = segment(state, data, indices, count, train_key, num_steps=length)
    losses.extend(np.asarray(seg_losses).tolist())
    bar.update(length)
    bar.set_postfix(loss=f"{np.mean(seg_losses):.4f}")
    if checkpoint_dir is not None:
      checkpoint.save(checkpoint_dir, int(state.step), state, {"job": job, "losses": losses})
  bar.close()
  return state, np.asarray(losses, np.float32)


def _config_dict(config) -> dict:
  import dataclasses
  return {k: (list(v) if isinstance(v, tuple) else v)
          for k, v in dataclasses.asdict(config).items()}


def _check_same_job(directory, saved: dict | None, job: dict) -> None:
  if saved != job:
    raise ValueError(
        f"checkpoint in {os.fspath(directory)!r} was written by a different job; "
        f"saved: {saved}, now: {job}. Use another directory or delete it.")
