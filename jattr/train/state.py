"""Training configuration, optimizer and state for one denoiser."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jattr.types import Parameterization


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How a denoiser is trained (the "recipe" every retrained model shares).

  Attributes:
    num_steps: optimizer steps.
    batch_size: examples per step, drawn uniformly with replacement from the
      model's training subset.
    learning_rate: peak Adam learning rate (linear warm-up, then constant).
    warmup_steps: linear warm-up length.
    grad_clip: global-norm gradient clipping threshold.
    weight_decay: decoupled weight decay (AdamW); 0 for plain Adam.
    ema_decay: decay of the exponential moving average of the weights; the
      effective decay at step n is min(ema_decay, (1 + n)/(10 + n)).
    parameterization: what the network predicts (``"eps"``, ``"x0"``, ``"v"``).
    segment_steps: steps compiled into one program; progress, checkpoints and
      the loss log advance one segment at a time.
    cond_dropout: for conditional data, the probability p that an example's condition
      is replaced by the null condition (``null_cond`` of ``train``/``train_many``),
      independently per example and step: the model then learns both p(x | c) and
      p(x) (the null condition ∅), what classifier-free guidance needs (Ho &
      Salimans 2022 use p = 0.1 to 0.2). 0 trains on the conditions as given.
  """

  num_steps: int = 3000
  batch_size: int = 64
  learning_rate: float = 2e-3
  warmup_steps: int = 100
  grad_clip: float = 1.0
  weight_decay: float = 0.0
  ema_decay: float = 0.999
  parameterization: Parameterization = "eps"
  segment_steps: int = 100
  cond_dropout: float = 0.0

  def __post_init__(self):
    for name in ("num_steps", "batch_size", "segment_steps"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
    if not 0.0 <= self.cond_dropout <= 1.0:
      raise ValueError(f"TrainConfig.cond_dropout must be in [0, 1], got {self.cond_dropout}")


class TrainState(NamedTuple):
  """Everything that changes during training, as one pytree.

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: the current parameters.
    ema_params: their exponential moving average (what samplers should use).
    opt_state: the optax state.
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with a linear warm-up to a constant rate."""
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1)),
       optax.constant_schedule(config.learning_rate)], [max(config.warmup_steps, 1)])
  return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                     optax.adamw(schedule, weight_decay=config.weight_decay))


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  """A fresh state at step 0 whose EMA starts at ``params``."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=optimizer.init(params))


def ema_update(ema, params, step, decay: float):
  """ema ← d·ema + (1 − d)·params with d = min(decay, (1 + step)/(10 + step))."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
