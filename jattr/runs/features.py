"""Featurizing a run into feature stores, and scores from two stores (``jattr featurize``,
``jattr score``).

    jattr featurize --run DIR --out STORE [--queries train|test|samples] [--like STORE]
                    [--measurement square_norm] [--num-draws 10] [--timesteps uniform]
                    [--draw-seed 0] [--proj-dim 4096] [--proj-kind rademacher|gaussian|sparse]
                    [--proj-seed 0] [--proj-nonzeros 2] [--grad-dtype bfloat16] [--wrt REGEX]
                    [--chunk-size C] [--store-chunk-rows R] [--store-dtype float32|bfloat16]
                    [--process-index p --process-count P [--wait S]]
    jattr score     --train-store A --query-store B --method trak|grad_dot|grad_cosine
                    [--damping λ | --relative-damping c] --out scores.npz

``featurize`` writes φ_i = Pᵀ ∇_θ f(θ; x_i) of the run's EMA parameters into a
``jattr.io.feature_store.FeatureStore`` (resumable: rerunning the same command after
a crash computes only the missing chunks). ``--queries`` picks the examples: the
run's training set (default), held-out real images (``test``: the dataset's test
split if it has one, else the images of the train split the run did not train on),
or the generated ``samples.npz`` of ``jattr sample``. ``--like TRAIN_STORE`` takes the
measurement, draws and projection from a train store, so query features are made
exactly as the train features were (a flag that contradicts it raises).
``--wrt REGEX`` takes the gradient with respect to the parameters whose paths match
(``jattr.wrt``; the others held fixed), recorded in the store as ``model.wrt``;
``--like`` takes it from the train store too. ``--grad-dtype bfloat16`` computes the
gradients with the model in bf16 (projected in float32; recorded as
``projection.grad_dtype``, so ``--like`` repeats it and such stores are scored only
against each other); ``--store-dtype bfloat16`` keeps the features as bf16 on disk
(half the space; read back as float32).

Many hosts fill one store (on a file system they share) when each runs the same
command with its own ``--process-index p --process-count P``, at once or one after
another; each computes only the missing chunks of its group, and the last to finish
checks the store and folds the hosts' records into it (``jattr.runs.store_featurize``,
docs/devices.md). ``--wait S`` makes a host wait for the others' chunks (S seconds
without a new one) and fail naming the missing ones; the default 0 returns at once.

``score`` reads a train store Φ [N, k] and a query store Φ_q [Q, k], refuses them
unless they share the model, measurement, draws and projection
(``jattr.io.feature_store.check_compatible``), and writes τ [Q, N] (``tau``) with both
stores' configurations to an .npz:

    trak         τ = Φ_q (ΦᵀΦ + λI)⁻¹ Φᵀ      (jattr.methods.trak_fit / trak_score)
    grad_dot     τ = Φ_q Φᵀ
    grad_cosine  τ[q, i] = cos(φ_q, φ_i)

τ is assembled tile by tile into a host array (``jattr.methods.tiled_scores_into``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import re
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jattr.data import load_dataset, resize, take
from jattr.diffusion import conditioning, fixed_draws
from jattr.diffusion.latent import encode_images
from jattr.diffusion.measurements import MEASUREMENTS, measurement_fn
from jattr.features.projection import GRAD_DTYPES, PROJECTION_KINDS, ProjectionConfig
from jattr.io import atomic, guard
from jattr.io.feature_store import (ARRAY, DTYPE, DTYPES, FORMAT, SIDECAR, VERSION,
                                    FeatureStore, check_compatible, feature_config)
from jattr.io.hashing import array_hash, model_hash
from jattr.methods import grad_cosine, grad_dot, trak_fit, trak_score
from jattr.models import num_params
from jattr.models.unet import config_record
from jattr.progress import Progress
from jattr.runs.config import QUERIES
from jattr.runs.run import latent_space, load_run, training_data
from jattr.runs.stores import selection_record, store_featurize
from jattr.wrt import split

SCORE_METHODS = ("trak", "grad_dot", "grad_cosine")
"""What ``score_stores`` computes from two feature stores."""
TEST_SPLIT_DATASETS = ("fashion_mnist", "cifar2")
"""Datasets with a test split (``load_dataset(split="test")``); the others' held-out
queries are the train-split images outside the run's training subset."""
SPEC_DEFAULTS = {"measurement": "square_norm", "num_draws": 10, "timesteps": "uniform",
                 "draw_seed": 0, "proj_dim": 4096, "proj_kind": "rademacher", "proj_seed": 0,
                 "proj_nonzeros": 2, "block_size": 1024, "time": None, "wrt": None,
                 "grad_dtype": None}
