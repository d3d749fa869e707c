"""Training loop, train_many and checkpoint-resume tests on a tiny conv denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr import diffusion
from jattr.io import checkpoint
from jattr.train import loop as loop_lib
from jattr.train import (TrainConfig, draw_batch, make_subsets, member_keys, train,
                         train_many)
from toy_models import tiny_apply, tiny_init

SCHED = diffusion.linear(50)
CFG = TrainConfig(num_steps=6, batch_size=4, learning_rate=1e-2, warmup_steps=2,
                  segment_steps=3)


def make_data(n=12):
  return jax.random.uniform(jax.random.key(3), (n, 4, 4, 1), minval=-1, maxval=1)


def test_training_reduces_loss():
  cfg = TrainConfig(num_steps=60, batch_size=8, learning_rate=2e-2, warmup_steps=5,
                    segment_steps=30)
  init_key, train_key = member_keys(0)
  _, losses = train(tiny_apply, tiny_init(init_key), SCHED, make_data(), cfg, train_key,
                    progress=False)
  assert losses.shape == (60,)
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_segmentation_does_not_change_results():
  data = make_data()
  init_key, train_key = member_keys(1)
  a, la = train(tiny_apply, tiny_init(init_key), SCHED, data, CFG, train_key, progress=False)
  cfg1 = TrainConfig(**{**CFG.__dict__, "segment_steps": 6})
  b, lb = train(tiny_apply, tiny_init(init_key), SCHED, data, cfg1, train_key, progress=False)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
               a.params, b.params)


@pytest.mark.parametrize("strategy,chunk", [("map", None), ("vmap", None), ("chunked", 2)])
def test_train_many_equals_separate_training(strategy, chunk):
  data = make_data()
  subsets = [np.array([0, 2, 4, 6, 8]), np.array([1, 3, 5, 7, 9, 11]), np.arange(12)]
  seeds = [5, 5, 7]
  res = train_many(tiny_apply, tiny_init, SCHED, data, subsets, seeds, CFG, strategy=strategy,
                   chunk_size=chunk, progress=False)
  assert res.strategy == strategy
  assert res.losses.shape == (3, CFG.num_steps)
  for m, (sub, seed) in enumerate(zip(subsets, seeds)):
    init_key, train_key = member_keys(seed)
    alone, losses = train(tiny_apply, tiny_init(init_key), SCHED, data, CFG, train_key,
                          indices=sub, progress=False)
    np.testing.assert_allclose(res.losses[m], losses, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x[m], y, rtol=1e-4, atol=1e-6),
                 res.state.ema_params, alone.ema_params)


def test_auto_strategy_picks_a_real_strategy():
  data = make_data()
  res = train_many(tiny_apply, tiny_init, SCHED, data, [np.arange(6), np.arange(6, 12)], [0, 1],
                   TrainConfig(num_steps=2, batch_size=2, segment_steps=2), progress=False)
  assert res.strategy in ("map", "vmap")


def test_common_random_numbers_share_positions_t_and_eps():
  data = make_data()
  key = jax.random.key(0)
  a = draw_batch(key, data, jnp.arange(0, 12, 2), 6, 8, 50)
  b = draw_batch(key, data, jnp.arange(1, 12, 2), 6, 8, 50)
  # Same key: the same timesteps and noise, and positions that pick the k-th
  # element of each subset alike (here: odd = even + 1 in index space).
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_array_equal(a[2], b[2])
  pos_a = np.searchsorted(np.arange(0, 12, 2), [np.argmin(np.abs(data - x).sum((1, 2, 3)))
                                                for x in a[0]])
  pos_b = np.searchsorted(np.arange(1, 12, 2), [np.argmin(np.abs(data - x).sum((1, 2, 3)))
                                                for x in b[0]])
  np.testing.assert_array_equal(pos_a, pos_b)


def test_same_seed_same_subset_identical_members():
  data = make_data()
  res = train_many(tiny_apply, tiny_init, SCHED, data, [np.arange(8)] * 2, [3, 3], CFG,
                   strategy="map", progress=False)
  jax.tree.map(lambda x: np.testing.assert_array_equal(x[0], x[1]), res.state.params)
  res2 = train_many(tiny_apply, tiny_init, SCHED, data, [np.arange(8)] * 2, [3, 4], CFG,
                    strategy="map", progress=False)
  assert not np.allclose(res2.state.params["conv1"][0], res2.state.params["conv1"][1])


class _Killed(Exception):
  pass


def _kill_after_first_save(monkeypatch):
  real_save = checkpoint.save
  calls = {"n": 0}

  def save(*args, **kwargs):
    real_save(*args, **kwargs)
    calls["n"] += 1
    if calls["n"] == 1:
      raise _Killed()

  monkeypatch.setattr(checkpoint, "save", save)
  return lambda: monkeypatch.setattr(checkpoint, "save", real_save)


def test_train_resume_after_interruption_is_identical(tmp_path, monkeypatch):
  data = make_data()
  init_key, train_key = member_keys(2)
  ref, ref_losses = train(tiny_apply, tiny_init(init_key), SCHED, data, CFG, train_key,
                          progress=False)
  restore = _kill_after_first_save(monkeypatch)
  with pytest.raises(_Killed):
    train(tiny_apply, tiny_init(init_key), SCHED, data, CFG, train_key,
          checkpointer=checkpoint.Checkpointer(tmp_path / "ck"), progress=False)
  assert checkpoint.latest_step(tmp_path / "ck") == 3
  restore()
  out, losses = train(tiny_apply, tiny_init(init_key), SCHED, data, CFG, train_key,
                      checkpointer=checkpoint.Checkpointer(tmp_path / "ck"), progress=False)
  np.testing.assert_array_equal(losses, ref_losses)
  jax.tree.map(np.testing.assert_array_equal, out, ref)


def test_train_many_resume_after_interruption_is_identical(tmp_path, monkeypatch):
  data = make_data()
  args = (tiny_apply, tiny_init, SCHED, data, [np.arange(6), np.arange(3, 12)], [0, 1], CFG)
  ref = train_many(*args, strategy="map", progress=False)
  restore = _kill_after_first_save(monkeypatch)
  with pytest.raises(_Killed):
    train_many(*args, strategy="map", checkpointer=checkpoint.Checkpointer(tmp_path / "ck"), progress=False)
  restore()
  out = train_many(*args, strategy="map", checkpointer=checkpoint.Checkpointer(tmp_path / "ck"), progress=False)
  np.testing.assert_array_equal(out.losses, ref.losses)
  jax.tree.map(np.testing.assert_array_equal, out.state, ref.state)


def test_resume_refuses_a_different_job(tmp_path):
  data = make_data()
  init_key, train_key = member_keys(0)
  train(tiny_apply, tiny_init(init_key), SCHED, data, CFG, train_key,
        checkpointer=checkpoint.Checkpointer(tmp_path), progress=False)
  other = TrainConfig(**{**CFG.__dict__, "learning_rate": 0.5})
  with pytest.raises(ValueError, match="different job"):
    train(tiny_apply, tiny_init(init_key), SCHED, data, other, train_key,
          checkpointer=checkpoint.Checkpointer(tmp_path), progress=False)


def test_subset_validation_errors():
  with pytest.raises(ValueError, match=r"shape \[M, N=5\]"):
    make_subsets(np.ones((2, 4), bool), 5)
  with pytest.raises(ValueError, match="outside"):
    make_subsets([np.array([0, 7])], 5)
  with pytest.raises(ValueError, match="repeats"):
    make_subsets([np.array([1, 1])], 5)
  with pytest.raises(ValueError, match="empty"):
    make_subsets([np.array([], int)], 5)
  table = make_subsets(np.array([[1, 0, 1, 0, 0], [0, 1, 1, 1, 1]], bool), 5)
  np.testing.assert_array_equal(table.counts, [2, 4])
  np.testing.assert_array_equal(table.masks(), [[1, 0, 1, 0, 0], [0, 1, 1, 1, 1]])
  with pytest.raises(ValueError, match="one seed per subset"):
    train_many(tiny_apply, tiny_init, SCHED, make_data(), [np.arange(3)], [0, 1], CFG,
               progress=False)
  with pytest.raises(ValueError, match="strategy"):
    train_many(tiny_apply, tiny_init, SCHED, make_data(), [np.arange(3)], [0], CFG,
               strategy="pmap", progress=False)


def test_config_validation():
  with pytest.raises(ValueError, match="batch_size"):
    TrainConfig(batch_size=0)
  with pytest.raises(ValueError, match="ema_decay"):
    TrainConfig(ema_decay=1.0)
