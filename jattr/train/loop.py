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

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jattr.diffusion.checks import check_image_range
from jattr.diffusion.losses import batch_loss
from jattr.diffusion.schedules import Schedule
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.train.checkpointer import Checkpointer, check_same_job, config_dict
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


StepFn = Callable[..., tuple[TrainState, jax.Array]]


def make_step_fn(apply_fn: ApplyFn, schedule: Schedule, config: TrainConfig,
                 optimizer: optax.GradientTransformation | None = None) -> StepFn:
  """Builds ``step(state, data, indices, count, train_key) -> (state, loss)``: ONE
  optimizer step of one model (batch, loss, update, EMA), pure."""
  optimizer = optimizer or make_optimizer(config)

  def step(state, data, indices, count, train_key):
    key = jax.random.fold_in(train_key, state.step)
    x0, t, eps = draw_batch(key, data, indices, count, config.batch_size,
                            schedule.num_timesteps)
    loss, grads = jax.value_and_grad(
        lambda p: batch_loss(apply_fn, p, schedule, x0, t, eps, config.parameterization))(
            state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, state.step, config.ema_decay)
    return TrainState(step=state.step + 1, params=params, ema_params=ema,
                      opt_state=opt_state), loss

  return step


def make_segment_fn(apply_fn: ApplyFn, schedule: Schedule, config: TrainConfig,
                    optimizer: optax.GradientTransformation | None = None) -> SegmentFn:
  """Builds ``segment(state, data, indices, count, train_key, num_steps)``.

  The returned function runs ``num_steps`` (static) optimizer steps of ONE model
  (``make_step_fn``) with ``lax.scan`` and returns ``(state, losses [num_steps])``.
  It is pure, so it can be jitted as is or mapped over a member axis (see
  ``train_many``).
  """
  one_step = make_step_fn(apply_fn, schedule, config, optimizer)

  def body(carry, _):
    state, data, indices, count, train_key = carry
    state, loss = one_step(state, data, indices, count, train_key)
    return (state, data, indices, count, train_key), loss

  def segment(state, data, indices, count, train_key, num_steps: int):
    (state, *_), losses = jax.lax.scan(body, (state, data, indices, count, train_key), None,
                                       length=num_steps)
    return state, losses

  return segment


def segments(start: int, total: int, size: int):
  """(start, length) of each remaining segment; the last may be shorter."""
  return [(s, min(size, total - s)) for s in range(start, total, size)]


def train(apply_fn: ApplyFn, params, schedule: Schedule, data, config: TrainConfig,
          train_key: jax.Array, *, indices=None, checkpointer: Checkpointer | None = None,
          meta: dict | None = None, progress: Progress | None = None
          ) -> tuple[TrainState, np.ndarray]:
  """Trains one denoiser; resumable when a ``checkpointer`` is given.

  Args:
    apply_fn, params: the model and its initial parameters.
    schedule: the noise schedule.
    data: training images [N, H, W, C].
    config: the recipe.
    train_key: PRNG key of the training stream (see module docstring).
    indices: optional int array selecting the training subset (default: all N).
    checkpointer: if given (e.g. ``jattr.io.checkpoint.Checkpointer(dir)``), the
      state is saved after every segment and a run finding a checkpoint there
      continues from it (with identical results).
    meta: extra JSON-able metadata stored with each checkpoint and checked on
      resume (e.g. the model config).
    progress: called after every segment with the steps done and the segment's
      mean loss (``jattr.progress``).

  Returns:
    ``(state, losses)``: the final state and the loss of every step [num_steps].

  Raises:
    ValueError: on data that are not finite images in [−1, 1], and when training
      diverges (a NaN or inf loss or parameter): the message names the step and the
      loss, and nothing of the diverged segment is saved, so the checkpoint keeps
      the last finite state.
  """
  data = check_data(data)
  indices = jnp.arange(data.shape[0], dtype=jnp.int32) if indices is None else jnp.asarray(
      indices, jnp.int32)
  count = jnp.asarray(indices.shape[0], jnp.int32)
  optimizer = make_optimizer(config)
  segment = jax.jit(make_segment_fn(apply_fn, schedule, config, optimizer),
                    static_argnames="num_steps")
  state = init_state(params, optimizer)
  losses: list[float] = []
  job = {"kind": "train", "config": config_dict(config), "n": int(indices.shape[0]),
         "key": np.asarray(jax.random.key_data(train_key)).tolist(), **(meta or {})}
  if checkpointer is not None and checkpointer.latest_step() is not None:
    state, saved = checkpointer.restore(state)
    check_same_job(checkpointer, saved.get("job"), job)
    losses = list(saved["losses"])
  report = resolve_progress(progress)
  start = int(state.step)
  for first, length in segments(start, config.num_steps, config.segment_steps):
    state, seg_losses = segment(state, data, indices, count, train_key, num_steps=length)
    check_finite_segment(np.asarray(seg_losses)[None], state.params, first, config,
                         checkpointer)
    losses.extend(np.asarray(seg_losses).tolist())
    if checkpointer is not None:
      checkpointer.save(int(state.step), state, {"job": job, "losses": losses})
    report("train", int(state.step), config.num_steps, loss=float(np.mean(seg_losses)))
  return state, np.asarray(losses, np.float32)


def check_data(data) -> jax.Array:
  """Training images as a device array, checked: [N ≥ 1, H, W, C], finite, in [−1, 1]."""
  data = jnp.asarray(data)
  if data.ndim != 4:
    raise ValueError(f"data must be [N, H, W, C], got shape {data.shape}")
  if data.shape[0] == 0:
    raise ValueError("data is empty: training needs at least one image")
  check_image_range(data, "data")
  return data


class DivergedError(ValueError):
  """Training produced a NaN or inf loss or parameter."""


def check_finite_segment(losses: np.ndarray, params, first_step: int, config: TrainConfig,
                         checkpointer: Checkpointer | None, member_axis: bool = False) -> None:
  """Raises ``DivergedError`` if a segment's losses [M, steps] or its final params are not
  finite, naming the first bad step (and member), the loss and what to change."""
  bad = ~np.isfinite(losses)
  params_bad = not bad.any() and not bool(jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)])))  # on device
  if not bad.any() and not params_bad:
    return
  if bad.any():
    member, j = np.argwhere(bad)[0]
    step, what = first_step + int(j) + 1, f"the loss is {losses[member, j]}"
  else:
    member, step, what = 0, first_step + losses.shape[1], "the parameters hold NaN or inf"
  who = f" of member {int(member)}" if member_axis else ""
  saved = checkpointer.latest_step() if checkpointer is not None else None
  kept = (f"the checkpoint keeps the last finite state (step {saved})" if saved is not None
          else "nothing was saved")
  raise DivergedError(
      f"training diverged at step {step}{who}: {what}; {kept}. Lower the learning rate "
      f"(now {config.learning_rate:g}) or clip gradients harder (grad_clip "
      f"{config.grad_clip}), and train again")
