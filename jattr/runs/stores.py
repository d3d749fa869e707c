"""Featurize into an on-disk ``FeatureStore``, resumably, one row chunk at a time.

For every row chunk c of the store that is not yet complete,

    Φ[c] = [Pᵀ ∇_θ f(θ; z_i)]_{i ∈ c}          (``jattr.features.featurize``)

is computed and written (``FeatureStore.write_chunk``), so a run killed at any point
resumes where it stopped and never recomputes a finished chunk. Rows are independent
(a row depends only on its own example, θ and the projection seed), so the
features of a resumed run equal those of an uninterrupted one exactly.

A store's ``config`` says what its rows are. ``jattr.io.feature_store.feature_config``
builds the standard one: the model (``model_hash`` of θ), the output function (name and kwargs), the
draws (K, timesteps mode, seed), the projection (``ProjectionConfig`` fields) and
the examples (dataset, N, hash of their indices or contents). Train and query stores
can be scored against each other only if they agree on ``COMPATIBLE_KEYS``
(``jattr.io.feature_store.check_compatible``).

Features w.r.t. a subset θ_S of the parameters (``wrt``, ``jattr.wrt``) are
φ = Pᵀ ∇_{θ_S} f; the store's ``model.wrt`` is the ``selection_record`` of that
selection, and ``model.params_sha256`` hashes the whole model, frozen leaves too.

Many hosts, one store. ``store_featurize(..., process_index=p, process_count=P)``
(default: ``jax.process_index()`` / ``jax.process_count()``) computes only the
missing chunks of process p's contiguous group (``jattr.io.feature_store.
process_chunks``), records each in ``done/<i>.json`` and what it used in
``processes/<p>/process.json``, then waits for the other processes' chunks by
watching the store (a file-system barrier: it needs no collective, so a killed peer
ends the wait with an error naming it instead of a hang, and a peer restarted on its
own is waited for), and the first process to see every chunk complete folds the
records into the sidecar (``validate_store``). A killed process is resumed by
running it again with the same arguments. See docs/devices.md.
"""

from __future__ import annotations

import os
import socket
import time

import jax
import numpy as np

from jattr.features.projection import ProjectionConfig, featurize
from jattr.grads.per_example import ExampleFn
from jattr.io.feature_store import (DONE, FeatureStore, StoreValidationError, config_diff,
                                    process_chunks, projection_spec)
from jattr.io.hashing import model_hash, selection_mismatch
from jattr.io.lock import DirectoryLock, InUseError
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.types import Params
from jattr.wrt import Selector, complement, selection_summary

DEFAULT_WAIT_S = 600.0
"""How long (seconds without a new chunk anywhere in the store) a process of a
``jax.distributed`` job waits for its peers after its own chunks (``wait_s=None``)."""


def selection_record(params: Params, wrt: Selector) -> dict | None:
  """What the files made with ``wrt`` record of it (``None`` for ``wrt=None``).

  ``jattr.wrt.selection_summary`` (selector, ``selection_sha256`` of the selected
  paths, numbers of leaves and parameters) plus ``frozen_sha256``, the
  ``model_hash`` of the frozen leaves (``None`` when every leaf is selected), so a
  mismatch can say that a frozen parameter changed
  (``jattr.io.hashing.selection_mismatch``).
  """
  summary = selection_summary(params, wrt)
  if summary is None:
    return None
  rest = complement(params, wrt)
  return {**summary, "frozen_sha256": None if rest is None else model_hash(rest)}


def check_selection(stored: dict | None, params: Params, wrt: Selector, what: str) -> None:
  """Raises ValueError unless ``wrt`` on ``params`` is the selection ``stored`` records
  (``None``: all parameters), naming what changed."""
  why = selection_mismatch(stored, selection_record(params, wrt))
  if why:
    raise ValueError(f"{what} was made with {why}; use the same selection (--wrt), or make "
                     "it again")


def _check_store(store: FeatureStore, params, num: int, proj_config: ProjectionConfig,
                 wrt: Selector = None, params_hash: str | None = None):
  if store.num_rows != num:
    raise ValueError(f"examples must have N = store.num_rows = {store.num_rows} rows, got {num}")
  if store.dim != proj_config.dim:
    raise ValueError(f"proj_config.dim must equal store.dim = {store.dim}, got {proj_config.dim}")
  stored = store.config.get("projection")
  if stored is not None and stored != projection_spec(proj_config):
    raise ValueError(f"proj_config {projection_spec(proj_config)} differs from the store's "
                     f"projection {stored}; differing keys: "
                     f"{config_diff(stored, projection_spec(proj_config))}")
  model = store.config.get("model") or {}
  stored_hash = model.get("params_sha256")
  if stored_hash is not None and stored_hash != (params_hash or model_hash(params)):
    why = selection_mismatch(model.get("wrt"), selection_record(params, wrt))
    hint = f" ({why})" if why and why.startswith("a frozen") else ""
    raise ValueError(f"params hash {model_hash(params)[:12]}… differs from the store's "
                     f"model.params_sha256 {stored_hash[:12]}…{hint}: these are not the "
                     f"parameters the store was made for (the hash covers the whole model, "
                     f"frozen parameters included)")
  if stored_hash is not None:  # a store of jattr's standard config: its selection too
    check_selection(model.get("wrt"), params, wrt, f"feature store {store.path}")


