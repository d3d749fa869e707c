"""Encoded ensembles: split designs, scores, the ensemble denoiser and forgetting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr import diffusion
from jattr.methods import ensembles
from jattr.train import TrainConfig, train_many


@pytest.mark.parametrize("group_size", [1, 3])
def test_binary_code_leaves_each_group_out_of_its_own_half(group_size):
  n, m = 30, 10  # G = 30 or 10 groups, b = 5 bits: 32 codes
  masks = ensembles.design_splits(n, m, "binary_code", seed=1, group_size=group_size)
  assert masks.shape == (m, n) and masks.dtype == bool
  b = m // 2
  np.testing.assert_array_equal(masks[:b], ~masks[b:])  # code and complement
  np.testing.assert_array_equal(masks.sum(axis=0), b)  # out of exactly M/2 members
  gid = np.arange(n) // group_size
  cols = {}
  for i in range(n):  # one column per group, distinct between groups
    cols.setdefault(gid[i], masks[:, i].tobytes())
    assert cols[gid[i]] == masks[:, i].tobytes()
  assert len(set(cols.values())) == len(cols)
  # the intended members: those whose bit of the group's code excludes it
  for i in range(n):
    out = np.flatnonzero(~masks[:, i])
    code_bits = masks[:b, i]
    expected = [j for j in range(b) if not code_bits[j]] + [b + j for j in range(b)
                                                             if code_bits[j]]
    np.testing.assert_array_equal(out, expected)


def test_random_half_and_groups():
  masks = ensembles.design_splits(20, 6, "random_half", seed=0)
  np.testing.assert_array_equal(masks.sum(axis=1), 10)
  again = ensembles.design_splits(20, 6, "random_half", seed=0)
  np.testing.assert_array_equal(masks, again)
  labels = np.array(["a", "b", "c", "d"] * 5)
  by_label = ensembles.design_splits(20, 4, "binary_code", groups=labels)
  for lab in "abcd":
    cols = by_label[:, labels == lab]
    assert np.all(cols == cols[:, :1])
  with pytest.raises(ValueError, match="distinguishes 2\\^2 = 4 groups, but there are 20"):
    ensembles.design_splits(20, 4, "binary_code")
  with pytest.raises(ValueError, match="even n_members"):
    ensembles.design_splits(4, 5, "binary_code")
  with pytest.raises(ValueError, match="kind must be"):
    ensembles.design_splits(4, 4, "thirds")
  a, b = ensembles.split_members(10, seed=3)
  assert len(a) == len(b) == 5 and not set(a) & set(b)


@pytest.mark.parametrize("kind", ["random_half", "binary_code"])
def test_planted_influential_example_ranks_first(kind):
  n, m, q = 40, 24, 3
  masks = ensembles.design_splits(n, m, kind, seed=2)
  rng = np.random.default_rng(0)
  planted = np.array([7, 19, 33])
  base = rng.normal(size=(q, 1))
  # the query's loss is higher for members that did not see its planted example
  y = base + 1.0 * ~masks[:, planted].T + 0.3 * rng.normal(size=(q, m))
  tau = np.asarray(ensembles.ensemble_scores(y, masks))
  assert tau.shape == (q, n)
  np.testing.assert_array_equal(np.argmax(tau, axis=1), planted)
  i, qq = 5, 1  # against the definition, written out
  expected = y[qq, ~masks[:, i]].mean() - y[qq, masks[:, i]].mean()
  np.testing.assert_allclose(tau[qq, i], expected, rtol=1e-5)


def test_harness_score_fn_uses_only_the_scoring_members():
  import types
  masks = ensembles.design_splits(12, 8, "random_half", seed=4)
  y = np.random.default_rng(1).normal(size=(3, 8, 2))  # [Q, M, S]
  score, _ = ensembles.split_members(8, seed=0)
  fn = ensembles.ensemble_score_fn(masks, {"test": y}, score)
  queries = types.SimpleNamespace(name="test", images=np.zeros((3, 4, 4, 1)))
  np.testing.assert_allclose(fn({}, queries),
                             ensembles.ensemble_scores(y[:, score].mean(-1), masks[score]))
  with pytest.raises(ValueError, match="no member measurements for the 'generated' split"):
    fn({}, types.SimpleNamespace(name="generated", images=queries.images))


def test_scores_reject_unidentifiable_examples():
  masks = np.ones((4, 3), bool)
  masks[:2, 0] = False
  with pytest.raises(ValueError, match=r"examples \[1, 2\] \(of 2\) are seen by all members"):
    ensembles.ensemble_scores(np.zeros((1, 4)), masks)
  with pytest.raises(ValueError, match="measurements must be"):
    ensembles.ensemble_scores(np.zeros((1, 5)), masks)


def test_ensemble_apply_averages_selected_members():
  apply = lambda p, x, t: p["w"] * x + p["b"]  # noqa: E731
  stacked = {"w": jnp.array([1.0, 2.0, 4.0]), "b": jnp.array([0.0, 1.0, -1.0])}
  x, t = jnp.ones((2, 2, 2, 1)), jnp.zeros((2,), jnp.int32)
  ens = ensembles.ensemble_apply_fn(apply)
  np.testing.assert_allclose(ens(ensembles.ensemble_params(stacked), x, t), 7 / 3)
  sel = ensembles.ensemble_params(stacked, np.array([False, True, True]))
  np.testing.assert_allclose(ens(sel, x, t), 3.0)
  masks = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], bool)
  np.testing.assert_array_equal(ensembles.forget(masks, [0]), [False, True, False])
  np.testing.assert_array_equal(ensembles.forget(masks, np.array([0, 0, 1, 1], bool)),
                                [True, False, False])
  with pytest.raises(ValueError, match="none is left"):
    ensembles.forget(masks, [0, 2])
  with pytest.raises(ValueError, match="selects no member"):
    ensembles.ensemble_params(stacked, np.zeros(3, bool))


def _mlp_init(key, hidden=64):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"w1": jax.random.normal(k1, (16, hidden)) / 4.0, "b1": jnp.zeros(hidden),
          "temb": jax.random.normal(k2, (hidden,)),
          "w2": jax.random.normal(k3, (hidden, 16)) * 0.02, "b2": jnp.zeros(16)}


def _mlp_apply(p, x, t):
  h = x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"] + (t[:, None] / 50.0) * p["temb"]
  return (jax.nn.gelu(h) @ p["w2"] + p["b2"]).reshape(x.shape)


def test_forgetting_a_group_changes_the_samples():
  sched = diffusion.linear(50)
  noise = 0.1 * jax.random.normal(jax.random.key(0), (16, 4, 4, 1))
  labels = np.repeat([0, 1], 8)
  data = noise + jnp.where(labels[:, None, None, None] == 0, 0.6, -0.6)
  masks = ensembles.design_splits(16, 2, "binary_code", groups=labels)  # one class per member
  cfg = TrainConfig(num_steps=300, batch_size=16, learning_rate=1e-2, warmup_steps=5,
                    segment_steps=300)
  res = train_many(_mlp_apply, _mlp_init, sched, data, masks, [0, 0], cfg, strategy="vmap",
                   progress=False)
  ens = ensembles.ensemble_apply_fn(_mlp_apply)
  sample = jax.jit(lambda p: diffusion.ddpm_sample(ens, p, sched, jax.random.key(4),
                                                   (32, 4, 4, 1)))
  means = {}
  for cls in (0, 1):
    keep = ensembles.forget(masks, labels == cls)
    means[cls] = float(jnp.mean(sample(ensembles.ensemble_params(res.state.ema_params, keep))))
  both = float(jnp.mean(sample(ensembles.ensemble_params(res.state.ema_params))))
  assert means[0] < -0.4 and means[1] > 0.4  # forgetting a class leaves only the other
  assert means[0] < both < means[1]