"""The featurize options ``like`` can fill, with their defaults when there is no ``like``."""
GRAD_CHUNK_BYTES = 1 << 30
"""Default budget for one chunk of per-example gradients (chunk_size × P float32)."""


SCORE_KEYS = ("tau", "method", "train_config", "query_config")
"""Arrays every ``write_scores`` file holds (an existing --out without them is refused)."""


# ---------------------------------------------------------------------------------
# The sidecar of a feature store, checked before it is used
# ---------------------------------------------------------------------------------


# The schema of the store.json that `jattr featurize` writes (``read_store`` checks a
# sidecar against it with ``jattr.io.guard.from_dict``: keys, types, consistency).


@dataclasses.dataclass(frozen=True)
class StoreModel:
  params_sha256: str
  unet: dict | None = None
  schedule: str | None = None
  num_timesteps: int | None = None
  parameterization: str | None = None
  wrt: dict | None = None  # jattr.runs.selection_record; absent: all parameters


@dataclasses.dataclass(frozen=True)
class StoreMeasurement:
  name: str
  kwargs: dict

  def __post_init__(self):
    guard.one_of(self, "name", MEASUREMENTS)


@dataclasses.dataclass(frozen=True)
class StoreDraws:
  num_draws: int
  timesteps: Literal["uniform", "random"]
  seed: int

  def __post_init__(self):
    guard.at_least(self, "num_draws", 1)


@dataclasses.dataclass(frozen=True)
class StoreProjection:
  dim: int
  kind: str
  seed: int
  block_size: int
  nonzeros: int | None = None  # the sparse kind's s; absent for the dense kinds
  grad_dtype: str | None = None  # "bfloat16": bf16 gradients; absent: the model's dtype

  def __post_init__(self):
    guard.one_of(self, "kind", PROJECTION_KINDS)
    if self.grad_dtype is not None:
      guard.one_of(self, "grad_dtype", GRAD_DTYPES)
    guard.at_least(self, "dim", 1)
    guard.at_least(self, "block_size", 1)
    if self.kind == "sparse":
      guard.at_least(self, "nonzeros", 1)


@dataclasses.dataclass(frozen=True)
class StoreDataset:
  name: str
  num: int
  examples_sha256: str
  split: str | None = None
  file: str | None = None
  images_sha256: str | None = None
  labels_sha256: str | None = None  # the conditions of a conditional run's examples


@dataclasses.dataclass(frozen=True)
class StoreConfig:
  model: StoreModel
  measurement: StoreMeasurement
  draws: StoreDraws
  projection: StoreProjection
  dataset: StoreDataset


