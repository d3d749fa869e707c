"""An on-disk store of gradient features Φ [N, k], written chunk of rows by chunk of rows.

Featurizing a large training set takes hours; a store lets it be killed and resumed
without recomputing finished work, and lets train and query features be computed
once and scored many times. Layout of ``<store>/``::

    features/      a zarr v3 array [N, k], float32 or bfloat16 (tensorstore, file
                   kvstore), one zarr chunk per row chunk of ``chunk_rows`` rows; unwritten rows
                   read as NaN (the fill value)
    store.json     the sidecar: format, version, num_rows, dim, chunk_rows, dtype,
                   the ``config`` that produced the features, ``complete_chunks`` and
                   ``chunk_sha256`` (the sha256 of each complete chunk's rows as stored)

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

Many writers (one per host, ``store_featurize(process_index=p, process_count=P)``).
The chunks are split into P contiguous groups, process p owning chunks
[⌊p·C/P⌋, ⌊(p+1)·C/P⌋) of C (``process_chunks``; the groups' sizes differ by at
most one). Each process writes only its own zarr chunk files, and records each
chunk's completion in a file of its own instead of the shared sidecar, so no two
processes ever write the same file::

    done/<i>.json        chunk i is complete: its sha256, rows, the writing process
                         (index, count) and the store's ``config_sha256``; written
                         atomically after the chunk's data
    processes/<p>/       process p's lock (``.jattr.lock``: the same index cannot run
                         twice at once) and ``process.json``, what its last run used
                         and did: index, count, ``config_sha256``, params hash,
                         projection, selection, host, PID, status, chunks computed

``load``, ``refresh``, ``completed_chunks``, ``missing_chunks`` and ``read`` merge the
``done/`` records with the sidecar's list, so the store reads the same before and
after ``validate``, which checks the records against each other and the store,
raises ``StoreValidationError`` naming the missing chunks and the process that owns
them (the one to re-run), and otherwise folds the records into the sidecar and
removes ``done/``: the store is then a plain single-writer store (``processes/``
stays, as the provenance of the run). The sidecar's format is unchanged (version
1): a store made before these records existed reads as it did, and a jattr that
knows nothing of ``done/`` reads a validated store, and sees an unvalidated one as
incomplete (never as wrong).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import time
from typing import Any, Iterable

import numpy as np
import tensorstore as ts

from jattr.features.projection import ProjectionConfig
from jattr.io import atomic
from jattr.io.lock import LOCK_FILE, DirectoryLock

FORMAT = "jattr.feature_store"
VERSION = 1
SIDECAR = "store.json"
ARRAY = "features"
DTYPE = "float32"
DTYPES = ("float32", "bfloat16")
"""The dtypes a store may keep (``FeatureStore.open(dtype=...)``); reads are float32."""
DONE = "done"
"""Directory of the per-chunk completion records of a many-process run (``done/<i>.json``)."""
PROCESSES = "processes"
"""Directory of the per-process locks and records (``processes/<p>/``)."""
PROCESS_RECORD = "process.json"
CHUNK_FORMAT = "jattr.feature_store.chunk"
PROCESS_FORMAT = "jattr.feature_store.process"
RECORD_VERSION = 1
_RECORD_NAME = re.compile(r"^(0|[1-9][0-9]*)\.json$")
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
  the sparse kind existed), and grad_dtype only when set (``"bfloat16"``: such
  features never match float32-gradient ones)."""
  spec = dataclasses.asdict(config)
  if config.kind != "sparse":
    del spec["nonzeros"]
  if config.grad_dtype is None:
    del spec["grad_dtype"]
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


