"""A tiny conv denoiser shared by the tests that train many models (plain-dict params),
and a tiny LDS benchmark spec built on it."""

import jax
import jax.numpy as jnp

from jattr.bench import lds_cache


def tiny_init(key, c=1, hidden=4):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"conv1": jax.random.normal(k1, (3, 3, c, hidden)) * 0.3,
          "temb": jax.random.normal(k2, (hidden,)) * 0.1,
          "conv2": jax.random.normal(k3, (3, 3, hidden, c)) * 0.3}


def tiny_apply(params, x, t):
  conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = conv(x, params["conv1"]) + (t[:, None, None, None] / 50.0) * params["temb"]
  return conv(jnp.tanh(h), params["conv2"])


# The LDS benchmark the cache tests build with (tiny_init, tiny_apply): 16 digits,
# 4 training steps. Tests replace the fields they vary (dataclasses.replace).
TINY_LDS_SPEC = lds_cache.LdsSpec(
    dataset="digits", num_train=16, num_validation=3, num_test=3, num_generated=2,
    model={"name": "tiny_conv"}, schedule={"kind": "linear", "num_timesteps": 50},
    train={"num_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 1,
           "segment_steps": 2},
    num_subsets=4, num_seeds=2, num_draws=3, sampler={"kind": "ddim", "num_steps": 5})


def tiny_cond_init(key, c=1, hidden=4, num_classes=3):
  """``tiny_init`` plus a class embedding of num_classes + 1 rows (the last: the null
  class of classifier-free guidance)."""
  k1, k2 = jax.random.split(key)
  return {**tiny_init(k1, c, hidden), "emb": jax.random.normal(k2, (num_classes + 1, hidden))}


def tiny_cond_apply(params, x, t, y):
  conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = (conv(x, params["conv1"]) + (t[:, None, None, None] / 50.0) * params["temb"]
       + params["emb"][y][:, None, None, :])
  return conv(jnp.tanh(h), params["conv2"])