@dataclasses.dataclass(frozen=True)
class StoreSidecar:
  format: str
  version: int
  num_rows: int
  dim: int
  chunk_rows: int
  dtype: str
  config: StoreConfig
  complete_chunks: tuple[int, ...]
  chunk_sha256: dict | None = None

  def __post_init__(self):
    for name, value in (("format", FORMAT), ("version", VERSION)):
      if getattr(self, name) != value:
        raise guard.ConfigError(name, f" = {guard.show(getattr(self, name))}: expected "
                                      f"{guard.show(value)}")
    guard.one_of(self, "dtype", DTYPES)
    for name in ("num_rows", "dim", "chunk_rows"):
      guard.at_least(self, name, 1)
    chunks = -(-self.num_rows // self.chunk_rows)
    done = list(self.complete_chunks)
    if len(set(done)) != len(done) or any(not 0 <= c < chunks for c in done):
      raise guard.ConfigError("complete_chunks", f" = {guard.show(done)}: expected distinct "
                                                 f"chunk indices in [0, {chunks})")
    for name, value in (("config.projection.dim", self.config.projection.dim),
                        ("config.dataset.num", self.config.dataset.num)):
      if value != (self.dim if name.endswith("dim") else self.num_rows):
        raise guard.ConfigError(name, f" = {value}: expected "
                                      f"{'dim' if name.endswith('dim') else 'num_rows'} = "
                                      f"{self.dim if name.endswith('dim') else self.num_rows}")
    sums = self.chunk_sha256 or {}
    for k, v in sums.items():
      if k not in {str(c) for c in done} or not (isinstance(v, str) and len(v) == 64):
        raise guard.ConfigError(f"chunk_sha256.{k}", f" = {guard.show(v)}: expected the "
                                                     f"sha256 of a complete chunk")


def read_store(path: str | os.PathLike, flag: str = "store") -> FeatureStore:
  """``FeatureStore.load`` of a store ``jattr featurize`` made, its sidecar checked first.

  Every key of ``store.json`` (layout, configuration, completed chunks) is checked
  for presence, type and consistency, so a damaged or hand-edited sidecar is one
  error naming the file and the key, never a KeyError later.

  Raises:
    FileNotFoundError: ``path`` holds no ``store.json``.
    ValueError: the sidecar is not valid JSON or not a jattr feature store's.
  """
  path = pathlib.Path(path)
  sidecar = path / SIDECAR
  if not sidecar.is_file():
    raise FileNotFoundError(errno.ENOENT, f"{flag}: no feature store here (no {SIDECAR}; "
                                          f"stores are made by `jattr featurize`)", str(path))
  doc = guard.read_json(sidecar, "feature store sidecar")
  try:
    guard.from_dict(StoreSidecar, doc)
  except guard.ConfigError as e:
    raise ValueError(f"{sidecar} is damaged or not a jattr feature store sidecar: {e}") from None
  return FeatureStore.load(path)


def _spec_from_store(config: dict) -> dict:
  """The featurize flags a store's config implies (for --like)."""
  m, d, p = config["measurement"], config["draws"], config["projection"]
  selection = (config.get("model") or {}).get("wrt")
  return {"measurement": m["name"], "time": m["kwargs"].get("time"),
          "num_draws": d["num_draws"], "timesteps": d["timesteps"], "draw_seed": d["seed"],
          "proj_dim": p["dim"], "proj_kind": p["kind"], "proj_seed": p["seed"],
          "block_size": p["block_size"],
          "proj_nonzeros": p.get("nonzeros", SPEC_DEFAULTS["proj_nonzeros"]),
          "wrt": None if selection is None else selection.get("selector"),
          "grad_dtype": p.get("grad_dtype")}


def resolve_spec(given: dict, like_config: dict | None = None) -> dict:
  """Fills the measurement/draws/projection flags from ``--like`` or the defaults.

  Args:
    given: flag name -> value, ``None`` where the flag was not given.
    like_config: the config of the ``--like`` store, or None.

  Returns:
    flag name -> value for every key of the defaults.

  Raises:
    ValueError: if a given flag contradicts the ``--like`` store.
  """
  if like_config is None:
    return {k: given.get(k) if given.get(k) is not None else v
            for k, v in SPEC_DEFAULTS.items()}
  like = _spec_from_store(like_config)
  clash = {k: (given[k], like[k]) for k in like
           if given.get(k) is not None and given[k] != like[k]}
  if clash:
    raise ValueError("flags contradict the --like store (queries must be featurized exactly "
                     "as the train set): " + "; ".join(
                         f"--{k.replace('_', '-')} {g!r} but the store has {s!r}"
                         for k, (g, s) in clash.items()))
  return like


def query_examples(cfg, run_dir: pathlib.Path, queries: str) -> tuple[np.ndarray, dict, str]:
  """The images to featurize, their dataset description and their hash.

  Returns:
    ``(x [N, H, W, C] float32, dataset_info, examples_hash)`` where ``dataset_info``
    holds ``name`` and ``split`` (and ``file`` for samples). For a class-conditional
    run ``x`` is the pair ``(images, labels)``: held-out images with their labels,
    samples with the classes they were drawn for (and ``dataset_info`` records the
    labels' sha256). For a latent run the images are latents: the training and
    held-out images encoded by the run's autoencoder, the samples' latents ``z``
    (the hashes stay those of the pixel images, which define the examples).
  """
  x, info, digest = _query_images(cfg, run_dir, queries)
  if cfg.latent is not None and queries != "samples":  # samples: z, read as such
    images, labels = conditioning.split(x)
    images = encode_images(latent_space(cfg, run_dir), images)
    x = conditioning.join(images, labels)
  if not cfg.conditional:
    return x, info, digest
  x, labels = x
  return (x, labels), {**info, "labels_sha256": array_hash(labels)}, digest


def _query_images(cfg, run_dir: pathlib.Path, queries: str):

  if queries == "train":
    ds, idx = training_data(cfg)  # pixels; a latent run's are encoded by query_examples
    x = np.asarray(ds.x)
    info = {"name": cfg.dataset, "split": "train", "images_sha256": array_hash(x)}
    return _labelled(cfg, x, ds.y), info, array_hash(idx)
  if queries == "samples":
    path = run_dir / "samples.npz"
    if not path.exists():
      raise FileNotFoundError(f"{path} not found; run `jattr sample --run {run_dir}` first")
    try:
      with np.load(path, allow_pickle=False) as z:
        x = np.asarray(z["z" if cfg.latent is not None else "x"], np.float32)
        y = np.asarray(z["y"]) if "y" in z.files else None
    except Exception as e:  # a damaged or foreign file: one message naming it
      raise ValueError(f"{path} is not a readable samples file ({type(e).__name__}: {e}); "
                       f"run `jattr sample --run {run_dir}` again") from None
    if x.ndim != 4 or x.shape[1:] != tuple(cfg.model.image_shape):
      raise ValueError(f"{path}: x has shape {x.shape}; expected [B, *{cfg.model.image_shape}]")
    if x.shape[0] == 0:
      raise ValueError(f"{path} holds no samples; run `jattr sample --run {run_dir}` again")
    if cfg.conditional and (y is None or y.shape != x.shape[:1]):
      raise ValueError(f"{path} has no class label (y) per sample but the run is conditional; "
                       f"run `jattr sample --run {run_dir}` again")
    return (_labelled(cfg, x, y), {"name": "samples", "split": "generated", "file": str(path)},
            array_hash(x))
  if queries != "test":
    raise ValueError(f"queries must be one of {QUERIES}, got {queries!r}")
  if cfg.dataset in TEST_SPLIT_DATASETS:
    ds = load_dataset(cfg.dataset, cfg.data_dir, split="test")
    idx, split = np.arange(len(ds)), "test"
  else:
    _, train_idx = training_data(cfg)
    full = load_dataset(cfg.dataset, cfg.data_dir, split="train")
    idx = np.setdiff1d(np.arange(len(full)), train_idx)
    if idx.size == 0:
      raise ValueError(f"dataset {cfg.dataset!r} has no test split and the run trains on all "
                       f"{len(full)} images, so there are no held-out queries; train with "
                       f"--num-train or use --queries samples")
    ds, split = take(full, idx), "train_heldout"
  if cfg.image_size is not None:
    ds = resize(ds, cfg.image_size)
  x = np.asarray(ds.x)
  return (_labelled(cfg, x, ds.y), {"name": cfg.dataset, "split": split,
                                    "images_sha256": array_hash(x)}, array_hash(idx))


def _labelled(cfg, x, labels):
  """``(x, labels)`` for a conditional run (labels as int32), x otherwise."""
  return (x, np.asarray(labels, np.int32)) if cfg.conditional else x


def _check_spec(s: dict) -> None:
  """The measurement, draws and projection of a featurize call, before anything runs."""
  if s["measurement"] not in MEASUREMENTS:
    raise ValueError(f"measurement = {s['measurement']!r}: expected one of "
                     f"{', '.join(MEASUREMENTS)}{guard.suggest(s['measurement'], MEASUREMENTS)}")
  if s["timesteps"] not in ("uniform", "random"):
    raise ValueError(f"timesteps = {s['timesteps']!r}: expected 'uniform' or 'random'")
  if s["proj_kind"] not in PROJECTION_KINDS:
    raise ValueError(f"proj_kind = {s['proj_kind']!r}: expected one of {PROJECTION_KINDS}")
  for name in ("num_draws", "proj_dim", "block_size", "proj_nonzeros"):
    guard.check_count(name, s[name])
  if s["proj_kind"] == "sparse" and s["proj_dim"] % s["proj_nonzeros"]:
    raise ValueError(f"proj_dim = {s['proj_dim']}: expected a multiple of proj_nonzeros = "
                     f"{s['proj_nonzeros']} (the sparse projection has one non-zero in each "
                     "of proj_nonzeros column blocks)")
  for name in ("draw_seed", "proj_seed"):
    guard.check_count(name, s[name], low=-2**63)
  if s["grad_dtype"] is not None and s["grad_dtype"] not in GRAD_DTYPES:
    raise ValueError(f"grad_dtype = {s['grad_dtype']!r}: expected None (the model's dtype) or "
                     f"one of {GRAD_DTYPES}")
  guard.check_count("time", s["time"], optional=True, low=0)
  if s["wrt"] is not None:
    if s["wrt"] in ("<callable>", "<mask>"):
      raise ValueError(f"wrt = {s['wrt']!r}: the --like store was featurized with a Python "
                       "selector, which a command cannot repeat; featurize the queries with "
                       "jattr.runs.store_featurize and the same selector")
    if not isinstance(s["wrt"], str):
      raise ValueError(f"wrt = {s['wrt']!r}: expected a regular expression on parameter paths "
                       "(use jattr.runs.store_featurize for a predicate or a mask)")
    try:
      re.compile(s["wrt"])
    except re.error as e:
      raise ValueError(f"wrt = {s['wrt']!r} is not a regular expression: {e}") from None
  if (s["time"] is None) == (s["measurement"] == "loss_at_time"):
    raise ValueError("--time is needed by --measurement loss_at_time and by no other "
                     f"measurement (got measurement {s['measurement']!r}, time {s['time']!r})")


def _auto_chunk_size(params, store_chunk_rows: int) -> int:
  return int(max(1, min(store_chunk_rows, GRAD_CHUNK_BYTES // (4 * num_params(params)))))


def featurize_run(run_dir, out, *, queries: str = "train", like: str | None = None,
                  chunk_size: int | None = None, store_chunk_rows: int = 256,
                  store_dtype: str = DTYPE, progress: Progress | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  wait_s: float | None = None, **spec):
  """Featurizes a run's examples into the store ``out`` (what ``jattr featurize`` does).

  Args:
    run_dir: a trained run directory.
    out: the store directory (created, or resumed if it holds the same config).
    queries: ``"train"``, ``"test"`` or ``"samples"``.
    like: a train store whose measurement, draws and projection to reuse.
    chunk_size: per-example gradients at once (None: fit 1 GiB).
    store_chunk_rows: rows per store chunk.
    store_dtype: what the store keeps, ``"float32"`` or ``"bfloat16"``
      (``FeatureStore.open``; a store is resumed only with its own dtype).
    progress: ``jattr.progress`` callback.
    process_index, process_count, wait_s: this process's share of the store when
      many processes (hosts) featurize it together (``store_featurize``; ``None``:
      from ``jax.process_index()`` / ``jax.process_count()``, 1 process outside a
      ``jax.distributed`` job).
    **spec: ``measurement``, ``time``, ``num_draws``, ``timesteps``, ``draw_seed``,
      ``proj_dim``, ``proj_kind``, ``proj_seed``, ``proj_nonzeros``, ``block_size``,
      ``wrt`` (a regex on parameter paths, ``jattr.wrt``), ``grad_dtype`` (``None`` or
      ``"bfloat16"``, ``ProjectionConfig.grad_dtype``) (None or absent: from ``like``
      or the defaults).

  Returns:
    The complete ``FeatureStore`` (with several processes and ``wait_s`` 0: its
    share complete).
  """

  unknown = set(spec) - set(SPEC_DEFAULTS)
  if unknown:
    raise TypeError(f"unknown featurize options {sorted(unknown)}; expected some of "
                    f"{sorted(SPEC_DEFAULTS)}")
  if queries not in QUERIES:
    raise ValueError(f"queries must be one of {QUERIES}, got {queries!r}")
  guard.check_count("chunk_size", chunk_size, optional=True)
  guard.check_count("store_chunk_rows", store_chunk_rows)
  if store_dtype not in DTYPES:
    raise ValueError(f"store_dtype must be one of {DTYPES}, got {store_dtype!r}")
  like_config = read_store(like, "--like").config if like else None
  s = resolve_spec(spec, like_config)
  _check_spec(s)
  # A features/ array without a sidecar is what a crash during creation leaves.
  guard.check_output_dir(out, "--out", kind="feature store",
                         is_own=lambda p: (p / SIDECAR).is_file() or guard.listing(p) == [ARRAY])
  if (pathlib.Path(out) / SIDECAR).is_file():
    read_store(out, "--out")  # a store to resume: its sidecar must be sound
  run_dir = pathlib.Path(run_dir)
  cfg, apply_fn, params = load_run(run_dir)
  params_hash = model_hash(params)
  if like_config is not None and like_config["model"]["params_sha256"] != params_hash:
    raise ValueError(f"--like store {like} was made with other parameters (params_sha256 "
                     f"{like_config['model']['params_sha256'][:12]}…) than run {run_dir} "
                     f"({params_hash[:12]}…)")
  x, dataset_info, examples_hash = query_examples(cfg, run_dir, queries)
  proj = ProjectionConfig(dim=s["proj_dim"], kind=s["proj_kind"], seed=s["proj_seed"],
                          block_size=s["block_size"], nonzeros=s["proj_nonzeros"],
                          grad_dtype=s["grad_dtype"])
  draws = fixed_draws(jax.random.key(s["draw_seed"]), s["num_draws"], cfg.model.image_shape,
                      cfg.num_timesteps, s["timesteps"])
  kwargs = {} if s["time"] is None else {"time": s["time"]}
  fn = measurement_fn(s["measurement"], apply_fn, cfg.noise_schedule, draws,
                      parameterization=cfg.train.parameterization, **kwargs)
  model_info = {"unet": config_record(cfg.model), "schedule": cfg.schedule,
                "num_timesteps": cfg.num_timesteps,
                "parameterization": cfg.train.parameterization}
  selection = selection_record(params, s["wrt"])  # raises if it selects nothing
  config = feature_config(
      params_hash=params_hash, measurement=s["measurement"], measurement_kwargs=kwargs,
      num_draws=s["num_draws"], timesteps=s["timesteps"], draw_seed=s["draw_seed"],
      projection=proj, dataset=dataset_info.pop("name"), num_examples=conditioning.count(x),
      examples_hash=examples_hash, model_info=model_info, dataset_info=dataset_info,
      selection=selection)
  n = conditioning.count(x)
  store = FeatureStore.open(out, config, n, proj.dim, min(store_chunk_rows, n),
                            dtype=store_dtype)
  if chunk_size is None:
    sub = params if s["wrt"] is None else split(params, s["wrt"])
    chunk_size = _auto_chunk_size(sub, store.chunk_rows)
  return store_featurize(fn, params, x, proj, store, chunk_size=min(chunk_size, store.chunk_rows),
                         progress=progress, wrt=s["wrt"], process_index=process_index,
                         process_count=process_count, wait_s=wait_s)


# ---------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------


def _read_complete(path, flag: str = "store"):

  store = read_store(path, flag)
  if not store.complete:
    raise ValueError(f"feature store {path} is incomplete ({len(store.missing_chunks())} of "
                     f"{store.num_chunks} chunks missing); rerun its `jattr featurize` command")
  return store


def score_stores(train_store, query_store, method: str = "trak", *,
                 damping: float | None = None, relative_damping: float | None = None,
                 tile: tuple[int, int] = (1024, 8192)) -> tuple[np.ndarray, dict]:
  """τ [Q, N] from two complete, compatible feature stores (what ``jattr score`` does).

  Args:
    train_store, query_store: store directories.
    method: ``"trak"``, ``"grad_dot"`` or ``"grad_cosine"``.
    damping: TRAK's explicit λ (None: the scale-free default).
    relative_damping: c of the default λ = c·tr(ΦᵀΦ)/k; None: the effective-dimension
      rule (``jattr.methods.trak.default_damping``).
    tile: (tile_q, tile_n) of the tiled assembly.

  Returns:
    ``(tau float32 [Q, N], info)`` with ``info`` holding the method, λ used and both
    configurations.
  """

  if method not in SCORE_METHODS:
    raise ValueError(f"method must be one of {SCORE_METHODS}, got {method!r}")
  train = _read_complete(train_store, "--train-store")
  query = _read_complete(query_store, "--query-store")
  check_compatible(train.config, query.config)
  phi, phi_q = train.read(), query.read()
  out = np.empty((query.num_rows, train.num_rows), np.float32)
  lam = None
  if method == "trak":
    state = trak_fit(jnp.asarray(phi), damping=damping, relative_damping=relative_damping)
    trak_score(state, jnp.asarray(phi_q), tile=tile, out=out)
    lam = float(state.damping)
  elif method == "grad_dot":
    grad_dot(phi_q, phi, tile=tile, out=out)
  else:
    grad_cosine(phi_q, phi, tile=tile, out=out)
  info = {"method": method, "damping": lam, "relative_damping": relative_damping,
          "train_store": str(train.path), "query_store": str(query.path),
          "train_config": train.config, "query_config": query.config}
  return out, info




def write_scores(path: str | os.PathLike, tau: np.ndarray, info: dict) -> pathlib.Path:
  """Writes ``score_stores``' result to an .npz atomically (``tau`` [Q, N] + metadata).

  Raises:
    ValueError: ``path`` is a directory or an existing file that is not a score file
      (``jattr.io.guard.check_output_file``; ``jattr score`` checks it before scoring).
  """
  out = guard.check_output_file(path, "--out", kind="score", keys=SCORE_KEYS)
  out.parent.mkdir(parents=True, exist_ok=True)
  return atomic.write_npz(
      out, tau=tau, method=info["method"],
      damping=np.nan if info["damping"] is None else info["damping"],
      relative_damping=info["relative_damping"], train_store=info["train_store"],
      query_store=info["query_store"], train_config=json.dumps(info["train_config"]),
      query_config=json.dumps(info["query_config"]))
