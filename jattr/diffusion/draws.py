"""Fixed, seeded sets of (t, ε) draws, reused across models and examples.

Measurements such as "the loss averaged over K draws" are only comparable between
models (retrained subsets, unlearned copies, checkpoints) if every model sees the
*same* draws. A ``Draws`` is that set, built once from a key and passed around as an
argument. Draw k's noise is generated from ``fold_in(key, k)``, so the first K noises
of a set of K' > K draws equal those of a set of K draws made from the same key. The
timesteps agree too for ``timesteps="random"`` (checked in the tests), but not for
``"uniform"``, whose spacing T/K depends on K (t = 0, 100, … for K = 10 and T = 1000;
0, 50, … for K = 20).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Draws(NamedTuple):
  """K (timestep, noise) pairs shared by every example.

  Attributes:
    t: int32 timesteps, shape [K].
    eps: standard normal noise, shape [K, H, W, C].
  """

  t: jax.Array
  eps: jax.Array

  @property
  def num_draws(self) -> int:
    return int(self.t.shape[0])


def uniform_timesteps(num_timesteps: int, num_draws: int) -> np.ndarray:
  """``range(0, T, T // K)`` truncated to K entries, as in the D-TRAK protocol."""
  if not 1 <= num_draws <= num_timesteps:
    raise ValueError(f"num_draws must be in [1, T={num_timesteps}], got {num_draws}")
  return np.arange(0, num_timesteps, num_timesteps // num_draws)[:num_draws].astype(np.int32)


def fixed_draws(key: jax.Array, num_draws: int, shape: tuple[int, ...], num_timesteps: int,
                timesteps: Literal["uniform", "random"] = "uniform",
                dtype=jnp.float32) -> Draws:
  """Builds K fixed (t, ε) draws.

  Args:
    key: PRNG key; the same key gives the same draws.
    num_draws: K (the literature uses 10 and 100).
    shape: the shape of one image, [H, W, C].
    num_timesteps: T of the schedule.
    timesteps: ``"uniform"`` for ``range(0, T, T//K)``, or ``"random"`` for K
      timesteps drawn uniformly from [0, T) with ``fold_in(key, 2**31 - 1)`` (an
      index no draw's noise uses).
    dtype: dtype of the noise.

  Returns:
    A ``Draws`` with ``t`` [K] and ``eps`` [K, *shape].
  """
  if timesteps == "uniform":
    t = jnp.asarray(uniform_timesteps(num_timesteps, num_draws))
  elif timesteps == "random":
    t = jax.random.randint(jax.random.fold_in(key, 2**31 - 1), (num_draws,), 0, num_timesteps,
                           dtype=jnp.int32)
  else:
    raise ValueError(f"timesteps must be 'uniform' or 'random', got {timesteps!r}")
  eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(key, k), tuple(shape), dtype))(
      jnp.arange(num_draws))
  return Draws(t=t, eps=eps)
