"""Noise schedules and the forward (noising) process.

A schedule fixes β_t for t = 0..T-1 (jattr indexes timesteps from 0; t = 0 is the
least noisy step), and everything else follows:

    α_t = 1 − β_t,     ᾱ_t = ∏_{s ≤ t} α_s,
    q(x_t | x_0) = N(√ᾱ_t · x_0, (1 − ᾱ_t) I)   ⇒   x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε.

Schedules are frozen dataclasses holding only static numbers, so they are hashable
and can be closed over or passed as static arguments under ``jax.jit``; the arrays
are computed in float64 with numpy and cast at use.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A discrete-time DDPM noise schedule.

  Attributes:
    kind: ``"linear"`` (Ho et al. 2020: β linear from ``beta_start`` to
      ``beta_end``) or ``"cosine"`` (Nichol & Dhariwal 2021:
      ᾱ(t) ∝ cos²(((t/T) + s)/(1 + s) · π/2), β clipped at 0.999).
    num_timesteps: T, the number of diffusion steps.
    beta_start, beta_end: endpoints of the linear schedule, given for T = 1000
      and rescaled by 1000/T so that shorter chains end at the same noise level
      (clipped at 0.999, which only very short chains, T < 50, reach).
    cosine_s: the offset s of the cosine schedule.
  """

  kind: Literal["linear", "cosine"] = "linear"
  num_timesteps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02
  cosine_s: float = 0.008

  def __post_init__(self):
    if self.kind not in ("linear", "cosine"):
      raise ValueError(f"Schedule.kind must be 'linear' or 'cosine', got {self.kind!r}")
    if int(self.num_timesteps) < 1:
      raise ValueError(f"Schedule.num_timesteps must be >= 1, got {self.num_timesteps}")

  @functools.cached_property
  def betas(self) -> np.ndarray:
    """β_t, shape [T], float64."""
    T = self.num_timesteps
    if self.kind == "linear":
      scale = 1000.0 / T
      betas = np.linspace(scale * self.beta_start, scale * self.beta_end, T, dtype=np.float64)
      return np.clip(betas, 0.0, 0.999)
    steps = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((steps + self.cosine_s) / (1 + self.cosine_s) * np.pi / 2) ** 2
    alphas_bar = f / f[0]
    return np.clip(1.0 - alphas_bar[1:] / alphas_bar[:-1], 0.0, 0.999)

  @functools.cached_property
  def alphas(self) -> np.ndarray:
    """α_t = 1 − β_t, shape [T]."""
    return 1.0 - self.betas

  @functools.cached_property
  def alphas_bar(self) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t} α_s, shape [T], strictly decreasing in t."""
    return np.cumprod(self.alphas)

  @functools.cached_property
  def alphas_bar_prev(self) -> np.ndarray:
    """ᾱ_{t−1} with ᾱ_{−1} = 1, shape [T]."""
    return np.concatenate([[1.0], self.alphas_bar[:-1]])

  def snr(self) -> np.ndarray:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), shape [T]."""
    return self.alphas_bar / (1.0 - self.alphas_bar)


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """The linear β schedule of Ho et al. (2020)."""
  return Schedule("linear", num_timesteps, beta_start, beta_end)


def cosine(num_timesteps: int = 1000, s: float = 0.008) -> Schedule:
  """The cosine ᾱ schedule of Nichol & Dhariwal (2021)."""
  return Schedule("cosine", num_timesteps, cosine_s=s)


def _bcast(coef: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Reshape per-example coefficients [B] (or a scalar) to broadcast against x."""
  return jnp.reshape(coef, jnp.shape(coef) + (1,) * (x.ndim - jnp.ndim(coef)))


def gather(values: np.ndarray, t: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """values[t] cast to ``like``'s dtype and shaped to broadcast against it."""
  return _bcast(jnp.asarray(values, dtype=like.dtype)[t], like)


def q_sample(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray) -> jnp.ndarray:
  """Forward noising x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε.

  Args:
    schedule: the noise schedule.
    x0: clean data, one example [H, W, C] with scalar ``t`` or a batch [B, H, W, C]
      with ``t`` of shape [B].
    t: integer timesteps in [0, T).
    eps: standard normal noise, same shape as ``x0``. Passed in, never drawn here.

  Returns:
    x_t, same shape and dtype as ``x0``.
  """
  ab = schedule.alphas_bar
  return gather(np.sqrt(ab), t, x0) * x0 + gather(np.sqrt(1.0 - ab), t, x0) * eps
