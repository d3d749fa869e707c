"""DDPM ancestral and DDIM samplers, deterministic given a key.

Both walk a decreasing list of timesteps τ_S > … > τ_1 and, at each step, turn the
network output into (ε̂, x̂₀) with ``losses.to_eps_x0``.

DDPM (Ho et al. 2020), every t from T−1 down to 0, posterior q(x_{t−1} | x_t, x̂₀):

    μ̃_t = √ᾱ_{t−1} β_t /(1−ᾱ_t) · x̂₀ + √α_t (1−ᾱ_{t−1})/(1−ᾱ_t) · x_t,
    σ̃²_t = β_t (1−ᾱ_{t−1})/(1−ᾱ_t),      x_{t−1} = μ̃_t + σ̃_t z   (z = 0 at t = 0).

DDIM (Song et al. 2021), on a sub-sequence of S timesteps, with η ∈ [0, 1]:

    σ = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev),
    x_prev = √ᾱ_prev x̂₀ + √(1−ᾱ_prev−σ²) ε̂ + σ z.

Conditioning and classifier-free guidance (Ho & Salimans 2022). A conditional model
(``jattr.diffusion.conditioning``) samples with ``cond``, one condition per sample. With
a ``null_cond`` (the "no condition" the model was trained on by condition dropout,
e.g. ``jattr.models.bridge.null_condition(config, B)``) and a guidance scale s, each step
calls the model twice and combines the raw network outputs o,

    o = o(x_t, t, ∅) + s · (o(x_t, t, c) − o(x_t, t, ∅)),

before reading them as (ε̂, x̂₀). For the ε-parameterization this is the guided noise
estimate ε̃ = (1 + w) ε(x_t, c) − w ε(x_t, ∅) of Ho & Salimans with s = 1 + w, i.e. a
step along ∇ log p(x_t | c) + w ∇ log p(c | x_t). For the x₀ and v parameterizations
the combination is applied to the raw output, x̂₀ or v̂; since ε̂ is an affine function
of the raw output at fixed x_t and t, and affine maps preserve the combination (its
weights 1 − s and s sum to 1), that is the same guidance of ε̂ (before any clipping
of x̂₀). s = 1 is plain conditional sampling (one model call), s = 0 sampling with
the null condition, s > 1 stronger guidance.

Randomness: x_T comes from ``fold_in(key, 0)`` and the step noise of step s from
``fold_in(key, s + 1)``, so the same key reproduces the same samples, and two models
sampled with one key share their initial noise and every step's noise (what
counterfactual regeneration needs). The condition and guidance do not touch the
noise: the same key gives the same x_T and step noise for every condition and scale.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattr.diffusion import conditioning
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


def _guided(apply_fn, params, cond, guidance_scale, null_cond):
  """The network output ``out(x, tb)`` as the samplers use it: the model alone (no
  condition, or one condition at scale 1), or the classifier-free guidance combination
  o_∅ + s (o_c − o_∅) of the module docstring."""
  if null_cond is None:
    return lambda x, tb: conditioning.apply_model(apply_fn, params, x, tb, cond)

  def out(x, tb):
    o_cond = conditioning.apply_model(apply_fn, params, x, tb, cond)
    o_null = conditioning.apply_model(apply_fn, params, x, tb, null_cond)
    return o_null + jnp.asarray(guidance_scale, o_cond.dtype) * (o_cond - o_null)

  return out


def _check_guidance(cond, guidance_scale, null_cond, batch: int):
  """Checks the condition arguments; returns the null condition to use (None: one call)."""
  if cond is None:
    if null_cond is not None or not _is_one(guidance_scale):
      raise ValueError("guidance (null_cond, or guidance_scale != 1) needs a condition: "
                       "pass cond, one condition per sample")
    return None
  conditioning.check_cond(cond, batch, "cond")
  if null_cond is None:
    if not _is_one(guidance_scale):
      raise ValueError(f"guidance_scale={guidance_scale} needs null_cond, the null condition "
                       f"of the batch (e.g. jattr.models.bridge.null_condition(config, {batch}))")
    return None
  conditioning.check_cond(null_cond, batch, "null_cond")
  return None if _is_one(guidance_scale) else null_cond


def _is_one(scale) -> bool:
  """True for a concrete scale equal to 1 (a traced scale is never taken for 1)."""
  if isinstance(scale, jax.core.Tracer):
    return False
  return bool(np.asarray(scale) == 1.0)


def _predict(out_fn, schedule, x, t, parameterization, clip):
  tb = jnp.full((x.shape[0],), t, jnp.int32)
  eps, x0 = to_eps_x0(schedule, out_fn(x, tb), x, tb, parameterization)
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
                clip_x0: bool = True, return_trajectory: bool = False, dtype=jnp.float32,
                cond=None, guidance_scale: float = 1.0, null_cond=None):
  """Ancestral DDPM sampling over all T steps.

  Args:
    apply_fn, params: the model (see ``jattr.types.ApplyFn``); called as
      ``apply_fn(params, x_t, t, cond)`` when ``cond`` is given.
    schedule: the noise schedule the model was trained with.
    key: PRNG key; fixes x_T and every step's noise.
    shape: [B, H, W, C] of the batch to generate.
    parameterization: how the network output is read.
    clip_x0: clip x̂₀ to [−1, 1] at every step (and recompute ε̂ from it).
    return_trajectory: return a ``Trajectory`` instead of only the samples.
    cond: the condition of each sample (a pytree with leading axis B), or None for
      an unconditional model.
    guidance_scale: s of classifier-free guidance, o_∅ + s (o_c − o_∅) (module
      docstring); 1 is plain conditional sampling.
    null_cond: the null condition of the batch (leading axis B); needed when
      ``guidance_scale != 1``, and at s = 1 not used (one model call per step).

  Returns:
    Samples [B, H, W, C], or a ``Trajectory`` with S = T steps.

  Raises:
    ValueError: when (concrete) ``params`` hold NaN or inf: a diverged model; when a
      condition's leading axis is not B, or guidance is asked for without ``cond`` or
      (s != 1) without ``null_cond``.
  """
  check_finite_params(params)
  null_cond = _check_guidance(cond, guidance_scale, null_cond, shape[0])
  out_fn = _guided(apply_fn, params, cond, guidance_scale, null_cond)
  ab, abp = schedule.alphas_bar, schedule.alphas_bar_prev
  c_x0 = np.sqrt(abp) * schedule.betas / (1.0 - ab)
  c_xt = np.sqrt(schedule.alphas) * (1.0 - abp) / (1.0 - ab)
  sigma = np.sqrt(schedule.betas * (1.0 - abp) / (1.0 - ab))
  c_x0, c_xt, sigma = (jnp.asarray(a, dtype) for a in (c_x0, c_xt, sigma))

  def step(x, t, s, z):
    _, x0 = _predict(out_fn, schedule, x, t, parameterization, clip_x0)
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
                return_trajectory: bool = False, dtype=jnp.float32, cond=None,
                guidance_scale: float = 1.0, null_cond=None):
  """DDIM sampling on ``num_steps`` evenly spaced timesteps.

  With ``eta = 0`` the map from x_T to x₀ is deterministic; ``eta = 1`` recovers
  DDPM-like stochasticity on the sub-sequence. Arguments (``cond``,
  ``guidance_scale`` and ``null_cond`` included) as in ``ddpm_sample``.
  """
  check_finite_params(params)
  null_cond = _check_guidance(cond, guidance_scale, null_cond, shape[0])
  out_fn = _guided(apply_fn, params, cond, guidance_scale, null_cond)
  ts = ddim_timesteps(schedule.num_timesteps, num_steps)
  ab = schedule.alphas_bar
  prev = np.concatenate([ts[1:], [-1]])
  ab_t = jnp.asarray(ab[ts], dtype)
  ab_prev = jnp.asarray(np.where(prev >= 0, ab[np.maximum(prev, 0)], 1.0), dtype)

  def step(x, t, s, z):
    eps, x0 = _predict(out_fn, schedule, x, t, parameterization, clip_x0)
    a, ap = ab_t[s], ab_prev[s]
    sig = eta * jnp.sqrt((1.0 - ap) / (1.0 - a)) * jnp.sqrt(1.0 - a / ap)
    direction = jnp.sqrt(jnp.maximum(1.0 - ap - sig**2, 0.0)) * eps
    return jnp.sqrt(ap) * x0 + direction + sig * z, x0

  return _run(step, key, shape, ts, dtype, return_trajectory)
