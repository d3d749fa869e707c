"""Honest model selection: hyper-parameters chosen on validation queries only.

Selection (``select_and_evaluate``). A method's hyper-parameters are chosen by the
LDS on *validation* queries alone; only then is the method run, once, on the
reported query sets (held-out test images, generated samples). The returned
``MethodReport`` records the split used for selection, the whole validation
curve and the chosen values, and is the only thing the results table renders.
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
  """

  method: str
  selected_on: str
  grid: list
  validation_lds: list
  chosen: dict
  results: dict
  ceilings: dict

  def to_dict(self) -> dict:
    return {"method": self.method, "selected_on": self.selected_on, "grid": self.grid,
            "validation_lds": self.validation_lds, "chosen": self.chosen,
            "results": {k: v.to_dict() for k, v in self.results.items()},
            "ceilings": {k: v.to_dict() for k, v in self.ceilings.items()}}

  @classmethod
  def from_dict(cls, d: dict) -> "MethodReport":
    """Inverse of ``to_dict`` (results records are JSON)."""
    return cls(method=d["method"], selected_on=d["selected_on"], grid=list(d["grid"]),
               validation_lds=list(d["validation_lds"]), chosen=dict(d["chosen"]),
               results={k: LdsResult.from_dict(v) for k, v in d["results"].items()},
               ceilings={k: LdsResult.from_dict(v) for k, v in d["ceilings"].items()})


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
                        seed: int = 0) -> MethodReport:
  """Chooses hyper-parameters on validation queries, then scores the reported splits.

  For each candidate h of ``grid`` the method scores the validation queries and
  gets their LDS; the chosen h* maximises it (ties: the first). Only then is
  ``score_fn(h*, ·)`` run on each reported split — the reported numbers never
  feed back into the choice.

  Args:
    method: a name for the report.
    score_fn: ``score_fn(hparams, queries) -> τ [Q, N]``.
    grid: candidate hyper-parameter dicts; ``[{}]`` for a method without any.
    masks: subset membership [M, N].
    validation: the selection split; must be named ``"validation"``.
    reported: the splits to report (e.g. test and generated); none may be named
      ``"validation"`` or share an image with the validation split.
    num_resamples, confidence, seed: the bootstrap over queries.

  Returns:
    A ``MethodReport``.

  Raises:
    ValueError: the validation split is misnamed, a reported split is the
      validation split or overlaps it, or the grid is empty.
  """
  grid = [dict(h) for h in grid]
  if not grid:
    raise ValueError("grid is empty: pass [{}] for a method without hyper-parameters")
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
  val_lds = []
  for h in grid:
    tau = _scores_for(score_fn, h, validation.queries, n)
    val_lds.append(float(lds_per_query(tau, masks, validation.y).mean()))
  best = int(np.argmax(val_lds))
  chosen = grid[best]
  results, ceilings = {}, {}
  for split in reported:
    tau = _scores_for(score_fn, chosen, split.queries, n)
    results[split.name] = lds(tau, masks, split.y, **boot)
    if split.y.ndim == 3 and split.y.shape[-1] >= 2:
      ceilings[split.name] = noise_ceiling(split.y, **boot)
  return MethodReport(method=method, selected_on=VALIDATION, grid=grid, validation_lds=val_lds,
                      chosen=chosen, results=results, ceilings=ceilings)


def results_table(reports: Sequence[MethodReport], splits: Sequence[str] = ("test", "generated")
                  ) -> str:
  """A markdown table: method, chosen hyper-parameters, LDS [interval] per split.

  The last row is the split-half noise ceiling of each split.
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
    cells = [str(r.results[s]) if s in r.results else "-" for s in splits]
    rows.append(f"| {r.method} | {chosen} | " + " | ".join(cells) + " |")
  ceil = [str(reports[0].ceilings[s]) if s in reports[0].ceilings else "-" for s in splits]
  rows.append("| *noise ceiling (split-half)* | | " + " | ".join(ceil) + " |")
  return "\n".join(rows)
