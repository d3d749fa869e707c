"""Pins the kfac-jax/jax pair: one curvature update must run.

kfac-jax 0.0.8 breaks on jax 0.9.2+ (its graph matcher fails inside
``update_curvature_matrix_estimate``), which is why pyproject.toml's ``kfac`` extra
pins jax 0.9.1. This test runs exactly that call on a tiny MLP with a registered
squared-error loss, so a change to that pin that breaks kfac-jax fails CI's
pinned-stack stage here, with a clear name, before it breaks the ``kfac_jax``
cross-check backend. Without the extra (kfac-jax not installed) it is skipped
(``kfac_jax`` marker, tests/conftest.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
  import kfac_jax
except ImportError:  # no kfac extra: conftest.py skips the kfac_jax-marked tests
  kfac_jax = None

pytestmark = pytest.mark.kfac_jax


def loss_fn(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  out = h @ params["w2"] + params["b2"]
  kfac_jax.register_squared_error_loss(out, y)
  return jnp.mean(jnp.sum((out - y) ** 2, axis=1))


def test_one_curvature_update():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w1": jax.random.normal(keys[0], (3, 4)), "b1": jnp.zeros(4),
            "w2": jax.random.normal(keys[1], (4, 2)), "b2": jnp.zeros(2)}
  batch = (jax.random.normal(keys[2], (5, 3)), jax.random.normal(keys[3], (5, 2)))
  estimator = kfac_jax.BlockDiagonalCurvature(loss_fn, default_estimation_mode="ggn_exact")
  state = estimator.init(jax.random.PRNGKey(1), (params, batch), None, None)
  state = estimator.update_curvature_matrix_estimate(
      state, ema_old=1.0, ema_new=1.0, identity_weight=0.0, batch_size=5,
      rng=jax.random.PRNGKey(2), func_args=(params, batch))
  # The graph matcher found both dense layers (kernel + bias each).
  assert [type(b).__name__ for b in estimator.blocks] == ["DenseTwoKroneckerFactored"] * 2
  # The last layer's output factor is exact: G = 2·I for Σ (out − y)².
  last = state.blocks_states[1]
  np.testing.assert_allclose(last.factors[1].value, 2.0 * np.eye(2), rtol=1e-6)
  assert all(np.all(np.isfinite(f.value)) for s in state.blocks_states for f in s.factors)
