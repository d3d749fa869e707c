"""DDPM ancestral and DDIM samplers, deterministic given a key.

Both walk a decreasing list of timesteps τ_S > … > τ_1 and, at each step, turn the
network output into (ε̂, x̂₀) with ``losses.to_eps_x0``.

DDPM (Ho et al. 2020), every t from T−1 down to 0, posterior q(x_{t−1} | x_t, x̂₀):

    μ̃_t = √ᾱ_{t−1} β_t /(1−ᾱ_t) · x̂₀ + √α_t (1−ᾱ_{t−1})/(1−ᾱ_t) · x_t,
    σ̃²_t = β_t (1−ᾱ_{t−1})/(1−ᾱ_t),      x_{t−1} = μ̃_t + σ̃_t z   (z = 0 at t = 0).

DDIM (Song et al. 2021), on a sub-sequence of S timesteps, with η ∈ [0, 1]:

    σ = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev),
    x_prev = √ᾱ_prev x̂₀ + √(1−ᾱ_prev−σ²) ε̂ + σ z.

Randomness: x_T comes from ``fold_in(key, 0)`` and the step noise of step s from
``fold_in(key, s + 1)``, so the same key reproduces the same samples, and two models
sampled with one key share their initial noise and every step's noise (what
counterfactual regeneration needs).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattr.diffusion.checks import check_finite_params
from jattr.diffusion.losses import to_eps_x0
from jattr.diffusion.schedules import Schedule
from jattr.types import ApplyFn, Parameterization, Params


class Trajectory(NamedTuple):
  """A recorded sampling path (S sampler steps, B samples).

  Attributes:
    t: timesteps visited, [S], decreasing.
    x_t: the state fed to the network at each step, [S, B, H, W, C].
    x0_pred: the network's x̂₀ at each step (after clipping, if enabled), [S, B, H, W, C].
    x0: the final samples, [B, H, W, C].
  """

  t: jax.Array
  x_t: jax.Array
  x0_pred: jax.Array
  x0: jax.Array


def _predict(apply_fn, params, schedule, x, t, parameterization, clip):
  tb = jnp.full((x.shape[0],), t, jnp.int32)
  eps, x0 = to_eps_x0(schedule, apply_fn(params, x, tb), x, tb, parameterization)
  if clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
    ab = jnp.asarray(schedule.alphas_bar, x.dtype)[t]
    eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
  return eps, x0


def _run(step_fn, key, shape, timesteps, dtype, return_trajectory):
  x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, dtype)
  steps = jnp.arange(len(timesteps))

  def body(x, s_t):
    s, t = s_t
    z = jax.random.normal(jax.random.fold_in(key, s + 1), shape, dtype)
    x_new, x0 = step_fn(x, t, s, z)
    return x_new, ((x, x0) if return_trajectory else None)

  ts = jnp.asarray(timesteps, jnp.int32)
  x0, rec = jax.lax.scan(body, x_T, (steps, ts))
  if not return_trajectory:
    return x0
  return Trajectory(t=ts, x_t=rec[0], x0_pred=rec[1], x0=x0)


def ddpm_sample(apply_fn: ApplyFn, params: Params, schedule: Schedule, key: jax.Array,
                shape: tuple[int, ...], *, parameterization: Parameterization = "eps",
                clip_x0: bool = True, return_trajectory: bool = False, dtype=jnp.float32):
  """Ancestral DDPM sampling over all T steps.

  Args:
    apply_fn, params: the model (see ``jattr.types.ApplyFn``).
    schedule: the noise schedule the model was trained with.
    key: PRNG key; fixes x_T and every step's noise.
    shape: [B, H, W, C] of the batch to generate.
    parameterization: how the network output is read.
    clip_x0: clip x̂₀ to [−1, 1] at every step (and recompute ε̂ from it).
    return_trajectory: return a ``Trajectory`` instead of only the samples.

  Returns:
    Samples [B, H, W, C], or a ``Trajectory`` with S = T steps.

  Raises:
    ValueError: when (concrete) ``params`` hold NaN or inf: a diverged model.
  """
  check_finite_params(params)
  ab, abp = schedule.alphas_bar, schedule.alphas_bar_prev
  c_x0 = np.sqrt(abp) * schedule.betas / (1.0 - ab)
  c_xt = np.sqrt(schedule.alphas) * (1.0 - abp) / (1.0 - ab)
  sigma = np.sqrt(schedule.betas * (1.0 - abp) / (1.0 - ab))
  c_x0, c_xt, sigma = (jnp.asarray(a, dtype) for a in (c_x0, c_xt, sigma))

  def step(x, t, s, z):
    _, x0 = _predict(apply_fn, params, schedule, x, t, parameterization, clip_x0)
    mean = c_x0[t] * x0 + c_xt[t] * x
    return mean + jnp.where(t > 0, sigma[t], 0.0) * z, x0

  timesteps = np.arange(schedule.num_timesteps - 1, -1, -1)
  return _run(step, key, shape, timesteps, dtype, return_trajectory)


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The decreasing DDIM sub-sequence: ``range(0, T, T // S)`` reversed."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, T={num_timesteps}], got {num_steps}")
  return np.arange(0, num_timesteps, num_timesteps // num_steps)[:num_steps][::-1].copy()


def ddim_sample(apply_fn: ApplyFn, params: Params, schedule: Schedule, key: jax.Array,
                shape: tuple[int, ...], num_steps: int = 50, *, eta: float = 0.0,
                parameterization: Parameterization = "eps", clip_x0: bool = True,
                return_trajectory: bool = False, dtype=jnp.float32):
  """DDIM sampling on ``num_steps`` evenly spaced timesteps.

  With ``eta = 0`` the map from x_T to x₀ is deterministic; ``eta = 1`` recovers
  DDPM-like stochasticity on the sub-sequence. Arguments as in ``ddpm_sample``.
  """
  check_finite_params(params)
  ts = ddim_timesteps(schedule.num_timesteps, num_steps)
  ab = schedule.alphas_bar
  prev = np.concatenate([ts[1:], [-1]])
  ab_t = jnp.asarray(ab[ts], dtype)
  ab_prev = jnp.asarray(np.where(prev >= 0, ab[np.maximum(prev, 0)], 1.0), dtype)

  def step(x, t, s, z):
    eps, x0 = _predict(apply_fn, params, schedule, x, t, parameterization, clip_x0)
    a, ap = ab_t[s], ab_prev[s]
    sig = eta * jnp.sqrt((1.0 - ap) / (1.0 - a)) * jnp.sqrt(1.0 - a / ap)
    direction = jnp.sqrt(jnp.maximum(1.0 - ap - sig**2, 0.0)) * eps
    return jnp.sqrt(ap) * x0 + direction + sig * z, x0

  return _run(step, key, shape, ts, dtype, return_trajectory)
