"""An on-disk store of gradient features Φ [N, k], written chunk of rows by chunk of rows.

Featurizing a large training set takes hours; a store lets it be killed and resumed
without recomputing finished work, and lets train and query features be computed
once and scored many times. Layout of ``<store>/``::

    features/      a zarr v3 array [N, k] float32 (tensorstore, file kvstore), one
                   zarr chunk per row chunk of ``chunk_rows`` rows; unwritten rows
                   read as NaN (the fill value)
    store.json     the sidecar: format, version, num_rows, dim, chunk_rows, dtype,
                   the ``config`` that produced the features, ``complete_chunks`` and
                   ``chunk_sha256`` (the sha256 of each complete chunk's float32 rows)

Both parts are open formats: ``zarr.open("<store>/features")`` (zarr-python ≥ 3) or
tensorstore read the array, any JSON reader the sidecar.

Crash safety. Row chunk i covers rows [i·chunk_rows, min((i+1)·chunk_rows, N)).
``write_chunk`` writes the chunk's data first (tensorstore's file kvstore writes a
temporary file and renames it over the chunk; its ``file_io_sync`` context
resource, on by default, fsyncs it), and only then adds i to
``complete_chunks`` by writing the whole sidecar to a temporary file and
``os.replace``-ing it over the old one (atomic on POSIX). A process killed at any
point therefore leaves a sidecar that lists only chunks whose data is on disk; a
chunk written but not yet listed is recomputed on resume.

Configuration. ``config`` is any JSON-able dict describing what the features are
(model hash, output function, draws, projection, dataset; see
``jattr.io.feature_store.feature_config``). Opening an existing store with a
different config (or a different N, k, chunk_rows) raises a ``ValueError`` that
names every differing key, so features of different models, draws or projections
are never mixed in one store. Features w.r.t. a subset of the parameters
(``jattr.wrt``) record it as ``model.wrt`` (selector, hash of the selected paths,
hash of the frozen leaves) beside ``model.params_sha256``, the hash of the WHOLE
model: a changed frozen parameter or another selection is refused, the message
naming ``model.wrt.frozen_sha256`` or ``model.wrt.selection_sha256``. Stores
without ``model.wrt`` (all stores made before selections) are ``wrt=None``.

Checked on read. ``read`` verifies every chunk it touches against the sha256
recorded when the chunk was written, so a chunk file deleted, truncated or altered
after the fact is an error naming the chunk and its file, never NaN or stale
scores. (Stores written before checksums were recorded are checked for finiteness:
a missing chunk reads as NaN, the fill value.)

One writer at a time: ``jattr.runs.store_featurize`` holds the store's
``jattr.io.lock.DirectoryLock`` while it writes. Readers may run beside a writer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Iterable

import numpy as np
import tensorstore as ts

from jattr.features.projection import ProjectionConfig
from jattr.io import atomic
from jattr.io.lock import LOCK_FILE

FORMAT = "jattr.feature_store"
VERSION = 1
SIDECAR = "store.json"
ARRAY = "features"
DTYPE = "float32"
COMPATIBLE_KEYS = ("model", "measurement", "draws", "projection")
"""Config sections a query store must share with the train store it is scored against."""


def _normalize(config: Any) -> dict:
  """``config`` as plain JSON types (tuples become lists, numpy scalars numbers)."""
  if not isinstance(config, dict):
    raise TypeError(f"config must be a JSON-able dict, got {type(config).__name__}")
  return atomic.to_json_types(config, "config")


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  """Dotted keys where two JSON-like configs differ (missing on one side counts).

  Example: ``config_diff({"p": {"seed": 0}}, {"p": {"seed": 1}}) == ["p.seed"]``.
  """
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b), key=str):
      name = f"{prefix}.{key}" if prefix else str(key)
      if key not in a or key not in b:
        out.append(name)
      else:
        out.extend(config_diff(a[key], b[key], name))
    return out
  return [] if a == b else [prefix or "<root>"]


def _lookup(config: dict, dotted: str):
  node = config
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return "<missing>"
    node = node[part]
  return node


def describe_diff(a: dict, b: dict, keys: Iterable[str],
                  names: tuple[str, str] = ("stored", "given")) -> str:
  """``key: stored X, given Y`` for each differing key, joined by ``; ``."""
  return "; ".join(f"{k}: {names[0]} {_lookup(a, k)!r}, {names[1]} {_lookup(b, k)!r}"
                   for k in keys)


def projection_spec(config: ProjectionConfig) -> dict:
  """The JSON form of a ``ProjectionConfig``: dim, kind, seed, block_size, and
  nonzeros for the sparse kind only (so that the dense kinds read as they did before
  the sparse kind existed)."""
  spec = dataclasses.asdict(config)
  if config.kind != "sparse":
    del spec["nonzeros"]
  return spec


def feature_config(*, params_hash: str, measurement: str, num_draws: int, timesteps: str,
                   draw_seed: int, projection: ProjectionConfig, dataset: str,
                   num_examples: int, examples_hash: str,
                   measurement_kwargs: dict | None = None, model_info: dict | None = None,
                   dataset_info: dict | None = None, selection: dict | None = None) -> dict:
  """The standard configuration of a feature store.

  Args:
    params_hash: ``model_hash(params)`` of the WHOLE model (frozen leaves included,
      when the features are w.r.t. a selection).
    measurement: the output function's name (e.g. ``"square_norm"``).
    num_draws: K of the fixed (t, ε) draws.
    timesteps: ``"uniform"`` or ``"random"``.
    draw_seed: seed of the draws' key.
    projection: the projection.
    dataset: name of the examples' source (e.g. ``"digits"``, ``"samples"``).
    num_examples: N.
    examples_hash: ``array_hash`` of the examples' indices (or of their contents
      when they have no indices, e.g. generated samples).
    measurement_kwargs: JSON-able kwargs of the output function (e.g. ``{"time": 50}``).
    model_info: more JSON-able facts about the model (architecture, schedule, …).
    dataset_info: more JSON-able facts about the examples (split, file, …).
    selection: what the gradients were taken with respect to
      (``jattr.runs.selection_record``), stored as ``model.wrt``; ``None``
      (``wrt=None``) stores nothing, so the config is what it was before selections
      existed, and a store without ``model.wrt`` reads as ``wrt=None``.

  Returns:
    ``{"model", "measurement", "draws", "projection", "dataset"}`` sections.
  """
  return {
      "model": {"params_sha256": params_hash, **(model_info or {}),
                **({} if selection is None else {"wrt": dict(selection)})},
      "measurement": {"name": measurement, "kwargs": dict(measurement_kwargs or {})},
      "draws": {"num_draws": int(num_draws), "timesteps": timesteps, "seed": int(draw_seed)},
      "projection": projection_spec(projection),
      "dataset": {"name": dataset, "num": int(num_examples), "examples_sha256": examples_hash,
                  **(dataset_info or {})},
  }


def check_compatible(train_config: dict, query_config: dict,
                     keys: tuple[str, ...] = COMPATIBLE_KEYS) -> None:
  """Raises ValueError unless the two configs agree on every section in ``keys``.

  Train and query features are only comparable when they come from the same model,
  output function, draws and projection; the datasets naturally differ.
  """
  a = {k: train_config.get(k, "<missing>") for k in keys}
  b = {k: query_config.get(k, "<missing>") for k in keys}
  diff = config_diff(a, b)
  if diff:
    raise ValueError("train and query features were computed differently; differing keys: "
                     + describe_diff(a, b, diff, ("train", "query")))


def _rows_sha256(rows: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(rows, dtype="<f4").tobytes()).hexdigest()


class FeatureStore:
  """A chunked on-disk array Φ [N, k] float32 with its configuration.

  Build one with ``FeatureStore.open`` (create or resume, checking the config) or
  ``FeatureStore.load`` (an existing store, config read from disk). The object
  holds the sidecar's contents and a tensorstore handle; it does no computation.

  Attributes:
    path: the store directory.
    config: the configuration dict (plain JSON types).
    num_rows: N.
    dim: k.
    chunk_rows: rows per chunk.
  """

  def __init__(self, path: pathlib.Path, sidecar: dict, array: ts.TensorStore):
    self.path = path
    self._sidecar = sidecar
    self._array = array

  # -- construction ---------------------------------------------------------------

  @staticmethod
  def _array_spec(path: pathlib.Path) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / ARRAY)}}

  @classmethod
  def open(cls, path: str | os.PathLike, config: dict, num_rows: int, dim: int,
           chunk_rows: int) -> "FeatureStore":
    """Creates a store, or reopens one made with the same configuration.

    Args:
      path: the store directory (created if missing). An existing directory must be
        empty or a feature store.
      config: JSON-able dict describing the features; must equal the stored one.
      num_rows: N ≥ 1.
      dim: k ≥ 1.
      chunk_rows: rows per chunk ≥ 1 (also the zarr chunk's row count).

    Returns:
      The store; ``missing_chunks()`` lists what is left to write.

    Raises:
      ValueError: if the directory holds a store with a different config, N, k or
        chunk_rows (the message names every differing key), or a directory that is
        not a feature store.
    """
    for name, v in (("num_rows", num_rows), ("dim", dim), ("chunk_rows", chunk_rows)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    path = pathlib.Path(path)
    config = _normalize(config)
    layout = {"num_rows": int(num_rows), "dim": int(dim), "chunk_rows": int(chunk_rows),
              "dtype": DTYPE}
    sidecar_path = path / SIDECAR
    if sidecar_path.exists():
      store = cls.load(path)
      stored = {**{k: store._sidecar[k] for k in layout}, "config": store.config}
      given = {**layout, "config": config}
      diff = config_diff(stored, given)
      if diff:
        raise ValueError(
            f"feature store {path} was made with a different configuration; differing keys: "
            f"{describe_diff(stored, given, diff)}. Features of different configurations "
            f"are never mixed: use another directory, or delete this one to recompute")
      return store
    leftovers = [p.name for p in path.iterdir()] if path.exists() else []
    if any(n not in (ARRAY, LOCK_FILE) and not n.startswith(f".{SIDECAR}.tmp")
           for n in leftovers):
      raise ValueError(f"path {path} exists and is not a feature store (no {SIDECAR}, and it "
                       f"holds {sorted(leftovers)[:5]}); expected an "
                       f"empty or missing directory")
    path.mkdir(parents=True, exist_ok=True)
    # A features/ array (or a temporary sidecar) without a sidecar is what a crash
    # during creation leaves; nothing in it is marked complete, so it is recreated.
    spec = cls._array_spec(path)
    spec["metadata"] = {
        "shape": [layout["num_rows"], layout["dim"]],
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [layout["chunk_rows"], layout["dim"]]}},
        "data_type": DTYPE,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "fill_value": "NaN",
    }
    array = ts.open(spec, create=True, delete_existing=True).result()
    sidecar = {"format": FORMAT, "version": VERSION, **layout, "config": config,
               "complete_chunks": []}
    atomic.write_json(sidecar_path, sidecar)
    return cls(path, sidecar, array)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "FeatureStore":
    """Opens an existing store, taking its configuration from disk.

    Raises:
      FileNotFoundError: if ``path`` holds no ``store.json``.
      ValueError: if the sidecar is not a jattr feature store of a known version,
        or disagrees with the array's shape.
    """
    path = pathlib.Path(path)
    sidecar_path = path / SIDECAR
    if not sidecar_path.exists():
      raise FileNotFoundError(f"{sidecar_path} not found: is {path} a feature store made by "
                              f"`jattr featurize`?")
    try:
      with open(sidecar_path) as f:
        sidecar = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{sidecar_path} is not valid JSON ({e}): the store's sidecar is "
                       "damaged; featurize into a new directory") from None
    if not isinstance(sidecar, dict):
      raise ValueError(f"{sidecar_path} is not a feature store sidecar (a JSON object)")
    if sidecar.get("format") != FORMAT or sidecar.get("version") != VERSION:
      raise ValueError(f"{sidecar_path} has format {sidecar.get('format')!r} version "
                       f"{sidecar.get('version')!r}; expected {FORMAT!r} version {VERSION}")
    array = ts.open(cls._array_spec(path), open=True).result()
    expected = (sidecar["num_rows"], sidecar["dim"])
    if tuple(array.shape) != expected:
      raise ValueError(f"{path / ARRAY} has shape {tuple(array.shape)} but {sidecar_path} "
                       f"says {expected}")
    return cls(path, sidecar, array)

  def refresh(self) -> "FeatureStore":
    """Re-reads the sidecar (e.g. after taking the store's lock: another writer may
    have completed chunks since this object was opened)."""
    with open(self.path / SIDECAR) as f:
      self._sidecar = json.load(f)
    return self

  # -- description ----------------------------------------------------------------

  @property
  def config(self) -> dict:
    return self._sidecar["config"]

  @property
  def num_rows(self) -> int:
    return self._sidecar["num_rows"]

  @property
  def dim(self) -> int:
    return self._sidecar["dim"]

  @property
  def chunk_rows(self) -> int:
    return self._sidecar["chunk_rows"]

  @property
  def num_chunks(self) -> int:
    return -(-self.num_rows // self.chunk_rows)

  def chunk_bounds(self, i: int) -> tuple[int, int]:
    """Rows [start, stop) of chunk ``i``."""
    if not 0 <= int(i) < self.num_chunks:
      raise ValueError(f"chunk index must be in [0, {self.num_chunks}), got {i}")
    start = int(i) * self.chunk_rows
    return start, min(start + self.chunk_rows, self.num_rows)

  def completed_chunks(self) -> list[int]:
    return list(self._sidecar["complete_chunks"])

  def missing_chunks(self) -> list[int]:
    """Indices of the chunks not yet written, ascending."""
    done = set(self._sidecar["complete_chunks"])
    return [i for i in range(self.num_chunks) if i not in done]

  @property
  def complete(self) -> bool:
    return len(self._sidecar["complete_chunks"]) == self.num_chunks

  def __repr__(self) -> str:
    return (f"FeatureStore({str(self.path)!r}, N={self.num_rows}, k={self.dim}, "
            f"chunks {len(self._sidecar['complete_chunks'])}/{self.num_chunks} complete)")

  # -- I/O ------------------------------------------------------------------------

  def write_chunk(self, i: int, array) -> None:
    """Writes the rows of chunk ``i``, then marks it complete.

    Args:
      i: chunk index in [0, num_chunks).
      array: [stop − start, k] rows (``chunk_bounds(i)``), cast to float32; must be
        finite, so that NaN (the fill value) always means "not written".
    """
    start, stop = self.chunk_bounds(i)
    array = np.asarray(array, dtype=np.float32)
    if array.shape != (stop - start, self.dim):
      raise ValueError(f"array for chunk {i} must have shape [rows {start}:{stop}, k] = "
                       f"{(stop - start, self.dim)}, got {array.shape}")
    if not np.all(np.isfinite(array)):
      raise ValueError(f"array for chunk {i} holds {int(np.sum(~np.isfinite(array)))} "
                       f"non-finite values; features must be finite")
    self._array[start:stop].write(array).result()
    digest = _rows_sha256(array)
    sums = self._sidecar.get("chunk_sha256", {})
    if int(i) not in self._sidecar["complete_chunks"] or sums.get(str(int(i))) != digest:
      sidecar = dict(self._sidecar)
      sidecar["complete_chunks"] = sorted(set(self._sidecar["complete_chunks"]) | {int(i)})
      sidecar["chunk_sha256"] = {**sums, str(int(i)): digest}
      atomic.write_json(self.path / SIDECAR, sidecar)
      self._sidecar = sidecar

  def chunk_file(self, i: int) -> pathlib.Path:
    """The file holding chunk ``i`` (zarr v3's default chunk key ``c/<i>/0``)."""
    return self.path / ARRAY / "c" / str(int(i)) / "0"

  def _verified_chunk(self, i: int) -> np.ndarray:
    """Chunk ``i``'s rows, checked against the checksum recorded at write."""
    start, stop = self.chunk_bounds(i)
    data = self._array[start:stop].read().result()
    expected = self._sidecar.get("chunk_sha256", {}).get(str(int(i)))
    bad = (expected is not None and _rows_sha256(data) != expected) or (
        expected is None and not np.all(np.isfinite(data)))
    if bad:
      state = "missing" if not self.chunk_file(i).exists() else "damaged"
      raise ValueError(f"feature store {self.path}: chunk {i} (rows {start}:{stop}, file "
                       f"{self.chunk_file(i)}) is {state}: its contents do not match what "
                       f"was written. Delete {self.path} and featurize again (or restore "
                       f"the file)")
    return data

  def read(self, rows=None) -> np.ndarray:
    """Reads features.

    Args:
      rows: ``None`` (all N), a ``slice``, or an integer index array.

    Returns:
      float32 [len(rows), k] (or [N, k]).

    Raises:
      ValueError: if a requested row lies in a chunk not yet complete.
    """
    if rows is None:
      rows = slice(None)
    if isinstance(rows, slice):
      idx = np.arange(self.num_rows)[rows]
    else:
      idx = np.asarray(rows)
      if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"rows must be None, a slice or a 1-D integer array, got {rows!r}")
      if idx.size and (idx.min() < -self.num_rows or idx.max() >= self.num_rows):
        raise ValueError(f"rows must index [0, N={self.num_rows}), got values in "
                         f"[{idx.min()}, {idx.max()}]")
      idx = idx % self.num_rows
    missing = set(self.missing_chunks())
    bad = sorted(set((idx // self.chunk_rows).tolist()) & missing)
    if bad:
      raise ValueError(f"rows requested from chunks {bad[:10]} of {self.path}, which are not "
                       f"complete ({len(missing)} of {self.num_chunks} chunks missing); "
                       f"finish featurizing first")
    out = np.empty((idx.size, self.dim), np.float32)
    which = idx // self.chunk_rows
    for c in np.unique(which):
      data = self._verified_chunk(int(c))
      at = which == c
      out[at] = data[idx[at] - int(c) * self.chunk_rows]
    return out