def store_featurize(fn: ExampleFn, params: Params, examples, proj_config: ProjectionConfig,
                    store: FeatureStore, *, chunk_size: int | None = None,
                    progress: Progress | None = None, wrt: Selector = None,
                    process_index: int | None = None, process_count: int | None = None,
                    wait_s: float | None = None) -> FeatureStore:
  """Computes and writes every missing row chunk of ``store`` (of this process's group).

      Φ[c] = featurize(fn, θ, examples[c], proj_config)     for c in store.missing_chunks()

  Each chunk is computed with ``jattr.features.featurize`` (per-example gradients
  and projection fused, ``chunk_size`` gradients at a time); the last, shorter row
  chunk is padded with copies of its last example so that every chunk has one
  compiled shape, and the padded rows are dropped. Chunk c is written to disk while
  chunk c+1 computes; only one chunk computes at a time.

  Many processes (one per host, e.g. under ``jax.distributed.initialize``) fill one
  store when each calls this with the same arguments: process p of P computes only
  the missing chunks of its group [⌊p·C/P⌋, ⌊(p+1)·C/P⌋) of the C chunks
  (``jattr.io.feature_store.process_chunks``), marks each in its own record file
  (never the shared sidecar) and records what it used (``processes/<p>/``); then it
  waits until every chunk of the store is complete, and the first process to see it
  complete checks and folds the records (``validate_store``), so the store ends as a
  plain single-writer store. A killed process is resumed by running it again (the
  whole job, or only it with explicit ``process_index``/``process_count``): it
  computes only its missing chunks. With P = 1 it is the one writer of the store,
  exactly as before (no records are written). See docs/devices.md.

  Args:
    fn: ``fn(params, example) -> scalar`` for ONE example (e.g. a
      ``jattr.diffusion.measurements.measurement_fn``).
    params: θ. If the store's config has ``model.params_sha256`` it must match
      ``model_hash(params)``.
    examples: pytree of arrays (numpy or jax) with leading axis N = store.num_rows
      (every process passes all N; each reads only its own chunks' rows).
    proj_config: the projection; dim must equal store.dim, and the store's config
      ``projection`` section (if any) must equal it.
    store: an open ``FeatureStore`` (every process opens the same directory).
    chunk_size: examples whose gradients exist at once, ≤ store.chunk_rows;
      ``None`` uses store.chunk_rows. Peak memory ≈ chunk_size × P floats, whatever N.
    progress: called after each chunk is written, with rows done (``jattr.progress``;
      with P > 1, rows of this process's group).
    wrt: the parameters the gradients are taken with respect to (``jattr.wrt``;
      ``None``: all). Must be the selection the store's ``model.wrt`` records (a
      store without one: all parameters).
    process_index: p in [0, P); ``None``: ``jax.process_index()``.
    process_count: P ≥ 1; ``None``: ``jax.process_count()``.
    wait_s: with P > 1, how long to wait for the other processes' chunks after this
      one's, in seconds without a new chunk appearing anywhere in the store (so a
      slow but live peer is waited for, a dead one is not); when it runs out the call
      raises ``StoreValidationError`` naming the missing chunks and the processes to
      re-run. ``0``: return at once (the store may be incomplete; whichever process
      finishes last folds the records). ``None``: ``DEFAULT_WAIT_S`` in a
      ``jax.distributed`` job (``jax.process_count() > 1``), else 0 (processes started
      on their own may not run at the same time).

  The store's directory is locked while chunks are written (``jattr.io.lock``): a
  second writer gets ``InUseError`` naming the PID of the first. With P > 1 the lock
  is process p's own (``processes/<p>/``): processes of other indices write at once,
  a second process p is refused. Do not run a P = 1 writer beside a P > 1 job.

  Returns:
    ``store``, now complete (with P > 1 and ``wait_s`` 0: its group complete).

  Raises:
    StoreValidationError: with P > 1, the peers' chunks did not arrive within
      ``wait_s``, or the processes' records disagree (other parameters, projection).
  """
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(examples)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"examples must be a non-empty pytree of arrays sharing a leading axis N, "
                     f"got leading sizes {sorted(map(str, sizes))}")
  n = sizes.pop()
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  own = process_chunks(store.num_chunks, p, count)  # checks 0 <= p < count
  params_hash = model_hash(params) if count > 1 else None
  _check_store(store, params, n, proj_config, wrt, params_hash)
  rows = store.chunk_rows
  if chunk_size is not None and not 1 <= int(chunk_size) <= rows:
    raise ValueError(f"chunk_size must be in [1, store.chunk_rows={rows}] or None, got "
                     f"{chunk_size}")
  chunk_size = rows if chunk_size is None else int(chunk_size)
  if wait_s is None:
    wait_s = DEFAULT_WAIT_S if jax.process_count() > 1 else 0.0
  if wait_s < 0:
    raise ValueError(f"wait_s must be >= 0 or None, got {wait_s}")

  def rows_of(i):
    start, stop = store.chunk_bounds(i)
    idx = np.minimum(np.arange(start, start + rows), stop - 1)
    return jax.tree_util.tree_map(lambda x: x[idx], examples)

  if count == 1:
    with DirectoryLock(store.path, "feature store"):  # one writer at a time
      store.refresh()  # under the lock: chunks another writer finished are not redone
      _write_missing(fn, params, proj_config, store, rows_of, store.missing_chunks(), n,
                     chunk_size, progress, wrt)
      if (store.path / DONE).is_dir():  # finishing a many-process run's store alone
        store.validate(1, check_data=False)
    return store

  with store.process_lock(p):  # this process index once at a time; the others beside it
    store.refresh()  # under the lock: chunks a previous run finished are not redone
    todo = [i for i in store.missing_chunks() if i in own]
    record = {"process_count": count, "chunks": [own.start, own.stop],
              "config_sha256": store.config_sha256, "params_sha256": params_hash,
              "projection": projection_spec(proj_config), "wrt": selection_record(params, wrt),
              "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "status": "running", "missing_at_start": todo}
    store.write_process_record(p, record)
    total = sum(b - a for a, b in map(store.chunk_bounds, own))
    _write_missing(fn, params, proj_config, store, rows_of, todo, total, chunk_size,
                   progress, wrt, process=(p, count))
    store.write_process_record(p, {**record, "status": "finished", "computed": todo,
                                   "finished": time.time()})
  return _await_peers(store, count, float(wait_s))


def validate_store(store: FeatureStore | str | os.PathLike, process_count: int | None = None,
                   *, check_data: bool = True) -> FeatureStore:
  """Checks a store many processes wrote and folds their records into its sidecar.

  ``FeatureStore.validate``: every chunk complete, the processes' records consistent
  (same store configuration, parameters, projection, selection) and, with
  ``check_data``, every chunk's rows matching their checksum; then the ``done/``
  records are folded into ``store.json``, so the store is a plain complete store.
  ``store_featurize`` calls it itself when a many-process run completes; call it to
  find out what is missing after a failed job.

  Args:
    store: the store, or its directory.
    process_count: P, to name the owner of a missing chunk (``None``: what the
      processes recorded).
    check_data: verify every chunk's data too (reads the whole store).

  Returns:
    The store, validated.

  Raises:
    StoreValidationError: chunks missing (named, with the process of P owning them,
      i.e. the one to re-run) or records inconsistent.
  """
  if not isinstance(store, FeatureStore):
    store = FeatureStore.load(store)
  return store.validate(process_count, check_data=check_data)


def _await_peers(store: FeatureStore, count: int, wait_s: float) -> FeatureStore:
  """Waits (a file-system barrier) until ``store`` is complete or ``wait_s`` passes
  without a new chunk; the first process to see it complete folds the records."""
  poll, seen, since = 0.05, len(store.refresh().completed_chunks()), time.monotonic()
  while not store.complete:
    left = wait_s - (time.monotonic() - since)
    if left <= 0:
      break
    time.sleep(min(poll, left))
    poll = min(2 * poll, 2.0)
    done = len(store.refresh().completed_chunks())
    if done > seen:  # a live peer: its progress restarts the clock
      seen, since = done, time.monotonic()
  if store.complete:
    try:
      store.validate(count, check_data=False)
    except InUseError:  # another process is folding the records at this moment
      pass
    return store
  if wait_s > 0:
    try:
      store.validate(count, check_data=False)
    except StoreValidationError as e:
      raise StoreValidationError(
          f"no chunk of {store.path} was completed for {wait_s:g} s while this process "
          f"waited for the others (wait_s); is one dead?\n{e}", e.missing, e.process_count,
          e.problems) from None
  return store


def _write_missing(fn, params, proj_config, store, rows_of, todo, total, chunk_size, progress,
                   wrt, process=None):
  """Computes and writes the chunks ``todo``, reporting rows done of ``total``."""
  report = resolve_progress(progress)
  done = [total - sum(b - a for a, b in map(store.chunk_bounds, todo))]

  def write(i, phi):
    start, stop = store.chunk_bounds(i)
    if process is None:
      store.write_chunk(i, np.asarray(phi)[:stop - start])
    else:
      store.write_chunk(i, np.asarray(phi)[:stop - start], process=process)
    done[0] += stop - start
    report("featurize", done[0], total)

  pending = None
  kw = {} if wrt is None else {"wrt": wrt}  # wrt=None: the call it was before selections
  for i in todo:
    phi = featurize(fn, params, rows_of(i), proj_config, chunk_size=chunk_size, **kw)
    if pending is not None:
      write(*pending)
    # Wait for chunk i before dispatching chunk i + 1: two chunks' gradients in
    # flight at once would double the peak memory.
    pending = (i, jax.block_until_ready(phi))
  if pending is not None:
    write(*pending)
