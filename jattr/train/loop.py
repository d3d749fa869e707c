"""One training step, compiled segments of steps, and the single-model loop.

Randomness. A model's training stream is one key ``train_key``; step n uses
``fold_in(train_key, n)`` to draw its batch positions, timesteps and noise, so the
stream does not depend on how steps are grouped into segments, and a run resumed
from a checkpoint at step n continues exactly as if it had never stopped.

Subsets. A model trains on ``data[indices[:count]]``: batch positions are
u ~ U[0, 1) mapped to ``indices[floor(u · count)]``. Models given the same key but
different subsets therefore see the same u, t and ε at every step (common random
numbers) and differ only in which examples those positions pick.

Conditional data. ``data`` may be the pair ``(images [N, H, W, C], cond)``, ``cond`` a
pytree of leading axis N (``jattr.diffusion.conditioning``): a batch then takes the
condition rows of the images it picks, and the model is called as
``apply_fn(params, x_t, t, cond)``. With ``TrainConfig.cond_dropout = p > 0`` each
example of a step has its condition replaced by the null condition ∅ with
probability p (condition dropout, for classifier-free guidance), so one network
learns both ε(x_t, t, c) and ε(x_t, t, ∅); the step's loss is

    L = mean_b ‖ε_b − ε_θ(x_t,b, t_b, m_b ? ∅ : c_b)‖²,   m_b ~ Bernoulli(p).

The mask m comes from ``fold_in(step_key, 3)``: the batch positions, timesteps and
noise come from ``split(step_key, 3)``, whose keys are (with jax's default
partitionable threefry) ``fold_in(step_key, i)`` for i = 0, 1, 2, so the mask key is
a fourth, distinct one. The mask is reproducible, shared by members with the same
key (common random numbers again), and drawing it leaves every other number of the
step unchanged; with p = 0 nothing is drawn and training is exactly that of the
plain data.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jattr.diffusion import conditioning
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
  """Batch positions, timesteps and noise for one step (see module docstring).

  Returns ``(x0, t, eps)``; for conditional ``data = (images, cond)``, ``x0`` is the
  batch's pair ``(images, cond)``, the condition rows of the picked images.
  """
  k_pos, k_t, k_eps = jax.random.split(key, 3)
  u = jax.random.uniform(k_pos, (batch_size,))
  pos = jnp.minimum(jnp.floor(u * count).astype(jnp.int32), count - 1)
  rows = indices[pos]
  x0 = jax.tree_util.tree_map(lambda a: a[rows], data)
  images = conditioning.images(x0)
  t = jax.random.randint(k_t, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
  eps = jax.random.normal(k_eps, images.shape, images.dtype)
  return x0, t, eps


def drop_cond(key, cond, null_cond, prob):
  """Condition dropout: each example's condition replaced by ``null_cond`` with
  probability ``prob``, independently (``m ~ Bernoulli(prob)`` [B] from ``key``).

  Args:
    key: PRNG key of the mask.
    cond: a batch condition, every leaf with leading axis B.
    null_cond: ONE example's null condition, the same pytree structure as ``cond``,
      each leaf broadcastable to the shape of one example's leaf (e.g. a scalar
      null label; a zero context [1, E] for contexts [B, L, E]).
    prob: the dropout probability p.

  Returns:
    The condition with the dropped rows replaced, the structure and dtypes of ``cond``.
  """
  batch = jax.tree_util.tree_leaves(cond)[0].shape[0]
  drop = jax.random.bernoulli(key, prob, (batch,))

  def one(c, n):
    n = jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape[1:])
    return jnp.where(drop.reshape((batch,) + (1,) * (c.ndim - 1)), n[None], c)

  try:
    return jax.tree_util.tree_map(one, cond, null_cond)
  except ValueError as e:
    raise ValueError(f"null_cond must be one example's null condition, with the structure "
                     f"of the data's condition and leaves broadcastable to one example's "
                     f"leaves (no batch axis): {e}") from None


def check_null_cond(config: TrainConfig, null_cond) -> None:
  """Condition dropout (``cond_dropout > 0``) needs the null condition."""
  if config.cond_dropout > 0 and null_cond is None:
    raise ValueError(f"TrainConfig.cond_dropout = {config.cond_dropout} replaces conditions "
                     f"by the null condition: pass null_cond, one example's null condition "
                     f"(e.g. jattr.models.bridge.null_condition(unet_config, None))")


StepFn = Callable[..., tuple[TrainState, jax.Array]]


def make_step_fn(apply_fn: ApplyFn, schedule: Schedule, config: TrainConfig,
                 optimizer: optax.GradientTransformation | None = None, *,
                 null_cond=None) -> StepFn:
  """Builds ``step(state, data, indices, count, train_key) -> (state, loss)``: ONE
  optimizer step of one model (batch, loss, update, EMA), pure.

  ``data`` is images or ``(images, cond)``; ``null_cond`` (one example's null
  condition, see ``drop_cond``) is needed when ``config.cond_dropout > 0``.
  """
  optimizer = optimizer or make_optimizer(config)
  check_null_cond(config, null_cond)

  def step(state, data, indices, count, train_key):
    key = jax.random.fold_in(train_key, state.step)
    x0, t, eps = draw_batch(key, data, indices, count, config.batch_size,
                            schedule.num_timesteps)
    if config.cond_dropout > 0:
      images, cond = conditioning.split(x0)
      if cond is None:
        raise ValueError(f"TrainConfig.cond_dropout = {config.cond_dropout} needs "
                         f"conditional data (images, cond); these data have no condition")
      x0 = (images, drop_cond(jax.random.fold_in(key, 3), cond, null_cond,
                              config.cond_dropout))
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
                    optimizer: optax.GradientTransformation | None = None, *,
                    null_cond=None) -> SegmentFn:
  """Builds ``segment(state, data, indices, count, train_key, num_steps)``.

  The returned function runs ``num_steps`` (static) optimizer steps of ONE model
  (``make_step_fn``) with ``lax.scan`` and returns ``(state, losses [num_steps])``.
  It is pure, so it can be jitted as is or mapped over a member axis (see
  ``train_many``). ``null_cond`` as in ``make_step_fn``.
  """
  one_step = make_step_fn(apply_fn, schedule, config, optimizer, null_cond=null_cond)

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
          meta: dict | None = None, progress: Progress | None = None, null_cond=None
          ) -> tuple[TrainState, np.ndarray]:
  """Trains one denoiser; resumable when a ``checkpointer`` is given.

  Args:
    apply_fn, params: the model and its initial parameters; ``apply_fn(params, x_t,
      t, cond)`` for conditional data.
    schedule: the noise schedule.
    data: training images [N, H, W, C], or the tuple ``(images, cond)`` of
      conditional data, ``cond`` a pytree of leading axis N (module docstring).
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
    null_cond: ONE example's null condition (no batch axis, e.g.
      ``jattr.models.bridge.null_condition(unet_config, None)``): what a dropped condition
      becomes under ``config.cond_dropout > 0`` (``drop_cond``); needed then, unused
      otherwise.

  Returns:
    ``(state, losses)``: the final state and the loss of every step [num_steps].

  Raises:
    ValueError: on data that are not finite images in [−1, 1] (or a condition
      without their leading axis N), on ``cond_dropout > 0`` without conditional data
      or ``null_cond``, and when training
      diverges (a NaN or inf loss or parameter): the message names the step and the
      loss, and nothing of the diverged segment is saved, so the checkpoint keeps
      the last finite state.
  """
  data = check_data(data, config, null_cond)
  indices = (jnp.arange(conditioning.count(data), dtype=jnp.int32) if indices is None
             else jnp.asarray(indices, jnp.int32))
  count = jnp.asarray(indices.shape[0], jnp.int32)
  optimizer = make_optimizer(config)
  segment = jax.jit(make_segment_fn(apply_fn, schedule, config, optimizer,
                                    null_cond=null_cond),
                    static_argnames="num_steps")
  state = init_state(params, optimizer)
  losses: list[float] = []
  job = {"kind": "train", "config": job_config(config, null_cond), "n": int(indices.shape[0]),
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


def check_data(data, config: TrainConfig | None = None, null_cond=None):
  """Training data on device, checked: images [N ≥ 1, H, W, C], finite, in [−1, 1];
  for the tuple ``(images, cond)`` also every leaf of ``cond`` with leading axis N.

  Returns the image array, or the tuple ``(images, cond)`` of device arrays
  (``(images, None)`` becomes the images alone). With a ``config`` whose
  ``cond_dropout > 0`` the data must be conditional and ``null_cond`` given.
  """
  # Only a tuple is a pair: a list still reads as a list of images, as it always did.
  images, cond = data if isinstance(data, tuple) and len(data) == 2 else (data, None)
  if isinstance(data, tuple) and len(data) != 2:
    raise ValueError(f"conditional data must be the pair (images, cond), got a tuple of "
                     f"length {len(data)}")
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"data must be [N, H, W, C], got shape {images.shape}")
  if images.shape[0] == 0:
    raise ValueError("data is empty: training needs at least one image")
  check_image_range(images, "data")
  if config is not None and config.cond_dropout > 0:
    if cond is None:
      raise ValueError(f"TrainConfig.cond_dropout = {config.cond_dropout} needs conditional "
                       f"data, the pair (images, cond)")
    check_null_cond(config, null_cond)
  if cond is None:
    return images
  cond = jax.tree_util.tree_map(jnp.asarray, cond)
  conditioning.check_cond(cond, images.shape[0], "the condition of data")
  return images, cond


def job_config(config: TrainConfig, null_cond=None) -> dict:
  """The recipe as a checkpoint's job records it; without condition dropout exactly as
  before the option existed (so older checkpoints still resume), with it also a
  digest of the null condition."""
  d = config_dict(config)
  if config.cond_dropout == 0:
    del d["cond_dropout"]
  elif null_cond is not None:
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(null_cond)]
    h = hashlib.sha256(str(jax.tree_util.tree_structure(null_cond)).encode())
    for leaf in leaves:
      h.update(f"{leaf.dtype}{leaf.shape}".encode())
      h.update(np.ascontiguousarray(leaf).tobytes())
    d["null_cond"] = h.hexdigest()[:16]
  return d


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
