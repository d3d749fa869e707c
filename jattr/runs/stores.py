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
"""

from __future__ import annotations

import jax
import numpy as np

from jattr.features.projection import ProjectionConfig, featurize
from jattr.grads.per_example import ExampleFn
from jattr.io.feature_store import FeatureStore, config_diff, projection_spec
from jattr.io.hashing import model_hash, selection_mismatch
from jattr.io.lock import DirectoryLock
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.types import Params
from jattr.wrt import Selector, complement, selection_summary


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
                 wrt: Selector = None):
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
  if stored_hash is not None and stored_hash != model_hash(params):
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
                    progress: Progress | None = None, wrt: Selector = None) -> FeatureStore:
  """Computes and writes every missing row chunk of ``store``.

      Φ[c] = featurize(fn, θ, examples[c], proj_config)     for c in store.missing_chunks()

  Each chunk is computed with ``jattr.features.featurize`` (per-example gradients
  and projection fused, ``chunk_size`` gradients at a time); the last, shorter row
  chunk is padded with copies of its last example so that every chunk has one
  compiled shape, and the padded rows are dropped. Chunk c is written to disk while
  chunk c+1 computes; only one chunk computes at a time.

  Args:
    fn: ``fn(params, example) -> scalar`` for ONE example (e.g. a
      ``jattr.diffusion.measurements.measurement_fn``).
    params: θ. If the store's config has ``model.params_sha256`` it must match
      ``model_hash(params)``.
    examples: pytree of arrays (numpy or jax) with leading axis N = store.num_rows.
    proj_config: the projection; dim must equal store.dim, and the store's config
      ``projection`` section (if any) must equal it.
    store: an open ``FeatureStore``.
    chunk_size: examples whose gradients exist at once, ≤ store.chunk_rows;
      ``None`` uses store.chunk_rows. Peak memory ≈ chunk_size × P floats, whatever N.
    progress: called after each chunk is written, with rows done (``jattr.progress``).
    wrt: the parameters the gradients are taken with respect to (``jattr.wrt``;
      ``None``: all). Must be the selection the store's ``model.wrt`` records (a
      store without one: all parameters).

  The store's directory is locked while chunks are written (``jattr.io.lock``): a
  second writer gets ``InUseError`` naming the PID of the first.

  Returns:
    ``store``, now complete.
  """
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(examples)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"examples must be a non-empty pytree of arrays sharing a leading axis N, "
                     f"got leading sizes {sorted(map(str, sizes))}")
  n = sizes.pop()
  _check_store(store, params, n, proj_config, wrt)
  rows = store.chunk_rows
  if chunk_size is not None and not 1 <= int(chunk_size) <= rows:
    raise ValueError(f"chunk_size must be in [1, store.chunk_rows={rows}] or None, got "
                     f"{chunk_size}")
  chunk_size = rows if chunk_size is None else int(chunk_size)

  def rows_of(i):
    start, stop = store.chunk_bounds(i)
    idx = np.minimum(np.arange(start, start + rows), stop - 1)
    return jax.tree_util.tree_map(lambda x: x[idx], examples)

  with DirectoryLock(store.path, "feature store"):  # one writer at a time
    _write_missing(fn, params, proj_config, store, rows_of, n, chunk_size, progress, wrt)
  return store


def _write_missing(fn, params, proj_config, store, rows_of, n, chunk_size, progress, wrt):
  store.refresh()  # under the lock: chunks another writer finished are not redone
  report = resolve_progress(progress)
  done = [sum(b - a for a, b in map(store.chunk_bounds, store.completed_chunks()))]

  def write(i, phi):
    start, stop = store.chunk_bounds(i)
    store.write_chunk(i, np.asarray(phi)[:stop - start])
    done[0] += stop - start
    report("featurize", done[0], n)

  pending = None
  kw = {} if wrt is None else {"wrt": wrt}  # wrt=None: the call it was before selections
  for i in store.missing_chunks():
    phi = featurize(fn, params, rows_of(i), proj_config, chunk_size=chunk_size, **kw)
    if pending is not None:
      write(*pending)
    # Wait for chunk i before dispatching chunk i + 1: two chunks' gradients in
    # flight at once would double the peak memory.
    pending = (i, jax.block_until_ready(phi))
  if pending is not None:
    write(*pending)