def _check_process(process_index, process_count) -> tuple[int, int]:
  for name, v in (("process_index", process_index), ("process_count", process_count)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise ValueError(f"{name} must be an int, got {v!r}")
  if not 0 <= int(process_index) < int(process_count):
    raise ValueError(f"process_index must be in [0, process_count={process_count}), got "
                     f"{process_index}")
  return int(process_index), int(process_count)


def process_chunks(num_chunks: int, process_index: int, process_count: int) -> range:
  """The chunks process ``process_index`` of ``process_count`` owns.

  ``range(⌊p·C/P⌋, ⌊(p+1)·C/P⌋)`` for C = ``num_chunks``: P contiguous groups whose
  sizes differ by at most one, covering every chunk once (empty for some p when
  C < P). Example: C = 7, P = 3 gives [0, 1], [2, 3], [4, 5, 6].
  """
  p, n = _check_process(process_index, process_count)
  return range(p * num_chunks // n, (p + 1) * num_chunks // n)


def chunk_owner(num_chunks: int, chunk: int, process_count: int) -> int:
  """The process (of ``process_count``) whose group (``process_chunks``) holds ``chunk``."""
  if not 0 <= int(chunk) < num_chunks:
    raise ValueError(f"chunk index must be in [0, {num_chunks}), got {chunk}")
  # the largest p with ⌊p·C/P⌋ ≤ chunk
  return min(int(process_count) - 1, ((int(chunk) + 1) * int(process_count) - 1) // num_chunks)


def _ranges(chunks: Iterable[int]) -> str:
  """``[0, 1, 2, 5]`` as ``"0-2, 5"``."""
  out, run = [], []
  for c in sorted(chunks):
    if run and c == run[-1] + 1:
      run.append(c)
      continue
    if run:
      out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    run = [c]
  if run:
    out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
  return ", ".join(out)


class StoreValidationError(ValueError):
  """``FeatureStore.validate`` found chunks missing or records inconsistent.

  Attributes:
    missing: process index -> the chunks it owns that are missing (the processes to
      re-run), under ``process_count``.
    process_count: the P the owners are computed for.
    problems: one sentence per inconsistency found.
  """

  def __init__(self, message: str, missing: dict[int, list[int]], process_count: int,
               problems: list[str]):
    super().__init__(message)
    self.missing = missing
    self.process_count = process_count
    self.problems = problems


class FeatureStore:
  """A chunked on-disk array Φ [N, k] (float32 or bfloat16, read as float32) and its config.

  Build one with ``FeatureStore.open`` (create or resume, checking the config) or
  ``FeatureStore.load`` (an existing store, config read from disk). The object
  holds the sidecar's contents, the ``done/`` records of a many-process run (merged
  with the sidecar's list; see the module docstring) and a tensorstore handle; it
  does no computation.

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
    self._records: dict[int, dict] = {}  # chunk -> its done/ record
    self._unreadable: list[str] = []  # done/ files that are not records (ignored)
    self._read_records()

  # -- construction ---------------------------------------------------------------

  @staticmethod
  def _array_spec(path: pathlib.Path) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / ARRAY)}}

  @classmethod
  def open(cls, path: str | os.PathLike, config: dict, num_rows: int, dim: int,
           chunk_rows: int, dtype: str = DTYPE) -> "FeatureStore":
    """Creates a store, or reopens one made with the same configuration.

    Args:
      path: the store directory (created if missing). An existing directory must be
        empty or a feature store.
      config: JSON-able dict describing the features; must equal the stored one.
      num_rows: N ≥ 1.
      dim: k ≥ 1.
      chunk_rows: rows per chunk ≥ 1 (also the zarr chunk's row count).
      dtype: what the array keeps, ``"float32"`` or ``"bfloat16"`` (half the disk
        and read bandwidth; rows are rounded to nearest bf16 when written, relative
        error ≤ 2⁻⁸ per value, and ``read`` returns float32). Part of the layout:
        reopening with the other dtype is refused.

    Returns:
      The store; ``missing_chunks()`` lists what is left to write.

    Raises:
      ValueError: if the directory holds a store with a different config, N, k,
        chunk_rows or dtype (the message names every differing key), or a directory
        that is not a feature store.
    """
    for name, v in (("num_rows", num_rows), ("dim", dim), ("chunk_rows", chunk_rows)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = pathlib.Path(path)
    config = _normalize(config)
    layout = {"num_rows": int(num_rows), "dim": int(dim), "chunk_rows": int(chunk_rows),
              "dtype": dtype}
    if not (path / SIDECAR).exists():
      created = cls._create(path, config, layout)
      if created is not None:
        return created
    store = cls.load(path)  # an existing store (or one another process just created)
    stored = {**{k: store._sidecar[k] for k in layout}, "config": store.config}
    given = {**layout, "config": config}
    diff = config_diff(stored, given)
    if diff:
      raise ValueError(
          f"feature store {path} was made with a different configuration; differing keys: "
          f"{describe_diff(stored, given, diff)}. Features of different configurations "
          f"are never mixed: use another directory, or delete this one to recompute")
    return store

  @classmethod
  def _create(cls, path: pathlib.Path, config: dict, layout: dict) -> "FeatureStore | None":
    """A new store at ``path``; ``None`` if another process created it meanwhile.

    Several processes (one per host) may open the same new store at once. Creation
    never destroys what a peer wrote: an existing ``features/`` array of the same
    layout is kept (its chunks are not marked complete, so they are rewritten), and
    only one of another layout (a crash during an earlier creation) is recreated. A
    peer that creates the store at the same moment writes the same sidecar.
    """
    leftovers = [p.name for p in path.iterdir()] if path.exists() else []
    if SIDECAR in leftovers:  # created by another process since the caller looked
      return None
    if any(n not in (ARRAY, LOCK_FILE) and not n.startswith(f".{SIDECAR}.tmp")
           for n in leftovers):
      raise ValueError(f"path {path} exists and is not a feature store (no {SIDECAR}, and it "
                       f"holds {sorted(leftovers)[:5]}); expected an "
                       f"empty or missing directory")
    path.mkdir(parents=True, exist_ok=True)
    # A features/ array (or a temporary sidecar) without a sidecar is what a crash
    # during creation leaves; nothing in it is marked complete.
    spec = cls._array_spec(path)
    spec["metadata"] = {
        "shape": [layout["num_rows"], layout["dim"]],
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [layout["chunk_rows"], layout["dim"]]}},
        "data_type": layout["dtype"],
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "fill_value": "NaN",
    }
    try:  # the same layout: opened as it is (a peer may be writing chunks into it)
      array = ts.open(spec, create=True, open=True).result()
    except ValueError:  # another layout, or unreadable metadata: recreated
      array = ts.open(spec, create=True, delete_existing=True).result()
    if (path / SIDECAR).exists():
      return None
    sidecar = {"format": FORMAT, "version": VERSION, **layout, "config": config,
               "complete_chunks": []}
    atomic.write_json(path / SIDECAR, sidecar)
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
    """Re-reads the sidecar and the ``done/`` records (e.g. after taking the store's
    lock: another writer may have completed chunks since this object was opened)."""
    # The sidecar first, the records after: a ``validate`` folding the records into
    # the sidecar (then deleting them) meanwhile is seen before or after, never lost.
    with open(self.path / SIDECAR) as f:
      self._sidecar = json.load(f)
    self._read_records()
    return self

  def _read_records(self) -> None:
    """Reads ``done/``; a record already read is kept (each is written once, atomically)."""
    folder = self.path / DONE
    names = {n for n in os.listdir(folder) if _RECORD_NAME.match(n)} if folder.is_dir() else set()
    records, unreadable = {}, []
    for name in sorted(names, key=lambda n: int(n.split(".")[0])):
      i = int(name.split(".")[0])
      if i in self._records:
        records[i] = self._records[i]
        continue
      try:
        with open(folder / name) as f:
          record = json.load(f)
      except FileNotFoundError:  # removed by a validate meanwhile (now in the sidecar)
        continue
      except (OSError, json.JSONDecodeError) as e:
        unreadable.append(f"{folder / name} ({e})")
        continue
      if not (isinstance(record, dict) and record.get("format") == CHUNK_FORMAT
              and record.get("version") == RECORD_VERSION and record.get("chunk") == i
              and isinstance(record.get("sha256"), str) and 0 <= i < self.num_chunks):
        unreadable.append(f"{folder / name} (not a chunk record of format {CHUNK_FORMAT!r} "
                          f"version {RECORD_VERSION} for chunk {i})")
        continue
      records[i] = record
    self._records, self._unreadable = records, unreadable

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
  def dtype(self) -> str:
    """What the array keeps on disk (``DTYPES``); ``read`` always returns float32."""
    return self._sidecar["dtype"]

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
    """Indices of the complete chunks: the sidecar's and those of the ``done/`` records."""
    if not self._records:
      return list(self._sidecar["complete_chunks"])
    return sorted(set(self._sidecar["complete_chunks"]) | set(self._records))

  def missing_chunks(self) -> list[int]:
    """Indices of the chunks not yet written, ascending."""
    done = set(self.completed_chunks())
    return [i for i in range(self.num_chunks) if i not in done]

  @property
  def complete(self) -> bool:
    return len(self.completed_chunks()) == self.num_chunks

  @property
  def config_sha256(self) -> str:
    """sha256 of the layout (N, k, chunk_rows, dtype) and config, as canonical JSON: what
    every process of a many-process run records, so that ``validate`` can tell that
    they all wrote the same store."""
    doc = {k: self._sidecar[k] for k in ("num_rows", "dim", "chunk_rows", "dtype")}
    text = json.dumps({**doc, "config": self.config}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()

  def _expected_sha256(self, i: int) -> str | None:
    record = self._records.get(int(i))
    if record is not None:
      return record["sha256"]
    return self._sidecar.get("chunk_sha256", {}).get(str(int(i)))

  def __repr__(self) -> str:
    return (f"FeatureStore({str(self.path)!r}, N={self.num_rows}, k={self.dim}, "
            f"chunks {len(self.completed_chunks())}/{self.num_chunks} complete)")

  # -- I/O ------------------------------------------------------------------------

  def write_chunk(self, i: int, array, *, process: tuple[int, int] | None = None) -> None:
    """Writes the rows of chunk ``i``, then marks it complete.

    ``process``: ``None``, the one writer, marks the chunk in the sidecar;
    ``(process_index, process_count)``, one of many processes writing the store at
    once, marks it in its own record ``done/<i>.json`` instead (the sidecar is never
    written then, so the processes never race on it; ``validate`` folds the records
    in).

    Args:
      i: chunk index in [0, num_chunks).
      array: [stop − start, k] rows (``chunk_bounds(i)``), cast to float32, then
        rounded to the store's ``dtype``; must be finite (after rounding), so that
        NaN (the fill value) always means "not written".
    """
    start, stop = self.chunk_bounds(i)
    # to the stored dtype first: the checks and the checksum see what is stored
    array = np.asarray(array, dtype=np.float32).astype(self._array.dtype.numpy_dtype, copy=False)
    if array.shape != (stop - start, self.dim):
      raise ValueError(f"array for chunk {i} must have shape [rows {start}:{stop}, k] = "
                       f"{(stop - start, self.dim)}, got {array.shape}")
    if not np.all(np.isfinite(array)):
      raise ValueError(f"array for chunk {i} holds {int(np.sum(~np.isfinite(array)))} "
                       f"non-finite values; features must be finite")
    if process is not None:
      process = _check_process(*process)
    self._array[start:stop].write(array).result()
    digest = _rows_sha256(array)
    if process is not None:
      record = {"format": CHUNK_FORMAT, "version": RECORD_VERSION, "chunk": int(i),
                "rows": [start, stop], "sha256": digest, "process_index": process[0],
                "process_count": process[1], "config_sha256": self.config_sha256}
      (self.path / DONE).mkdir(exist_ok=True)
      atomic.write_json(self.path / DONE / f"{int(i)}.json", record)
      self._records[int(i)] = record
      return
    sums = self._sidecar.get("chunk_sha256", {})
    if int(i) not in self._sidecar["complete_chunks"] or sums.get(str(int(i))) != digest:
      sidecar = dict(self._sidecar)
      sidecar["complete_chunks"] = sorted(set(self._sidecar["complete_chunks"]) | {int(i)})
      sidecar["chunk_sha256"] = {**sums, str(int(i)): digest}
      atomic.write_json(self.path / SIDECAR, sidecar)
      self._sidecar = sidecar
    if int(i) in self._records:  # the sidecar now says what chunk i holds
      (self.path / DONE / f"{int(i)}.json").unlink(missing_ok=True)
      del self._records[int(i)]

  def chunk_file(self, i: int) -> pathlib.Path:
    """The file holding chunk ``i`` (zarr v3's default chunk key ``c/<i>/0``)."""
    return self.path / ARRAY / "c" / str(int(i)) / "0"

  def _verified_chunk(self, i: int) -> np.ndarray:
    """Chunk ``i``'s rows, checked against the checksum recorded at write."""
    start, stop = self.chunk_bounds(i)
    data = self._array[start:stop].read().result()
    expected = self._expected_sha256(i)
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
      float32 [len(rows), k] (or [N, k]), whatever the store's ``dtype`` (a bf16
      store's values upcast exactly).

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
      out[at] = data[idx[at] - int(c) * self.chunk_rows].astype(np.float32)  # bf16: upcast
    return out

  # -- many processes -------------------------------------------------------------

  def process_lock(self, process_index: int) -> DirectoryLock:
    """The lock of process ``process_index`` (``processes/<p>/.jattr.lock``): processes
    of different indices write at once, the same index twice is refused."""
    return DirectoryLock(self.path / PROCESSES / str(int(process_index)),
                         f"process {int(process_index)} of feature store")

  def write_process_record(self, process_index: int, record: dict) -> None:
    """Writes ``processes/<p>/process.json`` atomically (format and version added)."""
    folder = self.path / PROCESSES / str(int(process_index))
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_json(folder / PROCESS_RECORD, {
        **atomic.to_json_types(record, "the process record"), "format": PROCESS_FORMAT,
        "version": RECORD_VERSION, "process_index": int(process_index)})

  def process_records(self) -> tuple[dict[int, dict], list[str]]:
    """``({p: record of processes/<p>/process.json}, [unreadable records, described])``."""
    folder = self.path / PROCESSES
    records, unreadable = {}, []
    names = sorted(os.listdir(folder)) if folder.is_dir() else []
    for name in names:
      path = folder / name / PROCESS_RECORD
      if not re.fullmatch(r"0|[1-9][0-9]*", name) or not path.exists():
        continue  # a lock folder of a process that has not written its record yet
      try:
        with open(path) as f:
          record = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        unreadable.append(f"{path} ({e})")
        continue
      if not (isinstance(record, dict) and record.get("format") == PROCESS_FORMAT
              and record.get("version") == RECORD_VERSION
              and record.get("process_index") == int(name)
              and isinstance(record.get("process_count"), int)):
        unreadable.append(f"{path} (not a process record of format {PROCESS_FORMAT!r} "
                          f"version {RECORD_VERSION})")
        continue
      records[int(name)] = record
    return records, unreadable

  def validate(self, process_count: int | None = None, *,
               check_data: bool = True) -> "FeatureStore":
    """Checks a store written by many processes, then folds their records in.

    Checks that every chunk is complete; that every process recorded this store's
    ``config_sha256``; that they all used the same parameters (``params_sha256``),
    projection and selection, and the store's own where its config names them; that
    each ``done/`` record belongs to this configuration and agrees with the sidecar;
    and (``check_data``) that every chunk's rows match their recorded sha256 (reads
    the whole store). Then, under the store's lock, writes the records' chunks and
    checksums into the sidecar and removes ``done/``: the store is a plain complete
    single-writer store. A store without records (one writer) is only checked.

    Args:
      process_count: the P whose groups (``process_chunks``) say which process owns a
        missing chunk; ``None``: the count the processes' latest run recorded (1 for a
        store without records).
      check_data: also verify every chunk's data (all N·k values are read).

    Returns:
      ``self``, refreshed (and complete).

    Raises:
      StoreValidationError: chunks are missing (the message names them, the process
        of ``process_count`` owning each, how to re-run it, and what that process's
        last run recorded) or records are inconsistent (each problem named).
      jattr.io.lock.InUseError: another process holds the store's lock (a writer, or
        a validate folding the records).
    """
    self.refresh()
    procs, bad_procs = self.process_records()
    count = self._record_count(procs) if process_count is None else int(process_count)
    if count < 1:
      raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    problems = [f"unreadable process record {d}" for d in bad_procs]
    problems += self._inconsistencies(procs)
    if check_data:
      for i in self.completed_chunks():
        try:
          self._verified_chunk(i)
        except ValueError as e:
          problems.append(str(e))
    missing: dict[int, list[int]] = {}
    for i in self.missing_chunks():
      missing.setdefault(chunk_owner(self.num_chunks, i, count), []).append(i)
    if missing or problems:
      raise StoreValidationError(self._validation_message(missing, count, procs, problems),
                                 missing, count, problems)
    if self._records:
      self._fold()
    return self

  @staticmethod
  def _record_count(procs: dict[int, dict]) -> int:
    if procs:  # the latest run's
      latest = max(procs.values(), key=lambda r: float(r.get("started", 0) or 0))
      return int(latest["process_count"])
    return 1

  def _inconsistencies(self, procs: dict[int, dict]) -> list[str]:
    out, digest = [], self.config_sha256
    for i, r in sorted(self._records.items()):
      if r.get("config_sha256") != digest:
        out.append(f"{self.path / DONE / f'{i}.json'} was written for another store "
                   f"configuration (config_sha256 {str(r.get('config_sha256'))[:12]}…, the "
                   f"store's {digest[:12]}…)")
      listed = self._sidecar.get("chunk_sha256", {}).get(str(i))
      if listed is not None and listed != r["sha256"]:
        out.append(f"chunk {i}: {SIDECAR} and {DONE}/{i}.json record different sha256")
    for p, r in sorted(procs.items()):
      if r.get("config_sha256") != digest:
        out.append(f"process {p} ({_who(r)}) featurized for another store configuration "
                   f"(config_sha256 {str(r.get('config_sha256'))[:12]}…, the store's "
                   f"{digest[:12]}…)")
    model = self.config.get("model") if isinstance(self.config.get("model"), dict) else {}
    for key, what, stored in (("params_sha256", "parameters", model.get("params_sha256")),
                              ("projection", "projection", self.config.get("projection")),
                              ("wrt", "parameter selection (wrt)", model.get("wrt"))):
      seen = {p: r.get(key) for p, r in sorted(procs.items()) if key in r}
      if len({json.dumps(v, sort_keys=True) for v in seen.values()}) > 1:
        out.append(f"the processes used different {what}: " + "; ".join(
            f"process {p} {_short(v)}" for p, v in seen.items()))
      elif seen and stored is not None and next(iter(seen.values())) != stored:
        out.append(f"the processes used {what} {_short(next(iter(seen.values())))}, the "
                   f"store's config says {_short(stored)}")
    return out

  def _validation_message(self, missing: dict[int, list[int]], count: int,
                          procs: dict[int, dict], problems: list[str]) -> str:
    lines = []
    if missing:
      total = sum(map(len, missing.values()))
      lines.append(f"feature store {self.path} is incomplete: {total} of {self.num_chunks} "
                   f"chunks missing. Re-run each process named (the same job, or only it: "
                   f"store_featurize(..., process_index=p, process_count={count}), `jattr "
                   f"featurize ... --process-index p --process-count {count}`); it computes "
                   f"only the missing chunks:")
      for p, chunks in sorted(missing.items()):
        rows = sum(b - a for a, b in map(self.chunk_bounds, chunks))
        lines.append(f"  process {p} of {count}: chunks {_ranges(chunks)} ({rows} rows) "
                     f"missing; {_last_run(procs.get(p), count)}")
      if self._unreadable:
        lines.append("  (unreadable chunk records, ignored: " + "; ".join(self._unreadable)
                     + ")")
    if problems:
      lines.append(f"feature store {self.path} has inconsistent records:")
      lines.extend(f"  {p}" for p in problems)
    return "\n".join(lines)

  def _fold(self) -> None:
    """The ``done/`` records into the sidecar, then ``done/`` removed (under the lock)."""
    with DirectoryLock(self.path, "feature store"):
      self.refresh()  # another process may have folded them meanwhile
      if not self._records:
        return
      sidecar = dict(self._sidecar)
      sidecar["complete_chunks"] = self.completed_chunks()
      sidecar["chunk_sha256"] = {**self._sidecar.get("chunk_sha256", {}),
                                 **{str(i): r["sha256"] for i, r in self._records.items()}}
      atomic.write_json(self.path / SIDECAR, sidecar)  # first: a crash leaves both agreeing
      self._sidecar = sidecar
      folder = self.path / DONE
      for name in os.listdir(folder):
        if _RECORD_NAME.match(name) or (name.startswith(".") and ".tmp-" in name):
          (folder / name).unlink(missing_ok=True)
      self._records = {}
      try:
        folder.rmdir()
      except OSError:  # something else in it (left as it is)
        pass


def _who(record: dict) -> str:
  return f"host {record.get('host', '?')}, PID {record.get('pid', '?')}"


def _short(value) -> str:
  if isinstance(value, str) and len(value) == 64:
    return f"{value[:12]}…"
  return json.dumps(value, sort_keys=True)


def _last_run(record: dict | None, count: int) -> str:
  """What process p's record says of its last run (for the missing-chunks message)."""
  if record is None:
    return "it never ran (no process record)"
  when = record.get("started")
  at = f", started {_format_time(when)}" if isinstance(when, (int, float)) else ""
  ran_as = ("" if record.get("process_count") == count
            else f" as process {record.get('process_index')} of {record.get('process_count')}")
  if record.get("status") == "finished":
    return f"its last run ({_who(record)}{at}){ran_as} finished"
  return f"its last run ({_who(record)}{at}){ran_as} did not finish (killed, or still running)"


def _format_time(t: float) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
