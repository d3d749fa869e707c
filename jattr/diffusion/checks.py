"""Argument checks at the library's boundary, shared by losses, samplers and training.

Shapes and dtypes are static and always checked. Values (timestep ranges,
finiteness) can only be checked on concrete arrays: inside ``jax.jit`` the same
functions see tracers, and the checks pass through (the jitted callers check their
inputs once, outside the trace).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def concrete(x) -> np.ndarray | None:
  """``x`` as a numpy array, or None when it is a tracer (inside jit/vmap/grad)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_float_images(x, name: str = "x0") -> None:
  """Images must be floating point (jattr's images are floats in [−1, 1])."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    hint = " (map uint8 pixels with x / 127.5 - 1)" if dtype == jnp.uint8 else ""
    raise ValueError(f"{name} must be a floating-point array of images in [-1, 1], got "
                     f"dtype {dtype}{hint}")


def check_image_range(x, name: str = "data", tol: float = 1e-3) -> None:
  """Concrete images must be finite and lie in [−1, 1] (to ``tol``)."""
  check_float_images(x, name)
  a = concrete(x)
  if a is None or a.size == 0:
    return
  bad = ~np.isfinite(a)
  if bad.any():
    raise ValueError(f"{name} holds {int(bad.sum())} non-finite values (NaN or inf)")
  lo, hi = float(a.min()), float(a.max())
  if lo < -1 - tol or hi > 1 + tol:
    raise ValueError(f"{name} must be images in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]"
                     " (scale uint8 pixels with x / 127.5 - 1)")


def check_timesteps(t, num_timesteps: int, name: str = "t") -> None:
  """Timesteps must be integers in [0, T)."""
  dtype = jnp.result_type(t)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{name} must be integer timesteps in [0, {num_timesteps}), got dtype "
                     f"{dtype}")
  a = concrete(t)
  if a is not None and a.size and (a.min() < 0 or a.max() >= num_timesteps):
    raise ValueError(f"{name} must lie in [0, T) = [0, {num_timesteps}), got values in "
                     f"[{a.min()}, {a.max()}]")


def count_nonfinite(tree) -> int:
  """The number of NaN / ±inf entries in the floating-point leaves of concrete ``tree``.

  One reduction on the device and one scalar back to the host (no copy of the arrays).
  """
  leaves = [x for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return int(_count_nonfinite(leaves)) if leaves else 0


@jax.jit
def _count_nonfinite(leaves):
  return sum(jnp.sum(~jnp.isfinite(x)) for x in leaves)


def check_finite_params(params, name: str = "params",
                        consequence: str = "retrain it (with a smaller learning rate)") -> None:
  """Concrete parameters must all be finite (a diverged model is an error, not results);
  skipped for tracers (inside a caller's jit)."""
  leaves = jax.tree_util.tree_leaves(params)
  if any(isinstance(x, jax.core.Tracer) for x in leaves):
    return
  try:
    bad = count_nonfinite(params)
  except jax.errors.ConcretizationTypeError:
    # Concrete params closed over inside a caller's trace (e.g. a jitted sampler):
    # the device reduction would be traced too, so count on the host.
    bad = sum(int(np.sum(~np.isfinite(np.asarray(x)))) for x in leaves
              if np.issubdtype(np.asarray(x).dtype, np.inexact))
  if bad:
    raise ValueError(f"{name} hold {bad} non-finite values (NaN or inf): the model diverged "
                     f"or was loaded wrongly; {consequence}")
