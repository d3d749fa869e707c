"""The library's boundary: bad arguments and non-finite numbers are errors, not results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr import diffusion
from jattr.io import checkpoint
from jattr.train import (DivergedError, TrainConfig, init_state, make_optimizer, member_keys,
                         train, train_many)

SCHED = diffusion.linear(20)


def tiny_init(key):
  return {"w": 0.1 * jax.random.normal(key, (4, 4)), "b": jnp.zeros(4)}


def tiny_apply(params, x_t, t):
  h = x_t.reshape(x_t.shape[0], -1) @ params["w"] + params["b"] + t[:, None] / 20.0
  return h.reshape(x_t.shape)


def data(n=8):
  return np.array(jax.random.uniform(jax.random.key(0), (n, 2, 2, 1), minval=-1, maxval=1))


def test_per_example_loss_refuses_out_of_range_timesteps_and_integer_images():
  x0, eps = jnp.asarray(data(3)), jnp.zeros((3, 2, 2, 1))
  params = tiny_init(jax.random.key(1))
  for t in ([0, 5, 20], [-1, 0, 1], [5000, 0, 0]):
    with pytest.raises(ValueError, match=r"t must lie in \[0, T\) = \[0, 20\)"):
      diffusion.per_example_loss(tiny_apply, params, SCHED, x0, jnp.asarray(t), eps)
  with pytest.raises(ValueError, match="integer timesteps"):
    diffusion.per_example_loss(tiny_apply, params, SCHED, x0, jnp.zeros(3), eps)
  with pytest.raises(ValueError, match=r"x0 must be a floating-point.*uint8.*127\.5"):
    diffusion.per_example_loss(tiny_apply, params, SCHED, jnp.zeros((3, 2, 2, 1), jnp.uint8),
                               jnp.zeros(3, jnp.int32), eps)
  # In range: a number per example; under jit the value checks pass through.
  t = jnp.asarray([0, 10, 19])
  want = diffusion.per_example_loss(tiny_apply, params, SCHED, x0, t, eps)
  got = jax.jit(lambda t: diffusion.per_example_loss(tiny_apply, params, SCHED, x0, t, eps))(t)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_training_data_must_be_finite_images_in_range():
  init_key, train_key = member_keys(0)
  cfg = TrainConfig(num_steps=2, batch_size=4, segment_steps=2)
  bad = data()
  bad[3, 0, 0, 0] = np.nan
  cases = [(bad, "1 non-finite"), (data() * 200, r"in \[-1, 1\]"),
           (np.zeros((0, 2, 2, 1), np.float32), "empty"),
           ((data() * 127 + 128).astype(np.uint8), "uint8")]
  for x, match in cases:
    with pytest.raises(ValueError, match=match):
      train(tiny_apply, tiny_init(init_key), SCHED, x, cfg, train_key)
    with pytest.raises(ValueError, match=match):
      train_many(tiny_apply, tiny_init, SCHED, x, [np.arange(2)], [0], cfg, strategy="map")


def test_divergence_stops_training_and_keeps_the_last_finite_checkpoint(tmp_path):
  init_key, train_key = member_keys(0)
  # Warm-up from 0 to lr = 1e30: the first steps are finite, then the loss overflows
  # (at step 3 here). One step per segment, so the finite steps are checkpointed.
  boom = TrainConfig(num_steps=8, batch_size=4, segment_steps=1, learning_rate=1e30,
                     grad_clip=1e30, warmup_steps=4)
  ck = checkpoint.Checkpointer(tmp_path / "ck")
  with pytest.raises(DivergedError, match=r"training diverged at step \d+: the loss is .*"
                                          r"learning rate \(now 1e\+30\)") as e:
    train(tiny_apply, tiny_init(init_key), SCHED, data(), boom, train_key, checkpointer=ck)
  step = ck.latest_step()
  assert step is not None and step >= 1
  assert f"last finite state (step {step})" in str(e.value)
  assert f"diverged at step {step + 1}:" in str(e.value)
  template = jax.eval_shape(lambda: init_state(tiny_init(init_key), make_optimizer(boom)))
  state, _ = ck.restore(template)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
  with pytest.raises(DivergedError, match="member 0"):
    train_many(tiny_apply, tiny_init, SCHED, data(), [np.arange(4)], [0], boom,
               strategy="map")


def test_samplers_refuse_non_finite_params():
  params = tiny_init(jax.random.key(0))
  params["w"] = params["w"].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="params hold 1 non-finite values"):
    diffusion.ddpm_sample(tiny_apply, params, SCHED, jax.random.key(0), (2, 2, 2, 1))
  with pytest.raises(ValueError, match="params hold 1 non-finite"):
    diffusion.ddim_sample(tiny_apply, params, SCHED, jax.random.key(0), (2, 2, 2, 1), 5)
