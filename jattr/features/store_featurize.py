"""Featurize into an on-disk ``FeatureStore``, resumably, one row chunk at a time.

For every row chunk c of the store that is not yet complete,

    Φ[c] = [Pᵀ ∇_θ f(θ; z_i)]_{i ∈ c}          (``jattr.features.featurize``)

is computed and written (``FeatureStore.write_chunk``), so a run killed at any point
resumes where it stopped and never recomputes a finished chunk. Rows are independent
(a row depends only on its own example, θ and the projection seed), so the
features of a resumed run equal those of an uninterrupted one exactly.

A store's ``config`` says what its rows are. ``feature_config`` builds the standard
one: the model (``model_hash`` of θ), the output function (name and kwargs), the
draws (K, timesteps mode, seed), the projection (``ProjectionConfig`` fields) and
the examples (dataset, N, hash of their indices or contents). Train and query stores
can be scored against each other only if they agree on ``COMPATIBLE_KEYS``
(``check_compatible``).
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import numpy as np
from tqdm.auto import tqdm

from jattr.features.projection import ProjectionConfig, featurize
from jattr.grads.per_example import ExampleFn
from jattr.io.feature_store import FeatureStore, config_diff, describe_diff
from jattr.types import Params

COMPATIBLE_KEYS = ("model", "measurement", "draws", "projection")
"""Config sections a query store must share with the train store it is scored against."""


def model_hash(params: Params) -> str:
  """sha256 of a params pytree: every leaf's path, dtype, shape and bytes, in tree order.

  Equal for equal parameters whatever device they live on; any change to one value,
  shape, dtype or the tree's structure changes it.

  Returns:
    The hex digest (64 characters).
  """
  h = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if not leaves:
    raise ValueError("params must contain at least one array, got an empty pytree")
  h.update(str(treedef).encode())
  for path, leaf in leaves:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def array_hash(x) -> str:
  """sha256 of an array's dtype, shape and bytes (for indices or query images)."""
  a = np.ascontiguousarray(np.asarray(x))
  h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
  h.update(a.tobytes())
  return h.hexdigest()


def projection_spec(config: ProjectionConfig) -> dict:
  """The JSON form of a ``ProjectionConfig`` (dim, kind, seed, block_size)."""
  return dataclasses.asdict(config)


def feature_config(*, params_hash: str, measurement: str, num_draws: int, timesteps: str,
                   draw_seed: int, projection: ProjectionConfig, dataset: str,
                   num_examples: int, examples_hash: str,
                   measurement_kwargs: dict | None = None, model_info: dict | None = None,
                   dataset_info: dict | None = None) -> dict:
  """The standard configuration of a feature store.

  Args:
    params_hash: ``model_hash(params)``.
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

  Returns:
    ``{"model", "measurement", "draws", "projection", "dataset"}`` sections.
  """
  return {
      "model": {"params_sha256": params_hash, **(model_info or {})},
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


def _check_store(store: FeatureStore, params, num: int, proj_config: ProjectionConfig):
  if store.num_rows != num:
    raise ValueError(f"examples must have N = store.num_rows = {store.num_rows} rows, got {num}")
  if store.dim != proj_config.dim:
    raise ValueError(f"proj_config.dim must equal store.dim = {store.dim}, got {proj_config.dim}")
  stored = store.config.get("projection")
  if stored is not None and stored != projection_spec(proj_config):
    raise ValueError(f"proj_config {projection_spec(proj_config)} differs from the store's "
                     f"projection {stored}; differing keys: "
                     f"{config_diff(stored, projection_spec(proj_config))}")
  stored_hash = (store.config.get("model") or {}).get("params_sha256")
  if stored_hash is not None and stored_hash != model_hash(params):
    raise ValueError(f"params hash {model_hash(params)[:12]}… differs from the store's "
                     f"model.params_sha256 {stored_hash[:12]}…: these are not the parameters "
                     f"the store was made for")


def store_featurize(fn: ExampleFn, params: Params, examples, proj_config: ProjectionConfig,
                    store: FeatureStore, *, chunk_size: int | None = None,
                    progress: bool = True) -> FeatureStore:
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
    progress: show a tqdm bar (rows).

  Returns:
    ``store``, now complete.
  """
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree_util.tree_leaves(examples)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"examples must be a non-empty pytree of arrays sharing a leading axis N, "
                     f"got leading sizes {sorted(map(str, sizes))}")
  n = sizes.pop()
  _check_store(store, params, n, proj_config)
  rows = store.chunk_rows
  if chunk_size is not None and not 1 <= int(chunk_size) <= rows:
    raise ValueError(f"chunk_size must be in [1, store.chunk_rows={rows}] or None, got "
                     f"{chunk_size}")
  chunk_size = rows if chunk_size is None else int(chunk_size)

  def rows_of(i):
    start, stop = store.chunk_bounds(i)
    idx = np.minimum(np.arange(start, start + rows), stop - 1)
    return jax.tree_util.tree_map(lambda x: x[idx], examples)

  done_rows = sum(b - a for a, b in map(store.chunk_bounds, store.completed_chunks()))
  bar = tqdm(total=n, initial=done_rows, unit="ex", desc="featurize", disable=not progress)

  def write(i, phi):
    start, stop = store.chunk_bounds(i)
    store.write_chunk(i, np.asarray(phi)[:stop - start])
    bar.update(stop - start)

  pending = None
  try:
    for i in store.missing_chunks():
      phi = featurize(fn, params, rows_of(i), proj_config, chunk_size=chunk_size)
      if pending is not None:
        write(*pending)
      # Wait for chunk i before dispatching chunk i + 1: two chunks' gradients in
      # flight at once would double the peak memory.
      pending = (i, jax.block_until_ready(phi))
    if pending is not None:
      write(*pending)
  finally:
    bar.close()
  return store
