"""Honest model selection: hyper-parameters chosen on validation queries only.

Selection (``select_and_evaluate``). A method's hyper-parameters are chosen by the
LDS on *validation* queries alone; only then is the method run, once, on the
reported query sets (held-out test images, generated samples). The returned
``MethodReport`` records the split used for selection, the whole validation
curve and the chosen values, and is the only thing the results table renders.

Widening (``max_widen``). A best candidate on the edge of the grid (the largest
or smallest damping tried) says only that the optimum lies at or beyond that
edge: the grid did not contain it, and the reported LDS understates the method
by an unknown amount. So when the grid is a *one-key geometric* grid — every
candidate the same single key, its values positive finite numbers (not bools),
at least two of them, strictly increasing or decreasing with a constant ratio r
(``v[i+1] / v[i]`` equal to within 1e-6 relative), e.g. damping grids
``(1e-6, 1e-5, ..., 10)`` — and the best candidate is the first or the last,
the grid is extended one step beyond that edge (``v[0] / r`` before the first,
``v[-1] * r`` after the last; rounded to 12 significant digits so that the
tables read ``1000.0``, not ``1000.0000000000002``), that candidate is scored on
validation, and the search repeats until the best is interior or ``max_widen``
points have been added on that side (each side counted separately; 0 disables
widening). A new point that does not strictly beat the best so far ends the
search with the choice unchanged (now interior: the curve is flat or falls beyond
the edge, so a plateau is not chased to ever smaller dampings). The widened grid
keeps the original direction; ``MethodReport.grid`` and ``validation_lds``
record every point scored, in grid order. An integer-valued grid (all values
``int``) is only widened to integers: it stops at a side where the next value
would not be whole (``1 / 2``). Widening also stops where the next value would
overflow or underflow. Other grids (several keys, non-numeric values, an
unsorted or arithmetic axis) are scored exactly as given.

Edges (``MethodReport.at_edge``). When the best is still at an edge of the
final grid — ``max_widen`` was exhausted, the grid is not geometric, or it was
not widened at all — the report says so and the table marks the chosen cell
``c=100 (grid edge)``. An edge is defined only for an *ordered one-axis* grid:
at least two candidates with the same keys, exactly one of which varies across
them, its values numeric (not bools) and strictly increasing or decreasing (a
one-key sorted numeric grid is the common case; ``{"lr": 1e-4, "w": g}`` over
g is another). ``at_edge`` is True when the chosen candidate is the first or the
last of such a grid, and False for ``[{}]``, an interior choice, or a grid with
no single ordered axis (several varying keys, an unsorted list) whose ends are
not the ends of a range.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from jattr.eval.lds import LdsResult, lds, lds_per_query, noise_ceiling

VALIDATION = "validation"
"""The name of the only query split hyper-parameters may be selected on."""


class Queries(NamedTuple):
  """What a method sees of a query split: never the measurements.

  Attributes:
    name: the split (``"validation"``, ``"test"``, ``"generated"``).
    images: [Q, H, W, C].
    sample_keys: for generated queries, the sampler key data of each sample
      [Q, ...] (uint32), so that methods can retrace the sampling path; else None.
    cond: for a conditional model, each query's condition [Q, ...] (a held-out
      image's label, the label a sample was generated with); else None.
  """

  name: str
  images: np.ndarray
  sample_keys: np.ndarray | None = None
  cond: np.ndarray | None = None

  @property
  def memo_key(self) -> tuple:
    """What a method may key its per-split memo by: name, shape and the conditions."""
    cond = None if self.cond is None else hash(np.ascontiguousarray(self.cond).tobytes())
    return (self.name, self.images.shape, cond)

  @property
  def examples(self):
    """What a method attributes: the images, or ``(images, cond)`` when conditional."""
    return self.images if self.cond is None else (self.images, self.cond)


class QuerySet(NamedTuple):
  """A query split with its measurements under every subset model.

  Attributes:
    queries: the images (what methods see).
    y: measurements [Q, M, S].
  """

  queries: Queries
  y: np.ndarray

  @property
  def name(self) -> str:
    return self.queries.name


ScoreFn = Callable[[dict, Queries], Any]
"""``score_fn(hparams, queries) -> τ [Q, N]`` for the training set the masks index."""


@dataclasses.dataclass
class MethodReport:
  """A method's LDS, with the record of how its hyper-parameters were chosen.

  Attributes:
    method: the method's name.
    selected_on: the split the hyper-parameters were chosen on (always
      ``"validation"``; ``select_and_evaluate`` is the only constructor used).
    grid: the candidate hyper-parameters, in order.
    validation_lds: the validation LDS of each candidate.
    chosen: the selected candidate (the first of the best).
    results: LDS on each reported split, by split name.
    ceilings: the noise ceiling of each reported split, by split name.
    at_edge: the chosen candidate is the first or last of ``grid`` and ``grid``
      is an ordered one-axis grid (module docstring): its optimum may lie
      beyond the values tried.
  """

  method: str
  selected_on: str
  grid: list
  validation_lds: list
  chosen: dict
  results: dict
  ceilings: dict
  at_edge: bool = False

  def to_dict(self) -> dict:
    return {"method": self.method, "selected_on": self.selected_on, "grid": self.grid,
            "validation_lds": self.validation_lds, "chosen": self.chosen,
            "results": {k: v.to_dict() for k, v in self.results.items()},
            "ceilings": {k: v.to_dict() for k, v in self.ceilings.items()},
            "at_edge": bool(self.at_edge)}

  @classmethod
  def from_dict(cls, d: dict) -> "MethodReport":
    """Inverse of ``to_dict`` (results records are JSON).

    A record written before ``at_edge`` existed gets it recomputed from its grid
    and chosen candidate (``chosen_at_edge``).
    """
    grid, chosen = list(d["grid"]), dict(d["chosen"])
    at_edge = d["at_edge"] if "at_edge" in d else chosen_at_edge(grid, chosen)
    return cls(method=d["method"], selected_on=d["selected_on"], grid=grid,
               validation_lds=list(d["validation_lds"]), chosen=chosen,
               results={k: LdsResult.from_dict(v) for k, v in d["results"].items()},
               ceilings={k: LdsResult.from_dict(v) for k, v in d["ceilings"].items()},
               at_edge=bool(at_edge))


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
      v, (bool, np.bool_))


def _strictly_monotone(values) -> bool:
  inc = all(a < b for a, b in zip(values, values[1:]))
  dec = all(a > b for a, b in zip(values, values[1:]))
  return inc or dec


def _ordered_axis(grid: Sequence[dict]) -> str | None:
  """The key of an ordered one-axis grid (module docstring), else None."""
  if len(grid) < 2 or any(set(h) != set(grid[0]) for h in grid):
    return None
  varying = [k for k in grid[0] if any(h[k] != grid[0][k] for h in grid)]
  if len(varying) != 1:
    return None
  values = [h[varying[0]] for h in grid]
  if not all(_is_number(v) for v in values) or not _strictly_monotone(values):
    return None
  return varying[0]


def chosen_at_edge(grid: Sequence[dict], chosen: dict) -> bool:
  """Whether ``chosen`` is the first or last candidate of an ordered one-axis grid."""
  if _ordered_axis(grid) is None:
    return False
  return dict(chosen) in (dict(grid[0]), dict(grid[-1]))


def _geometric_ratio(grid: Sequence[dict]) -> tuple[str, float] | None:
  """``(key, ratio)`` of a one-key geometric grid (module docstring), else None."""
  if len(grid) < 2 or len(grid[0]) != 1 or any(set(h) != set(grid[0]) for h in grid):
    return None
  (key,) = grid[0]
  values = [h[key] for h in grid]
  if not all(_is_number(v) and np.isfinite(v) and v > 0 for v in values):
    return None
  if not _strictly_monotone(values):
    return None
  ratios = [float(b) / float(a) for a, b in zip(values, values[1:])]
  ratio = (float(values[-1]) / float(values[0])) ** (1.0 / (len(values) - 1))
  if any(abs(q - ratio) > 1e-6 * ratio for q in ratios):
    return None
  return key, ratio


def _next_value(value, ratio: float, integral: bool):
  """``value * ratio``, rounded to 12 significant digits; None where it cannot be."""
  v = float(value) * ratio
  if not np.isfinite(v) or v <= 0:
    return None
  v = float(f"{v:.12g}")
  if integral:
    return int(round(v)) if abs(v - round(v)) <= 1e-9 * v and round(v) >= 1 else None
  return v


def _image_digests(images) -> set:
  arr = np.ascontiguousarray(np.asarray(images, np.float32))
  return {hash(row.tobytes()) for row in arr.reshape(arr.shape[0], -1)}


def _scores_for(score_fn, hparams, queries: Queries, num_examples: int) -> np.ndarray:
  tau = np.asarray(score_fn(dict(hparams), queries), np.float64)
  q = queries.images.shape[0]
  if tau.shape != (q, num_examples):
    raise ValueError(f"score_fn returned shape {tau.shape} for the {queries.name!r} split; "
                     f"expected [Q={q}, N={num_examples}]")
  return tau


def select_and_evaluate(method: str, score_fn: ScoreFn, grid: Sequence[dict], masks,
                        validation: QuerySet, reported: Sequence[QuerySet], *,
                        num_resamples: int = 10000, confidence: float = 0.95,
                        seed: int = 0, max_widen: int = 4) -> MethodReport:
  """Chooses hyper-parameters on validation queries, then scores the reported splits.

  For each candidate h of ``grid`` the method scores the validation queries and
  gets their LDS; the chosen h* maximises it (ties: the first). Only then is
  ``score_fn(h*, ·)`` run on each reported split — the reported numbers never
  feed back into the choice.

  A one-key geometric grid whose best is at an edge is widened past that edge,
  one validation-scored point at a time, up to ``max_widen`` points per side
  (module docstring); a best still at an edge is flagged ``at_edge``.

  Args:
    method: a name for the report.
    score_fn: ``score_fn(hparams, queries) -> τ [Q, N]``.
    grid: candidate hyper-parameter dicts; ``[{}]`` for a method without any.
    masks: subset membership [M, N].
    validation: the selection split; must be named ``"validation"``.
    reported: the splits to report (e.g. test and generated); none may be named
      ``"validation"`` or share an image with the validation split.
    num_resamples, confidence, seed: the bootstrap over queries.
    max_widen: the most points added beyond each edge of a geometric grid
      (0: score the grid as given).

  Returns:
    A ``MethodReport``.

  Raises:
    ValueError: the validation split is misnamed, a reported split is the
      validation split or overlaps it, the grid is empty, or ``max_widen`` is
      negative.
  """
  grid = [dict(h) for h in grid]
  if not grid:
    raise ValueError("grid is empty: pass [{}] for a method without hyper-parameters")
  if max_widen < 0:
    raise ValueError(f"max_widen must be >= 0, got {max_widen}")
  if validation.name != VALIDATION:
    raise ValueError(f"hyper-parameters are selected on the {VALIDATION!r} split only; "
                     f"got a split named {validation.name!r}")
  val_digests = _image_digests(validation.queries.images)
  for split in reported:
    if split.name == VALIDATION:
      raise ValueError("the validation split cannot also be reported: report test and "
                       "generated queries, never the queries used for selection")
    if val_digests & _image_digests(split.queries.images):
      raise ValueError(f"the reported split {split.name!r} shares images with the validation "
                       f"split; reported queries must be disjoint from selection queries")
  masks = np.asarray(masks)
  n = masks.shape[1]
  boot = dict(num_resamples=num_resamples, confidence=confidence, seed=seed)

  def validation_lds(h):
    tau = _scores_for(score_fn, h, validation.queries, n)
    return float(lds_per_query(tau, masks, validation.y).mean())

  val_lds = [validation_lds(h) for h in grid]
  best = int(np.argmax(val_lds))
  geometric = _geometric_ratio(grid) if max_widen else None
  if geometric is not None:
    key, ratio = geometric
    integral = all(isinstance(h[key], (int, np.integer)) for h in grid)
    added = {"first": 0, "last": 0}
    while True:
      side = "first" if best == 0 else "last" if best == len(grid) - 1 else None
      if side is None or added[side] >= max_widen:
        break
      edge = grid[0][key] if side == "first" else grid[-1][key]
      value = _next_value(edge, 1.0 / ratio if side == "first" else ratio, integral)
      if value is None:
        break
      h = {key: value}
      score = validation_lds(h)
      improves = score > val_lds[best]
      if side == "first":
        grid.insert(0, h)
        val_lds.insert(0, score)
        best += 1
      else:
        grid.append(h)
        val_lds.append(score)
      added[side] += 1
      if not improves:  # the curve turns down or is flat beyond the edge: bracketed
        break
      best = int(np.argmax(val_lds))
  chosen = grid[best]
  results, ceilings = {}, {}
  for split in reported:
    tau = _scores_for(score_fn, chosen, split.queries, n)
    results[split.name] = lds(tau, masks, split.y, **boot)
    if split.y.ndim == 3 and split.y.shape[-1] >= 2:
      ceilings[split.name] = noise_ceiling(split.y, **boot)
  at_edge = _ordered_axis(grid) is not None and best in (0, len(grid) - 1)
  return MethodReport(method=method, selected_on=VALIDATION, grid=grid, validation_lds=val_lds,
                      chosen=chosen, results=results, ceilings=ceilings, at_edge=at_edge)


def results_table(reports: Sequence[MethodReport], splits: Sequence[str] = ("test", "generated")
                  ) -> str:
  """A markdown table: method, chosen hyper-parameters, LDS [interval] per split.

  A chosen value at an edge of its grid (``MethodReport.at_edge``) is marked
  ``c=100 (grid edge)``: the optimum may lie beyond the values tried. The last
  row is the split-half noise ceiling of each split.
  """
  if not reports:
    raise ValueError("reports is empty")
  for r in reports:
    if r.selected_on != VALIDATION:
      raise ValueError(f"report {r.method!r} was selected on {r.selected_on!r}; only "
                       f"validation-selected reports can be tabulated")
  head = "| method | chosen | " + " | ".join(f"LDS {s}" for s in splits) + " |"
  rule = "|---|---|" + "---|" * len(splits)
  rows = [head, rule]
  for r in reports:
    chosen = ", ".join(f"{k}={v}" for k, v in r.chosen.items()) or "-"
    if r.at_edge:
      chosen += " (grid edge)"
    cells = [str(r.results[s]) if s in r.results else "-" for s in splits]
    rows.append(f"| {r.method} | {chosen} | " + " | ".join(cells) + " |")
  ceil = [str(reports[0].ceilings[s]) if s in reports[0].ceilings else "-" for s in splits]
  rows.append("| *noise ceiling (split-half)* | | " + " | ".join(ceil) + " |")
  return "\n".join(rows)
