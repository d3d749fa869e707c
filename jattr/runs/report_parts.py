"""A run's attribution report from arrays: labels, pixel neighbours, the benchmark row.

``write_run_report`` is what ``attribute_run`` (after D-TRAK) and ``report_run``
(``jattr report``, any score file) call: it computes each query's pixel-cosine nearest
neighbours and the rank correlation of τ with pixel cosine, names the labels, and hands
arrays to ``jattr.io.report.write_report``, which only draws and writes. Nothing here
reads a run directory, so ``jattr.runs.run`` can use it (``jattr.runs.report`` reads
runs and score files).
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattr.data import Dataset
from jattr.eval.spearman import spearman
from jattr.io.report import write_report
from jattr.methods import pixel_cosine
from jattr.runs.config import AttributionConfig

LABEL_NAMES = {
    "fashion_mnist": ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                      "shirt", "sneaker", "bag", "ankle boot"),
    "cifar2": ("automobile", "horse"),
}
"""Class names of the datasets whose labels are not self-explanatory numbers."""
RESULTS_DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "results.md"
"""The benchmark table the report links (present in a source checkout)."""
SKETCH_ROWS = {
    "default": "sketched GGN (k = 4096, S = 16, K = 10), default λ, untuned",
    "tuned": "sketched GGN (k = 4096, S = 16, K = 10)",
    "fashion_default": "sketched GGN, default λ, untuned",
}
"""The sketch's rows in results.md: digits (default, tuned) and Fashion-MNIST (default)."""
FASHION_SECTION = "Fashion-MNIST"
"""The results.md section of the second benchmark."""
BENCHMARK_ROWS = {
    ("square_norm", "default"): "D-TRAK (square_norm, K = 10), default λ, untuned",
    ("square_norm", "tuned"): "D-TRAK (square_norm, K = 10)",
    ("mean", "default"): "D-TRAK (mean, K = 10), default λ, untuned",
    ("mean", "tuned"): "D-TRAK (mean, K = 10)",
    ("loss", "default"): "TRAK (f = loss, K = 10), default λ, untuned",
    ("loss", "tuned"): "TRAK (f = loss, K = 10)",
}
"""(measurement, default | tuned) → the first cell of that method's row in results.md."""
GRADIENT_SECTION = "Gradient features"
"""The results.md section (its heading's start) with every other D-TRAK measurement."""


def label_names(dataset: str, y) -> list[str]:
  """Labels as the report shows them: class names where the dataset has them."""
  names = LABEL_NAMES.get(dataset)
  return [names[int(v)] if names is not None and 0 <= int(v) < len(names) else str(int(v))
          for v in np.asarray(y).reshape(-1)]


