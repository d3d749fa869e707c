"""A tiny conv denoiser shared by the tests that train many models (plain-dict params)."""

import jax
import jax.numpy as jnp


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
