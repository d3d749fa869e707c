"""Counterfactual retraining: removal sets, same-noise regeneration, L2/SSIM bookkeeping."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr import diffusion
from jattr.eval import counterfactual as cf
from jattr.eval.ssim import ssim
from jattr.io.checkpoint import Checkpointer
from jattr.train import TrainConfig, member_keys, train
from toy_models import tiny_apply, tiny_init

SCHED = diffusion.linear(50)
CFG = TrainConfig(num_steps=6, batch_size=4, learning_rate=1e-2, warmup_steps=1,
                  segment_steps=3)


def sample_fn(params, key):
  return diffusion.ddim_sample(tiny_apply, params, SCHED, key, (1, 4, 4, 1), num_steps=5)[0]


def test_removal_sets_top_k_and_random_control():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(5, 30))
  top, rand = cf.removal_sets(scores, 7, seed=1)
  assert top.shape == rand.shape == (5, 7)
  for q in range(5):
    want = sorted(sorted(range(30), key=lambda i: -scores[q, i])[:7])
    assert top[q].tolist() == want
    assert len(set(rand[q].tolist())) == 7 and rand[q].max() < 30
  np.testing.assert_array_equal(rand, cf.removal_sets(scores, 7, seed=1)[1])
  assert not np.array_equal(rand, cf.removal_sets(scores, 7, seed=2)[1])
  with pytest.raises(ValueError, match="k must be in"):
    cf.removal_sets(scores, 30)


def test_counterfactual_matches_manual_retraining_and_regeneration(tmp_path):
  data = np.asarray(jax.random.uniform(jax.random.key(3), (12, 4, 4, 1), minval=-1, maxval=1))
  seed = 5
  init_key, train_key = member_keys(seed)
  full, _ = train(tiny_apply, tiny_init(init_key), SCHED, data, CFG, train_key, progress=False)
  keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(9), j))(jnp.arange(2))
  originals = np.asarray(jax.vmap(lambda k: sample_fn(full.ema_params, k))(keys))
  scores = np.asarray(jax.random.normal(jax.random.key(4), (2, 12)))
  # The random controls train in their own checkpoint (control_checkpointer); the member
  # checked by hand below is one of them.
  res = cf.counterfactual(tiny_apply, tiny_init, SCHED, data, CFG, scores, sample_fn, keys,
                          originals, seed=seed, ks=(2, 4), checkpointer=Checkpointer(tmp_path / "a"),
                          control_checkpointer=Checkpointer(tmp_path / "control"), progress=False)
  assert res.l2.shape == res.ssim.shape == (2, 2, 2)
  assert res.samples.shape == (2, 2, 2, 4, 4, 1)
  top, rand = cf.removal_sets(scores, 4, seed=1)  # ks[1] uses random_seed + 1
  np.testing.assert_array_equal(res.removed[0, 1], top)
  np.testing.assert_array_equal(res.removed[1, 1], rand)
  assert np.all(res.removed[:, 0, :, 2:] == -1)
  # One member by hand: query 1, k = 4, random removal.
  keep = np.setdiff1d(np.arange(12), rand[1])
  alone, _ = train(tiny_apply, tiny_init(init_key), SCHED, data, CFG, train_key, indices=keep,
                   progress=False)
  x = np.asarray(sample_fn(alone.ema_params, keys[1]))
  np.testing.assert_allclose(res.samples[1, 1, 1], x, atol=1e-4)
  np.testing.assert_allclose(res.l2[1, 1, 1], np.linalg.norm(x - originals[1]), rtol=1e-3)
  np.testing.assert_allclose(res.ssim[1, 1, 1], float(ssim(originals[1], x)), atol=1e-4)
  rows = res.summary()
  assert [r["k"] for r in rows] == [2, 4]
  assert set(rows[0]) >= {"l2_attributed", "l2_random", "ssim_attributed", "ssim_random"}


def test_counterfactual_argument_errors():
  data = np.zeros((6, 4, 4, 1), np.float32)
  keys = jax.random.split(jax.random.key(0), 2)
  with pytest.raises(ValueError, match=r"scores must be \[Q=2, N=6\]"):
    cf.counterfactual(tiny_apply, tiny_init, SCHED, data, CFG, np.zeros((2, 5)), sample_fn,
                      keys, np.zeros((2, 4, 4, 1)), seed=0)
  with pytest.raises(ValueError, match="one key per query"):
    cf.counterfactual(tiny_apply, tiny_init, SCHED, data, CFG, np.zeros((2, 6)), sample_fn,
                      keys[:1], np.zeros((2, 4, 4, 1)), seed=0)


def test_shared_controls_are_trained_once(tmp_path, monkeypatch):
  data = np.asarray(jax.random.uniform(jax.random.key(3), (12, 4, 4, 1), minval=-1, maxval=1))
  keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(9), j))(jnp.arange(2))
  originals = np.zeros((2, 4, 4, 1), np.float32)
  scores = np.asarray(jax.random.normal(jax.random.key(4), (2, 12)))
  kw = dict(seed=5, ks=(3,), progress=False)
  args = (tiny_apply, tiny_init, SCHED, data, CFG)
  split = cf.counterfactual(*args, scores, sample_fn, keys, originals,
                            checkpointer=Checkpointer(tmp_path / "a"), control_checkpointer=Checkpointer(tmp_path / "control"),
                            **kw)
  # Another method's scores: only its attributed models train; the controls are
  # restored from the control checkpoint, unchanged.
  trained = []
  real = cf.train_many

  def spy(*a, checkpointer=None, **k):
    before = checkpointer is not None and (checkpointer.directory / "6").exists()
    trained.append((checkpointer.directory.name, before))
    return real(*a, checkpointer=checkpointer, **k)

  monkeypatch.setattr(cf, "train_many", spy)
  other = cf.counterfactual(*args, -scores, sample_fn, keys, originals,
                            checkpointer=Checkpointer(tmp_path / "b"), control_checkpointer=Checkpointer(tmp_path / "control"),
                            **kw)
  assert trained == [("b", False), ("control", True)]
  np.testing.assert_array_equal(other.samples[1], split.samples[1])
  np.testing.assert_array_equal(other.removed[1], split.removed[1])


def test_chosen_hparams_come_from_a_validation_selected_record(tmp_path):
  import json

  from jattr.bench import chosen_hparams

  path = tmp_path / "r.json"
  report = {"method": "m", "selected_on": "validation", "chosen": {"learning_rate": 0.001}}
  path.write_text(json.dumps({"spec_digest": "abc", "reports": [report]}))
  assert chosen_hparams(path, "m", "abc") == {"learning_rate": 0.001}
  with pytest.raises(ValueError, match="another benchmark"):
    chosen_hparams(path, "m", "xyz")
  with pytest.raises(ValueError, match="no report for 'n'"):
    chosen_hparams(path, "n", "abc")
  path.write_text(json.dumps({"spec_digest": "abc",
                              "reports": [{**report, "selected_on": "test"}]}))
  with pytest.raises(ValueError, match="not on 'validation'"):
    chosen_hparams(path, "m", "abc")
