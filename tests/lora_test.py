"""LoRA adapters (jattr.models.lora): the math, training the adapter alone with the
base frozen (jattr.wrt.restrict + jattr.train), and checkpoints of the adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr import diffusion
from jattr.io import checkpoint
from jattr.models import (LORA, lora_apply_fn, lora_init, lora_merge, lora_model,
                          lora_num_params, lora_targets)
from jattr.train import TrainConfig, member_keys, train, train_many
from jattr.wrt import merge, param_paths, restrict

SCHED = diffusion.linear(50)
CFG = TrainConfig(num_steps=40, batch_size=8, learning_rate=3e-2, warmup_steps=2,
                  segment_steps=20)


def toy_init(key, hidden=4):
  """A conv → dense (per pixel) → conv denoiser with biases: kernels of ndim 4 and 2."""
  k1, k2, k3 = jax.random.split(key, 3)
  return {"conv1": {"kernel": jax.random.normal(k1, (3, 3, 1, hidden)) * 0.3,
                    "bias": jnp.zeros((hidden,))},
          "mix": {"kernel": jax.random.normal(k2, (hidden, hidden)) * 0.5,
                  "bias": jnp.full((hidden,), 0.1)},
          "temb": jnp.linspace(-0.1, 0.1, hidden),
          "out": [{"kernel": jax.random.normal(k3, (3, 3, hidden, 1)) * 0.3}]}


def toy_apply(params, x, t):
  conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = conv(x, params["conv1"]["kernel"]) + params["conv1"]["bias"]
  h = h + (t[:, None, None, None] / 50.0) * params["temb"]
  h = jnp.tanh(h) @ params["mix"]["kernel"] + params["mix"]["bias"]
  return conv(jnp.tanh(h), params["out"][0]["kernel"])


def data(n=12, seed=3):
  return jax.random.uniform(jax.random.key(seed), (n, 4, 4, 1), minval=-1, maxval=1)


BASE = toy_init(jax.random.key(0))
X = data(4)
T = jnp.array([0, 10, 25, 49])


def test_default_targets_are_the_kernels_and_keys_are_paths():
  assert lora_targets(BASE) == ["conv1/kernel", "mix/kernel", "out/0/kernel"]
  adapter = lora_init(jax.random.key(1), BASE, rank=2)
  assert sorted(adapter) == ["conv1/kernel", "mix/kernel", "out/0/kernel"]
  assert adapter["conv1/kernel"]["a"].shape == (9, 2)   # 3·3·1 = d_in
  assert adapter["conv1/kernel"]["b"].shape == (2, 4)
  assert adapter["out/0/kernel"]["a"].shape == (36, 2)
  np.testing.assert_array_equal(adapter["mix/kernel"]["b"], 0.0)
  assert lora_num_params(BASE, 2) == sum(x.size for x in jax.tree.leaves(adapter))
  assert param_paths({"lora": adapter})[0] == "lora/conv1/kernel/a"
  assert lora_targets(BASE, "^mix") == ["mix/kernel"]
  with pytest.raises(ValueError, match="ndim >= 2"):
    lora_targets(BASE, "bias")  # selects leaves, but no matrix among them
  with pytest.raises(ValueError, match="rank"):
    lora_init(jax.random.key(1), BASE, rank=0)


def test_adapted_model_equals_the_base_at_init():
  apply, params = lora_model(toy_apply, BASE, jax.random.key(1), rank=2, alpha=4.0)
  np.testing.assert_array_equal(apply(params, X, T), toy_apply(BASE, X, T))


def test_merge_is_w_plus_scaled_low_rank_product():
  adapter = lora_init(jax.random.key(1), BASE, rank=2)
  adapter = jax.tree.map(lambda x: x + 0.1, adapter)  # B ≠ 0
  merged = lora_merge({"base": BASE, "lora": adapter}, alpha=3.0)
  a, b = adapter["conv1/kernel"]["a"], adapter["conv1/kernel"]["b"]
  want = BASE["conv1"]["kernel"].reshape(9, 4) + 1.5 * a @ b  # α/r = 3/2
  np.testing.assert_allclose(merged["conv1"]["kernel"].reshape(9, 4), want, rtol=1e-6)
  np.testing.assert_array_equal(merged["conv1"]["bias"], BASE["conv1"]["bias"])
  out = lora_apply_fn(toy_apply, alpha=3.0)({"base": BASE, "lora": adapter}, X, T)
  np.testing.assert_allclose(out, toy_apply(merged, X, T), rtol=1e-6)
  # the pattern a layer registry reads in the jaxpr: w + c * reshape(dot_general(a, b)),
  # the reshape absent for a 2-D kernel (jax drops a reshape to the same shape)
  jaxpr = jax.make_jaxpr(lambda p: lora_merge(p, alpha=3.0))({"base": BASE, "lora": adapter})
  names = [e.primitive.name for e in jaxpr.eqns]
  assert names.count("dot_general") == 3 and names.count("reshape") == 2
  assert names.count("mul") == 3 and names.count("add") == 3
  with pytest.raises(ValueError, match="no paths"):
    lora_merge({"base": BASE, "lora": {"nope/kernel": adapter["mix/kernel"]}})
  with pytest.raises(ValueError, match="do not fit"):
    lora_merge({"base": BASE, "lora": {"mix/kernel": adapter["conv1/kernel"]}})


def lora_problem(seed=0):
  apply, params = lora_model(toy_apply, BASE, member_keys(seed)[0], rank=2)
  apply_sub, sub = restrict(apply, params, LORA)
  return apply, params, apply_sub, sub


def test_training_the_adapter_keeps_the_base_bit_identical():
  apply, params, apply_sub, sub = lora_problem()
  base_before = jax.tree.map(np.array, BASE)
  state, losses = train(apply_sub, sub, SCHED, data(), CFG, member_keys(0)[1], progress=False)
  assert losses.shape == (CFG.num_steps,)
  assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
  # only the adapter is in the trained state; the base is untouched, bit for bit
  assert all(p.startswith("lora/") for p in param_paths(state.params))
  jax.tree.map(np.testing.assert_array_equal, BASE, base_before)
  trained = merge(params, state.params, LORA)
  jax.tree.map(np.testing.assert_array_equal, trained["base"], base_before)
  assert not np.allclose(trained["lora"]["mix/kernel"]["b"], 0.0)
  assert not np.allclose(trained["lora"]["conv1/kernel"]["a"], params["lora"]["conv1/kernel"]["a"])
  np.testing.assert_allclose(apply_sub(state.params, X, T), apply(trained, X, T), rtol=1e-6)


def test_train_many_trains_adapters_with_a_frozen_base():
  _, _, apply_sub, sub = lora_problem()
  init_fn = lambda key: {**sub, "lora": lora_init(key, BASE, rank=2)}  # noqa: E731
  cfg = TrainConfig(num_steps=4, batch_size=4, learning_rate=1e-2, warmup_steps=1,
                    segment_steps=2)
  res = train_many(apply_sub, init_fn, SCHED, data(), [np.arange(6), np.arange(4, 12)], [0, 1],
                   cfg, strategy="map", progress=False)
  alone, losses = train(apply_sub, init_fn(member_keys(1)[0]), SCHED, data(), cfg,
                        member_keys(1)[1], indices=np.arange(4, 12), progress=False)
  np.testing.assert_allclose(res.losses[1], losses, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x[1], y, rtol=1e-4, atol=1e-6),
               res.state.params, alone.params)


class _Killed(Exception):
  pass


def test_adapter_checkpoints_round_trip_and_resume(tmp_path, monkeypatch):
  _, _, apply_sub, sub = lora_problem()
  cfg = TrainConfig(num_steps=6, batch_size=4, learning_rate=1e-2, warmup_steps=2,
                    segment_steps=3)
  key = member_keys(0)[1]
  ref, ref_losses = train(apply_sub, sub, SCHED, data(), cfg, key, progress=False)
  real_save = checkpoint.save

  def save_then_die(*args, **kwargs):
    real_save(*args, **kwargs)
    raise _Killed()

  monkeypatch.setattr(checkpoint, "save", save_then_die)
  with pytest.raises(_Killed):
    train(apply_sub, sub, SCHED, data(), cfg, key,
          checkpointer=checkpoint.Checkpointer(tmp_path / "ck"), progress=False)
  monkeypatch.setattr(checkpoint, "save", real_save)
  assert checkpoint.latest_step(tmp_path / "ck") == 3
  # the "/" keys of the adapter round-trip: same tree, same values
  saved, _, _ = checkpoint.restore(tmp_path / "ck", ref)
  assert jax.tree.structure(saved) == jax.tree.structure(ref)
  assert sorted(saved.params["lora"]) == sorted(sub["lora"])
  out, losses = train(apply_sub, sub, SCHED, data(), cfg, key,
                      checkpointer=checkpoint.Checkpointer(tmp_path / "ck"), progress=False)
  np.testing.assert_array_equal(losses, ref_losses)
  jax.tree.map(np.testing.assert_array_equal, out, ref)
