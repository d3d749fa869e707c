"""The attribution report of any score matrix over a run (``jattr report``).

    jattr report --scores FILE.npz [--run DIR] [--queries samples|test|train]
                 [--key tau] [--top-k 8] [--out DIR]

reads τ [Q, N] (``tau``, the key every jattr score file uses: ``jattr score``,
``jattr influence``, ``jattr mucs``, a report's own ``scores.npz``; ``--key`` picks
another array, e.g. ``test`` of a ``jattr lds --scores`` file) over the run's training
set, the queries it scores (``samples.npz`` by default, ``jattr.runs.QUERIES``) and
their labels, and writes the report of ``jattr.io.report`` (``docs/report.md``) to
``<run>/reports/<file stem>/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from jattr.data import load_dataset
from jattr.runs.config import QUERIES, load_config
from jattr.runs.features import TEST_SPLIT_DATASETS, query_examples
from jattr.runs.report_parts import RESULTS_DOC, doc_href, write_run_report
from jattr.runs.run import training_data

META_KEYS = ("method", "measurement", "curvature", "curvature_kind", "damping",
             "relative_damping", "time", "variant")
"""Scalar entries of a score file shown in the report's header when present."""


def query_labels(cfg, run_dir: str | os.PathLike, queries: str) -> np.ndarray | None:
  """The labels of ``query_examples(cfg, run_dir, queries)``'s images, in order.

  None for generated samples unless ``samples.npz`` holds ``y`` (a conditional model).
  """
  if queries == "train":
    return np.asarray(training_data(cfg)[0].y)
  if queries == "samples":
    path = pathlib.Path(run_dir) / "samples.npz"
    with np.load(path) as z:
      return np.asarray(z["y"]) if "y" in z.files else None
  if queries != "test":
    raise ValueError(f"queries must be one of {QUERIES}, got {queries!r}")
  if cfg.dataset in TEST_SPLIT_DATASETS:
    return np.asarray(load_dataset(cfg.dataset, cfg.data_dir, split="test").y)
  _, train_idx = training_data(cfg)
  full = load_dataset(cfg.dataset, cfg.data_dir, split="train")
  return np.asarray(full.y)[np.setdiff1d(np.arange(len(full)), train_idx)]


def read_scores(path: str | os.PathLike, key: str = "tau") -> tuple[np.ndarray, dict]:
  """``(τ, metadata)`` of a score file: the ``key`` array and its scalar entries."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"score file {path} not found")
  with np.load(path, allow_pickle=False) as z:
    if key not in z.files:
      raise ValueError(f"{path} has no array {key!r}; it holds {sorted(z.files)} "
                       f"(choose one with --key)")
    tau = np.asarray(z[key])
    meta = {k: z[k].item() for k in z.files if k != key and z[k].ndim == 0}
    for k in ("train_ids", "train_indices"):
      if k in z.files and z[k].ndim == 1:
        meta[k] = np.asarray(z[k])
  if tau.ndim != 2:
    raise ValueError(f"{path}: {key} has shape {tau.shape}; expected τ [Q, N]")
  return tau, meta


def _header(meta: dict) -> dict:
  out = {}
  for k in META_KEYS:
    v = meta.get(k)
    if v is None or (isinstance(v, float) and np.isnan(v)) or v == -1:
      continue
    out[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
  if isinstance(meta.get("config"), str):  # jattr mucs: the variant and its settings
    try:
      cfg = json.loads(meta["config"])
      out.update({k: str(cfg[k]) for k in ("variant", "lr", "steps") if k in cfg})
    except (ValueError, TypeError):
      pass
  return out


def report_run(run_dir: str | os.PathLike, scores: str | os.PathLike, *,
               queries: str = "samples", key: str = "tau", out: str | os.PathLike | None = None,
               top_k: int | None = None, page_size: int = 100) -> str:
  """Writes the report of a score file over a run's training set.

  Args:
    run_dir: the run directory (``config.json``; ``samples.npz`` for samples).
    scores: an .npz holding τ [Q, N] under ``key``.
    queries: which examples the rows of τ are (``jattr.runs.QUERIES``).
    key: the array of τ in the file.
    out: the report folder (default ``<run>/reports/<file stem>``).
    top_k: proponents / opponents / neighbours per query (default: the run's
      ``attribution.top_k``).
    page_size: rows per page of the index.

  Returns:
    The path of ``index.html``.

  Raises:
    ValueError: if τ's shape is not [number of queries, number of training images],
      or the file's training ids are not the run's.
  """
  run = pathlib.Path(run_dir)
  if not (run / "config.json").exists():
    raise FileNotFoundError(f"{run / 'config.json'} not found: is {run} a run directory "
                            f"made by `jattr train`?")
  cfg = load_config(run / "config.json")
  tau, meta = read_scores(scores, key)
  ds, idx = training_data(cfg)
  x, info, _ = query_examples(cfg, run, queries)
  if tau.shape != (len(x), len(ds)):
    raise ValueError(f"{scores}: {key} has shape {tau.shape}, but run {run} has {len(x)} "
                     f"{queries} queries and {len(ds)} training images, so τ must be "
                     f"({len(x)}, {len(ds)}); pass the --queries the scores were made for")
  for k in ("train_ids", "train_indices"):
    if k in meta and not np.array_equal(meta[k], idx):
      raise ValueError(f"{scores}: its {k} are not the training indices of run {run}; the "
                       f"scores are over another training set")
  out = run / "reports" / pathlib.Path(scores).stem if out is None else pathlib.Path(out)
  details = {"scores": f"{scores} ({key} {tau.shape[0]} × {tau.shape[1]})", **_header(meta),
             "queries": f"{len(x)} {info['name']} ({info['split']})",
             "training images": f"N = {len(ds)} ({cfg.dataset})"}
  notes = []
  if "damping" in meta or "relative_damping" in meta:
    notes.append("The score file does not record whether its damping was tuned on held-out "
                 "queries; compare with the method's rows in docs/results.md.")
  links = [("Every method's LDS on the digits benchmark:", doc_href(out, None, RESULTS_DOC),
            "docs/results.md")]
  return write_run_report(out, x, tau, ds, idx, query_labels=query_labels(cfg, run, queries),
                          top_k=cfg.attribution.top_k if top_k is None else top_k,
                          title=f"attribution report: {pathlib.Path(scores).name} "
                                f"({len(x)} {queries})",
                          details=details, notes=notes, links=links, page_size=page_size)
