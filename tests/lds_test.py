"""LDS, noise ceiling, bootstrap, subset bookkeeping and validation-only selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jattr import diffusion
from jattr.eval import lds as lds_lib
from jattr.eval import measure, selection


def _tiny_apply(params, x, t):
  return jnp.tanh(x * params["w"] + (t[:, None, None, None] / 50.0) * params["b"])


def test_subset_masks_sizes_determinism_and_spread():
  m = lds_lib.subset_masks(101, 64, 0.5, seed=3)
  assert m.shape == (64, 101) and m.dtype == bool
  assert np.all(m.sum(1) == round(0.5 * 101))
  np.testing.assert_array_equal(m, lds_lib.subset_masks(101, 64, 0.5, seed=3))
  assert not np.array_equal(m, lds_lib.subset_masks(101, 64, 0.5, seed=4))
  assert len({r.tobytes() for r in m}) == 64
  # Every example is in about half the subsets.
  assert 0.3 < m.mean(0).min() and m.mean(0).max() < 0.7
  with pytest.raises(ValueError, match="alpha"):
    lds_lib.subset_masks(10, 4, 1.0)


def test_subset_sums_matches_loop():
  rng = np.random.default_rng(0)
  tau = rng.normal(size=(5, 12))
  masks = lds_lib.subset_masks(12, 7, 0.5, seed=1)
  got = lds_lib.subset_sums(tau, masks)
  want = np.array([[sum(tau[q, i] for i in range(12) if masks[j, i]) for j in range(7)]
                   for q in range(5)])
  np.testing.assert_allclose(got, want)
  with pytest.raises(ValueError, match=r"scores must be \[Q, N=12\]"):
    lds_lib.subset_sums(tau[:, :5], masks)
  with pytest.raises(ValueError, match="boolean"):
    lds_lib.subset_sums(tau, masks.astype(int))


def test_lds_matches_per_query_scipy_reference():
  rng = np.random.default_rng(1)
  tau = rng.normal(size=(6, 20))
  masks = lds_lib.subset_masks(20, 16, 0.5, seed=2)
  y = rng.normal(size=(6, 16, 3))
  got = lds_lib.lds_per_query(tau, masks, y)
  pred = tau @ masks.T
  want = [scipy.stats.spearmanr(-y[q].mean(-1), pred[q]).statistic for q in range(6)]
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_exact_linear_datamodel_recovers_correlation_one():
  rng = np.random.default_rng(2)
  q, n, m = 40, 200, 64
  tau = rng.normal(size=(q, n))
  masks = lds_lib.subset_masks(n, m, 0.5, seed=0)
  # Proponents (tau > 0) lower the loss: loss = c − Σ_{i∈S} τ + small noise.
  noise_scale = 0.01 * np.std(tau @ masks.T)
  loss = 3.0 - tau @ masks.T + noise_scale * rng.normal(size=(q, m))
  res = lds_lib.lds(tau, masks, loss, num_resamples=500)
  assert res.mean > 0.99
  assert res.ci_low <= res.mean <= res.ci_high
  # The opposite sign convention scores -1: the harness is not symmetric in τ.
  assert lds_lib.lds(-tau, masks, loss, num_resamples=10).mean < -0.99


def test_random_scores_give_lds_near_zero():
  rng = np.random.default_rng(3)
  q, n, m = 200, 100, 64
  tau_true = rng.normal(size=(q, n))
  masks = lds_lib.subset_masks(n, m, 0.5, seed=1)
  loss = -(tau_true @ masks.T)
  res = lds_lib.lds(rng.normal(size=(q, n)), masks, loss, num_resamples=2000, seed=0)
  assert abs(res.mean) < 0.03
  assert res.ci_low < 0 < res.ci_high


def test_noise_ceiling_identical_is_one_and_pure_noise_is_zero():
  rng = np.random.default_rng(4)
  base = rng.normal(size=(100, 64, 1))
  identical = np.concatenate([base, base], axis=-1)
  assert lds_lib.noise_ceiling(identical, num_resamples=100).mean == pytest.approx(1.0)
  noise = rng.normal(size=(100, 64, 4))
  c = lds_lib.noise_ceiling(noise, num_resamples=2000)
  assert abs(c.mean) < 0.04 and c.ci_low < 0 < c.ci_high
  # Signal + seed noise: the ceiling lies in between and grows with the halves' size.
  signal = rng.normal(size=(100, 64, 1))
  y = signal + 1.0 * rng.normal(size=(100, 64, 8))
  c2 = lds_lib.noise_ceiling(y[..., :2], num_resamples=10).mean
  c8 = lds_lib.noise_ceiling(y, num_resamples=10).mean
  assert 0.2 < c2 < c8 < 0.95
  with pytest.raises(ValueError, match="S=1"):
    lds_lib.noise_ceiling(base)


def test_split_halves_and_spearman_brown():
  y = np.arange(2 * 3 * 5, dtype=float).reshape(2, 3, 5)
  a, b = lds_lib.split_halves(y)
  np.testing.assert_allclose(a, y[..., :2].mean(-1))
  np.testing.assert_allclose(b, y[..., 2:4].mean(-1))
  np.testing.assert_allclose(lds_lib.spearman_brown(0.5), 2 / 3)


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
  v = np.random.default_rng(5).normal(0.3, 1.0, size=50)
  lo, hi = lds_lib.bootstrap_ci(v, num_resamples=2000, seed=7)
  assert (lo, hi) == lds_lib.bootstrap_ci(v, num_resamples=2000, seed=7)
  assert lo < v.mean() < hi
  # ~ mean ± 1.96 σ/√Q
  assert hi - lo == pytest.approx(2 * 1.96 * v.std() / np.sqrt(50), rel=0.15)
  with pytest.raises(ValueError, match="confidence"):
    lds_lib.bootstrap_ci(v, confidence=1.5)


def test_paired_difference_is_sharper_than_the_two_intervals():
  rng = np.random.default_rng(3)
  difficulty = rng.normal(0.5, 0.2, size=80)  # shared by both methods, query by query
  a = lds_lib.summarize(difficulty + 0.02 + rng.normal(0, 0.01, 80))
  b = lds_lib.summarize(difficulty + rng.normal(0, 0.01, 80))
  d = lds_lib.paired_difference(a, b)
  np.testing.assert_allclose(d.per_query, a.per_query - b.per_query)
  assert d.mean == pytest.approx(a.mean - b.mean)
  assert a.ci_low < b.ci_high  # the unpaired intervals overlap ...
  assert 0 < d.ci_low < 0.02 < d.ci_high  # ... the paired one excludes 0
  with pytest.raises(ValueError, match="the same queries"):
    lds_lib.paired_difference(a, lds_lib.summarize(difficulty[:10]))


def test_measure_loss_matches_loop_over_draws():
  sched = diffusion.linear(50)
  images = jax.random.uniform(jax.random.key(0), (5, 4, 4, 1), minval=-1, maxval=1)
  draws = diffusion.fixed_draws(jax.random.key(1), 7, (4, 4, 1), 50)
  params = {"w": jnp.float32(0.7), "b": jnp.float32(0.2)}
  got = measure.measure_loss(_tiny_apply, params, sched, images, draws, query_chunk=2)
  for q in range(5):
    per_draw = [diffusion.per_example_loss(_tiny_apply, params, sched, images[q:q + 1],
                                           draws.t[k:k + 1], draws.eps[k:k + 1])[0]
                for k in range(7)]
    np.testing.assert_allclose(got[q], np.mean(per_draw), rtol=1e-5)
  stacked = {"w": jnp.array([0.7, -0.3]), "b": jnp.array([0.2, 0.1])}
  y = measure.measure_members(_tiny_apply, stacked, sched, images, draws)
  assert y.shape == (5, 2)
  np.testing.assert_allclose(y[:, 0], got, rtol=1e-5)
  with pytest.raises(ValueError, match="draws' image"):
    measure.measure_loss(_tiny_apply, params, sched, images[:, :2], draws)


def _split(name, images, y):
  return selection.QuerySet(selection.Queries(name, images), y)


def _selection_problem():
  rng = np.random.default_rng(6)
  n, m = 60, 32
  masks = lds_lib.subset_masks(n, m, 0.5, seed=0)
  splits = {}
  for name, q in (("validation", 30), ("test", 30), ("generated", 20)):
    images = rng.normal(size=(q, 2, 2, 1))
    tau = rng.normal(size=(q, n))
    y = -(tau @ masks.T)[..., None] + 0.5 * rng.normal(size=(q, m, 2)) * np.std(tau @ masks.T)
    splits[name] = (_split(name, images, y), tau)
  return masks, splits


def test_select_chooses_on_validation_and_scores_test_once():
  masks, splits = _selection_problem()
  truth = {name: tau for name, (_, tau) in splits.items()}
  by_images = {splits[name][0].queries.images.tobytes(): name for name in splits}
  calls = []

  def score_fn(h, queries):
    name = by_images[queries.images.tobytes()]
    calls.append((name, h["noise"]))
    rng = np.random.default_rng(0)
    return truth[name] + h["noise"] * rng.normal(size=truth[name].shape)

  grid = [{"noise": 10.0}, {"noise": 0.0}, {"noise": 1.0}]
  rep = selection.select_and_evaluate("oracle", score_fn, grid, masks, splits["validation"][0],
                                    [splits["test"][0], splits["generated"][0]],
                                    num_resamples=100)
  assert rep.selected_on == "validation"
  assert rep.chosen == {"noise": 0.0}
  assert np.argmax(rep.validation_lds) == 1
  # The grid is only ever run on validation; test and generated once, with the choice.
  assert [c for c in calls if c[0] != "validation"] == [("test", 0.0), ("generated", 0.0)]
  assert len([c for c in calls if c[0] == "validation"]) == 3
  assert rep.results["test"].mean > 0.5
  assert set(rep.ceilings) == {"test", "generated"}
  record = rep.to_dict()
  assert record["selected_on"] == "validation" and record["chosen"] == {"noise": 0.0}
  table = selection.results_table([rep])
  assert "oracle" in table and "noise ceiling" in table


def test_select_refuses_to_report_selection_queries():
  masks, splits = _selection_problem()
  val, test = splits["validation"][0], splits["test"][0]
  fn = lambda h, q: np.zeros((q.images.shape[0], masks.shape[1]))  # noqa: E731
  with pytest.raises(ValueError, match="cannot also be reported"):
    selection.select_and_evaluate("m", fn, [{}], masks, val, [val])
  with pytest.raises(ValueError, match="selected on the 'validation' split only"):
    selection.select_and_evaluate("m", fn, [{}], masks, test, [val])
  leaky = _split("test", np.concatenate([test.queries.images, val.queries.images[:1]]),
                 np.concatenate([test.y, val.y[:1]]))
  with pytest.raises(ValueError, match="shares images"):
    selection.select_and_evaluate("m", fn, [{}], masks, val, [leaky])
  with pytest.raises(ValueError, match="expected"):
    selection.select_and_evaluate("m", lambda h, q: np.zeros((2, 2)), [{}], masks, val, [test])
  with pytest.raises(ValueError, match="grid is empty"):
    selection.select_and_evaluate("m", fn, [], masks, val, [test])


def test_lds_keeps_precision_for_large_sums():
  # Subset sums of ~1e6 differing by ~1e-2: float32 would tie them; ranks must not.
  rng = np.random.default_rng(8)
  n, m = 50, 16
  masks = lds_lib.subset_masks(n, m, 0.5, seed=0)
  tau = 4e4 + 1e-3 * rng.normal(size=(3, n))
  loss = -(tau @ masks.T)
  assert lds_lib.lds(tau, masks, loss, num_resamples=10).mean == pytest.approx(1.0)