def pixel_neighbours(queries: np.ndarray, train: np.ndarray, tau: np.ndarray, k: int, *,
                     block: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each query's k nearest training images by pixel cosine, and ρ(τ, cosine).

  Args:
    queries: [Q, H, W, C]; train: [N, H, W, C]; tau: [Q, N].
    k: neighbours per query.
    block: queries per [block, N] cosine matrix (bounds memory).

  Returns:
    ``(indices [Q, k], cosines [Q, k], rho [Q])``: the neighbours, most similar
    first, and the Spearman correlation of each query's τ row with its cosine row
    over all N (NaN for a constant row).
  """
  t = jnp.asarray(train, jnp.float32)
  k = min(k, t.shape[0])
  idx, sim, rho = [], [], []
  for s in range(0, len(queries), block):
    cos = pixel_cosine(jnp.asarray(queries[s:s + block], jnp.float32), t)
    v, i = jax.lax.top_k(cos, k)
    idx.append(np.asarray(i))
    sim.append(np.asarray(v))
    rho.append(np.asarray(spearman(jnp.asarray(tau[s:s + block], jnp.float32), cos)))
  if not idx:
    return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32)
  return np.concatenate(idx), np.concatenate(sim), np.concatenate(rho)


def github_anchor(heading: str) -> str:
  """The anchor GitHub (and most Markdown renderers) give a heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def benchmark_row(name: str, doc: str | os.PathLike = RESULTS_DOC) -> dict | None:
  """The first table row of ``doc`` whose first cell is ``name`` (or, for a name that
  ends in "…", starts with it), with its section.

  Returns:
    ``{"name", "cells", "heading", "anchor"}`` or None when the file or row is missing.
  """
  path = pathlib.Path(doc)
  if not path.exists():
    return None
  heading = ""
  for line in path.read_text(encoding="utf-8").splitlines():
    if line.startswith("#"):
      heading = line.lstrip("#").strip()
    elif line.startswith("|"):
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if cells and cells[0].strip("*") == name:
        return {"name": name, "cells": cells, "heading": heading,
                "anchor": github_anchor(heading)}
  return None


def section_anchor(start: str, doc: str | os.PathLike = RESULTS_DOC) -> str | None:
  """The anchor of the first heading of ``doc`` that starts with ``start``."""
  path = pathlib.Path(doc)
  if not path.exists():
    return None
  for line in path.read_text(encoding="utf-8").splitlines():
    if line.startswith("#") and line.lstrip("#").strip().startswith(start):
      return github_anchor(line.lstrip("#").strip())
  return None


def doc_href(out_dir: str | os.PathLike, anchor: str | None,
             doc: str | os.PathLike = RESULTS_DOC) -> str | None:
  """A relative link from ``out_dir`` to ``doc`` (and the anchor), or None without it."""
  if not pathlib.Path(doc).exists():
    return None
  rel = os.path.relpath(pathlib.Path(doc).resolve(), pathlib.Path(out_dir).resolve())
  return pathlib.Path(rel).as_posix() + (f"#{anchor}" if anchor else "")


def _lds(row: dict | None) -> str:
  return "" if row is None else f"LDS {row['cells'][2]} held out, {row['cells'][3]} generated"


def damping_header(a: AttributionConfig, damping: float, out_dir: str | os.PathLike
                   ) -> tuple[str, list[str], list[tuple[str, str | None, str]]]:
  """The damping line, the notes and the benchmark links of a (D-)TRAK report.

  Returns:
    ``(damping detail, notes, links)`` for ``write_report``.
  """
  default = a.relative_damping is None
  if default:
    detail = (f"λ = {damping:.3g}, the library default (not tuned): the λ at which the "
              f"kernel ΦᵀΦ's effective dimension Σ s/(s + λ) is a quarter of its rank")
  else:
    detail = (f"λ = {damping:.3g} = c × mean eigenvalue of ΦᵀΦ with "
              f"c = {a.relative_damping:g} "
              "(set in the run's config; jattr does not know whether it was tuned)")
  method = "D-TRAK" if a.measurement != "loss" else "TRAK"
  untuned = benchmark_row(BENCHMARK_ROWS[(a.measurement, "default")]) if (
      a.measurement, "default") in BENCHMARK_ROWS else None
  tuned = benchmark_row(BENCHMARK_ROWS[(a.measurement, "tuned")]) if (
      a.measurement, "tuned") in BENCHMARK_ROWS else None
  notes = []
  if default:
    gain = ""
    if untuned is not None and tuned is not None:
      gain = (f" On the digits LDS benchmark tuning c on validation queries raised this "
              f"method's LDS on held-out images from {untuned['cells'][2].split()[0]} "
              f"(the default) to {tuned['cells'][2].split()[0]} ({tuned['cells'][1]}).")
    notes.append(f"The damping is the untuned library default; the scores' order depends "
                 f"on it.{gain} To tune it, choose c on held-out queries (jattr lds, "
                 f"docs/evaluation.md) and set attribution.relative_damping in the run's "
                 f"config.json.")
  links = []
  if untuned is not None:
    links.append((f"This method on the digits benchmark (200 training images, a "
                  f"12,921-parameter UNet, k = 4096): row “{untuned['name']}”, "
                  f"{_lds(untuned)}" + (f"; tuned ({tuned['cells'][1]}): {_lds(tuned)}"
                                        if tuned is not None else "") + ". See",
                  doc_href(out_dir, untuned["anchor"]), f"docs/results.md, {untuned['heading']}"))
  else:
    anchor = section_anchor(GRADIENT_SECTION)
    links.append((f"{method} with f = {a.measurement} on the digits benchmark: the "
                  f"gradient-feature section (no row for the untuned "
                  f"default; the rows there are tuned on validation):",
                  doc_href(out_dir, anchor), "docs/results.md"))
  return detail, notes, links


def sketch_damping_header(a: AttributionConfig, damping: float, out_dir: str | os.PathLike
                          ) -> tuple[str, list[str], list[tuple[str, str | None, str]]]:
  """The damping line, the notes and the benchmark links of a sketched-GGN report.

  Returns:
    ``(damping detail, notes, links)`` for ``write_report``.
  """
  factor = 0.1 if a.damping_factor is None else a.damping_factor
  if a.damping_factor is None:
    detail = (f"λ = {damping:.3g} = 0.1 × mean eigenvalue of G_k, the library default "
              f"(not tuned)")
  else:
    detail = (f"λ = {damping:.3g} = {factor:g} × mean eigenvalue of G_k (set in the run's "
              "config; jattr does not know whether it was tuned)")
  rows = {k: benchmark_row(v) for k, v in SKETCH_ROWS.items()}
  notes = []
  if a.damping_factor is None and rows["default"] is not None and rows["tuned"] is not None:
    notes.append(
        "The damping is the untuned library default. On the digits LDS benchmark it gave "
        f"{rows['default']['cells'][2].split()[0]} on held-out images against "
        f"{rows['tuned']['cells'][2].split()[0]} tuned on validation queries"
        + (f", and {rows['fashion_default']['cells'][2].split()[0]} on the Fashion-MNIST "
           "benchmark" if rows["fashion_default"] is not None else "")
        + "; set attribution.damping_factor in the run's config.json to change it.")
  links = []
  if rows["default"] is not None:
    links.append((f"This method on the digits benchmark (200 training images, a "
                  f"12,921-parameter UNet): row “{rows['default']['name']}”, "
                  f"{_lds(rows['default'])}. See", doc_href(out_dir, rows["default"]["anchor"]),
                  f"docs/results.md, {rows['default']['heading']}"))
  return detail, notes, links


def write_run_report(out_dir: str | os.PathLike, queries: np.ndarray, tau: np.ndarray,
                     train: Dataset, train_ids: np.ndarray, *,
                     query_labels: Sequence | None = None, top_k: int = 8,
                     title: str = "jattr attribution report", details: dict | None = None,
                     notes: Sequence[str] = (),
                     links: Sequence[tuple[str, str | None, str]] = (),
                     page_size: int = 100) -> str:
  """The report of τ [Q, N] for ``queries`` against a run's training set ``train``.

  Computes the pixel-cosine neighbours (``pixel_neighbours``), names the labels
  (``label_names``) and writes with ``jattr.io.report.write_report``.

  Returns:
    The path of ``index.html``.
  """
  tau = np.asarray(tau, np.float32)
  nn, sim, rho = pixel_neighbours(queries, train.x, tau, top_k)
  return write_report(out_dir, np.asarray(queries), train.x, tau, train_ids=train_ids,
                      top_k=top_k, title=title, details=details,
                      train_labels=label_names(train.name, train.y),
                      query_labels=(None if query_labels is None
                                    else label_names(train.name, query_labels)),
                      neighbours=nn, neighbour_scores=sim, neighbour_rho=rho,
                      neighbour_name="pixel cosine", notes=notes, links=links,
                      page_size=page_size)
