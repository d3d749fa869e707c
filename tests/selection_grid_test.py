"""Grid widening and edge flags of validation-only selection (``select_and_evaluate``)."""

import json

import numpy as np
import pytest

from jattr.eval import lds as lds_lib
from jattr.eval import selection

_N, _M = 40, 24


def _split(name, images, y):
  return selection.QuerySet(selection.Queries(name, images), y)


def _problem():
  """Masks, validation and test splits from a known linear datamodel, and their τ."""
  rng = np.random.default_rng(0)
  masks = lds_lib.subset_masks(_N, _M, 0.5, seed=0)
  splits, truth = {}, {}
  for name, q in (("validation", 16), ("test", 8)):
    tau = rng.normal(size=(q, _N))
    sums = tau @ masks.T
    y = -sums[..., None] + 0.05 * np.std(sums) * rng.normal(size=(q, _M, 2))
    splits[name] = _split(name, rng.normal(size=(q, 2, 2, 1)), y)
    truth[splits[name].queries.images.tobytes()] = (name, tau)
  return masks, splits, truth


def _peaked_score_fn(truth, key, optimum, calls):
  """τ = truth + |log10(h / optimum)| · fixed noise: the LDS peaks at ``optimum``."""
  noise = {}

  def score_fn(h, queries):
    name, tau = truth[queries.images.tobytes()]
    calls.append((name, h[key]))
    if name not in noise:
      noise[name] = np.random.default_rng(1).normal(size=tau.shape)
    return tau + 0.7 * abs(np.log10(h[key] / optimum)) * noise[name]

  return score_fn


def _run(grid, optimum, key="c", **kw):
  masks, splits, truth = _problem()
  calls = []
  fn = _peaked_score_fn(truth, key, optimum, calls)
  rep = selection.select_and_evaluate("m", fn, grid, masks, splits["validation"],
                                      [splits["test"]], num_resamples=20, **kw)
  return rep, calls


def _values(rep, key="c"):
  return [h[key] for h in rep.grid]


def test_widening_reaches_an_optimum_beyond_the_upper_edge():
  rep, calls = _run([{"c": c} for c in (1.0, 10.0, 100.0)], optimum=1e4)
  assert _values(rep) == [1.0, 10.0, 100.0, 1000.0, 1e4, 1e5]
  assert rep.chosen == {"c": 1e4} and not rep.at_edge
  assert len(rep.validation_lds) == 6 and int(np.argmax(rep.validation_lds)) == 4
  # Every added point was scored on validation in turn; test only with the choice.
  assert [c for n, c in calls if n == "validation"] == [1.0, 10.0, 100.0, 1000.0, 1e4, 1e5]
  assert [c for n, c in calls if n == "test"] == [1e4]
  assert "(grid edge)" not in selection.results_table([rep], ("test",))


def test_widening_stops_after_max_widen_and_flags_the_edge():
  rep, calls = _run([{"c": c} for c in (1.0, 10.0, 100.0)], optimum=1e8, max_widen=2)
  assert _values(rep) == [1.0, 10.0, 100.0, 1000.0, 1e4]
  assert rep.chosen == {"c": 1e4} and rep.at_edge
  assert len([1 for n, _ in calls if n == "validation"]) == 5
  table = selection.results_table([rep], ("test",))
  assert "| m | c=10000.0 (grid edge) |" in table
  # max_widen=0 scores the grid as given.
  rep0, _ = _run([{"c": c} for c in (1.0, 10.0, 100.0)], optimum=1e8, max_widen=0)
  assert _values(rep0) == [1.0, 10.0, 100.0] and rep0.chosen == {"c": 100.0} and rep0.at_edge
  assert "c=100.0 (grid edge)" in selection.results_table([rep0], ("test",))
  with pytest.raises(ValueError, match="max_widen"):
    _run([{"c": 1.0}, {"c": 10.0}], optimum=1.0, max_widen=-1)


def test_widening_below_the_lower_edge_with_damping_like_values():
  grid = [{"c": c} for c in (1e-4, 1e-3, 1e-2, 1e-1)]
  rep, _ = _run(grid, optimum=1e-6)
  assert _values(rep) == [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]  # clean decades
  assert rep.chosen == {"c": 1e-6} and not rep.at_edge


def test_interior_optimum_is_unchanged():
  grid = [{"c": c} for c in (1.0, 10.0, 100.0, 1000.0)]
  rep, calls = _run(grid, optimum=10.0)
  rep0, _ = _run(grid, optimum=10.0, max_widen=0)
  assert rep.grid == grid and rep.chosen == {"c": 10.0} and not rep.at_edge
  assert rep.validation_lds == rep0.validation_lds  # bit-identical to no widening
  assert rep.results["test"].to_dict() == rep0.results["test"].to_dict()
  assert len(calls) == 5  # 4 validation + 1 test


def test_decreasing_grid_keeps_its_direction():
  grid = [{"c": c} for c in (100.0, 10.0, 1.0)]
  rep, _ = _run(grid, optimum=0.01)
  assert _values(rep) == [100.0, 10.0, 1.0, 0.1, 0.01, 0.001]
  assert rep.chosen == {"c": 0.01} and not rep.at_edge
  rep, _ = _run(grid, optimum=1e4)  # the first (largest) edge: prepended
  assert _values(rep) == [1e5, 1e4, 1000.0, 100.0, 10.0, 1.0]
  assert rep.chosen == {"c": 1e4} and not rep.at_edge


