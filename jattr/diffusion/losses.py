"""Per-example diffusion losses.

For one example x₀ with a timestep t and noise ε (both *arguments*: attribution
needs the same (t, ε) for every model and every example), the ε-prediction loss is

    ℓ(θ; x₀, t, ε) = mean_pixels ‖ε − ε_θ(x_t, t)‖²,   x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε.

The same network output can instead be read as a prediction of x₀ or of
v = √ᾱ_t ε − √(1−ᾱ_t) x₀ (Salimans & Ho 2022); the loss is then the squared error
against that target. All three are the DDPM objective up to a t-dependent weight.

Functions here never reduce over examples: ``per_example_loss`` returns one value
per example, and ``batch_loss`` (the training objective) is its mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattr.diffusion import conditioning
from jattr.diffusion.checks import check_float_images, check_timesteps
from jattr.diffusion.schedules import Schedule, gather, q_sample
from jattr.types import ApplyFn, Parameterization, Params

PARAMETERIZATIONS = ("eps", "x0", "v")


def check_parameterization(parameterization: str) -> None:
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(
        f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")


def target(schedule: Schedule, x0, t, eps, parameterization: Parameterization = "eps"):
  """The regression target the network output is compared with."""
  check_parameterization(parameterization)
  if parameterization == "eps":
    return eps
  if parameterization == "x0":
    return x0
  ab = schedule.alphas_bar
  return gather(jnp.sqrt(ab), t, x0) * eps - gather(jnp.sqrt(1.0 - ab), t, x0) * x0


def to_eps_x0(schedule: Schedule, out, x_t, t, parameterization: Parameterization = "eps"):
  """Converts a network output to the pair (ε̂, x̂₀) it implies at (x_t, t).

  Uses x_t = √ᾱ x₀ + √(1−ᾱ) ε and, for v, x̂₀ = √ᾱ x_t − √(1−ᾱ) v̂ and
  ε̂ = √(1−ᾱ) x_t + √ᾱ v̂.
  """
  check_parameterization(parameterization)
  ab = schedule.alphas_bar
  sa = gather(jnp.sqrt(ab), t, x_t)
  s1 = gather(jnp.sqrt(1.0 - ab), t, x_t)
  if parameterization == "eps":
    return out, (x_t - s1 * out) / sa
  if parameterization == "x0":
    return (x_t - sa * out) / s1, out
  return s1 * x_t + sa * out, sa * x_t - s1 * out


def per_example_loss(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, t, eps,
                     parameterization: Parameterization = "eps"):
  """Diffusion loss of each example, no reduction over the batch.

  Args:
    apply_fn: ``apply_fn(params, x_t [B,H,W,C], t [B]) -> [B,H,W,C]``, or
      ``apply_fn(params, x_t, t, cond)`` for conditional examples.
    params: the model parameters (any pytree).
    schedule: the noise schedule.
    x0: clean images [B, H, W, C], floating point (ValueError otherwise), or the
      conditional examples ``(x0, cond)`` (``jattr.diffusion.conditioning``).
    t: integer timesteps [B] in [0, T) (checked when concrete: ValueError).
    eps: noise [B, H, W, C].
    parameterization: how the network output is read (``"eps"``, ``"x0"``, ``"v"``).

  Returns:
    Loss per example, shape [B]: the mean over pixels of the squared error.
  """
  x0, cond = conditioning.split(x0)
  if x0.shape != eps.shape:
    raise ValueError(f"x0 and eps must have the same shape, got {x0.shape} and {eps.shape}")
  if t.shape != x0.shape[:1]:
    raise ValueError(f"t must have shape [B]={x0.shape[:1]}, got {t.shape}")
  check_float_images(x0, "x0")
  check_timesteps(t, schedule.num_timesteps, "t")
  conditioning.check_cond(cond, x0.shape[0])
  x_t = q_sample(schedule, x0, t, eps)
  out = conditioning.apply_model(apply_fn, params, x_t, t, cond)
  err = out - target(schedule, x0, t, eps, parameterization)
  return jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))


def example_loss(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, t, eps,
                 parameterization: Parameterization = "eps"):
  """Loss of ONE example (x0 [H,W,C] or (x0, cond), scalar t, eps [H,W,C]) -> scalar.

  The kernel that per-example gradients are built from:
  ``vmap(grad(example_loss, argnums=1), in_axes=(None, None, None, 0, 0, 0))``.
  """
  one = jax.tree_util.tree_map(lambda a: a[None], x0)
  return per_example_loss(apply_fn, params, schedule, one, jnp.reshape(t, (1,)),
                          eps[None], parameterization)[0]


def batch_loss(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, t, eps,
               parameterization: Parameterization = "eps"):
  """The training objective: mean over the batch of ``per_example_loss``."""
  return jnp.mean(per_example_loss(apply_fn, params, schedule, x0, t, eps, parameterization))