def test_integer_grid_widens_to_integers_only():
  rep, _ = _run([{"k": k} for k in (1, 2, 4)], optimum=16, key="k")
  assert _values(rep, "k") == [1, 2, 4, 8, 16, 32]
  assert all(type(v) is int for v in _values(rep, "k")) and rep.chosen == {"k": 16}
  rep, _ = _run([{"k": k} for k in (1, 2, 4)], optimum=0.25, key="k")  # 1/2 is no integer
  assert _values(rep, "k") == [1, 2, 4] and rep.chosen == {"k": 1} and rep.at_edge


def test_non_geometric_and_multi_key_grids_are_not_widened():
  # Sorted but not geometric: scored as given, the edge flagged.
  rep, _ = _run([{"c": c} for c in (1.0, 10.0, 50.0)], optimum=1e4)
  assert _values(rep) == [1.0, 10.0, 50.0] and rep.chosen == {"c": 50.0} and rep.at_edge
  # Several keys, one of them varying: not widened; its edge is an edge.
  masks, splits, truth = _problem()
  calls = []
  inner = _peaked_score_fn(truth, "c", 1e4, calls)
  grid = [{"c": c, "d": 1.0} for c in (1.0, 10.0, 100.0)]
  rep = selection.select_and_evaluate("m", inner, grid, masks, splits["validation"],
                                      [splits["test"]], num_resamples=20)
  assert rep.grid == grid and rep.chosen == {"c": 100.0, "d": 1.0} and rep.at_edge
  # Two varying keys: no single ordered axis, so no edge.
  grid = [{"c": 1.0, "d": 1.0}, {"c": 10.0, "d": 2.0}, {"c": 100.0, "d": 1.0}]
  rep = selection.select_and_evaluate("m", inner, grid, masks, splits["validation"],
                                      [splits["test"]], num_resamples=20)
  assert rep.grid == grid and rep.chosen == grid[-1] and not rep.at_edge
  # An unsorted single-key grid: its ends are not the ends of a range.
  rep, _ = _run([{"c": c} for c in (10.0, 1.0, 100.0)], optimum=1e4)
  assert _values(rep) == [10.0, 1.0, 100.0] and rep.chosen == {"c": 100.0}
  assert not rep.at_edge


def test_empty_hyperparameter_grid():
  masks, splits, truth = _problem()
  calls = []

  def fn(h, queries):
    calls.append(dict(h))
    return truth[queries.images.tobytes()][1]

  rep = selection.select_and_evaluate("m", fn, [{}], masks, splits["validation"],
                                      [splits["test"]], num_resamples=20)
  assert rep.grid == [{}] and rep.chosen == {} and not rep.at_edge and len(calls) == 2
  assert "| m | - |" in selection.results_table([rep], ("test",))


def test_a_flat_curve_stops_widening_at_the_first_tie():
  masks, splits, truth = _problem()
  fn = lambda h, queries: truth[queries.images.tobytes()][1]  # noqa: E731 - ignores c
  rep = selection.select_and_evaluate("m", fn, [{"c": c} for c in (1.0, 10.0, 100.0)], masks,
                                      splits["validation"], [splits["test"]], num_resamples=20)
  # one point below the edge ties: the plateau is bracketed, the choice stays
  assert _values(rep) == [0.1, 1.0, 10.0, 100.0]
  assert rep.chosen == {"c": 1.0} and not rep.at_edge


def test_report_round_trip_and_old_records():
  rep, _ = _run([{"c": c} for c in (1.0, 10.0, 100.0)], optimum=1e8, max_widen=1)
  assert rep.at_edge
  record = json.loads(json.dumps(rep.to_dict()))
  assert record["at_edge"] is True
  back = selection.MethodReport.from_dict(record)
  assert back.at_edge and back.grid == rep.grid and back.chosen == rep.chosen
  assert back.validation_lds == rep.validation_lds
  assert json.loads(json.dumps(back.to_dict())) == record
  interior, _ = _run([{"c": c} for c in (1.0, 10.0, 100.0)], optimum=10.0)
  assert not selection.MethodReport.from_dict(json.loads(json.dumps(interior.to_dict()))).at_edge
  # A record written before at_edge existed: recomputed from its grid and choice.
  old = {k: v for k, v in record.items() if k != "at_edge"}
  assert selection.MethodReport.from_dict(old).at_edge
  old_interior = {k: v for k, v in interior.to_dict().items() if k != "at_edge"}
  assert not selection.MethodReport.from_dict(old_interior).at_edge
  old_unordered = {**old_interior, "grid": [{"noise": 10.0}, {"noise": 0.0}, {"noise": 1.0}],
                   "chosen": {"noise": 1.0}}
  assert not selection.MethodReport.from_dict(old_unordered).at_edge
  assert selection.chosen_at_edge([{"c": 1.0}, {"c": 2.0}], {"c": 2.0})
  assert not selection.chosen_at_edge([{}], {})
