"""Featurizing a run into feature stores, and scores from two stores (``jattr featurize``,
``jattr score``).

    jattr featurize --run DIR --out STORE [--queries train|test|samples] [--like STORE]
                    [--measurement square_norm] [--num-draws 10] [--timesteps uniform]
                    [--draw-seed 0] [--proj-dim 4096] [--proj-kind rademacher]
                    [--proj-seed 0] [--chunk-size C] [--store-chunk-rows R]
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
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jattr.data import load_dataset, resize, take
from jattr.diffusion import fixed_draws
from jattr.diffusion.measurements import measurement_fn
from jattr.features.projection import ProjectionConfig
from jattr.io import atomic
from jattr.io.feature_store import FeatureStore, check_compatible, feature_config
from jattr.io.hashing import array_hash, model_hash
from jattr.methods import grad_cosine, grad_dot, trak_fit, trak_score
from jattr.models import num_params
from jattr.progress import Progress
from jattr.runs.config import QUERIES
from jattr.runs.run import load_run, training_data
from jattr.runs.stores import store_featurize

SCORE_METHODS = ("trak", "grad_dot", "grad_cosine")
"""What ``score_stores`` computes from two feature stores."""
TEST_SPLIT_DATASETS = ("fashion_mnist", "cifar2")
"""Datasets with a test split (``load_dataset(split="test")``); the others' held-out
queries are the train-split images outside the run's training subset."""
SPEC_DEFAULTS = {"measurement": "square_norm", "num_draws": 10, "timesteps": "uniform",
                 "draw_seed": 0, "proj_dim": 4096, "proj_kind": "rademacher", "proj_seed": 0,
                 "block_size": 1024, "time": None}
"""The featurize options ``like`` can fill, with their defaults when there is no ``like``."""
GRAD_CHUNK_BYTES = 1 << 30
"""Default budget for one chunk of per-example gradients (chunk_size × P float32)."""


def _spec_from_store(config: dict) -> dict:
  """The featurize flags a store's config implies (for --like)."""
  m, d, p = config["measurement"], config["draws"], config["projection"]
  return {"measurement": m["name"], "time": m["kwargs"].get("time"),
          "num_draws": d["num_draws"], "timesteps": d["timesteps"], "draw_seed": d["seed"],
          "proj_dim": p["dim"], "proj_kind": p["kind"], "proj_seed": p["seed"],
          "block_size": p["block_size"]}


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
    holds ``name`` and ``split`` (and ``file`` for samples).
  """

  if queries == "train":
    ds, idx = training_data(cfg)
    return np.asarray(ds.x), {"name": cfg.dataset, "split": "train"}, array_hash(idx)
  if queries == "samples":
    path = run_dir / "samples.npz"
    if not path.exists():
      raise FileNotFoundError(f"{path} not found; run `jattr sample --run {run_dir}` first")
    with np.load(path) as z:
      x = np.asarray(z["x"], np.float32)
    if x.shape[1:] != tuple(cfg.model.image_shape):
      raise ValueError(f"{path}: x has shape {x.shape}; expected [B, *{cfg.model.image_shape}]")
    return x, {"name": "samples", "split": "generated", "file": str(path)}, array_hash(x)
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
  return np.asarray(ds.x), {"name": cfg.dataset, "split": split}, array_hash(idx)


def _auto_chunk_size(params, store_chunk_rows: int) -> int:
  return int(max(1, min(store_chunk_rows, GRAD_CHUNK_BYTES // (4 * num_params(params)))))


def featurize_run(run_dir, out, *, queries: str = "train", like: str | None = None,
                  chunk_size: int | None = None, store_chunk_rows: int = 256,
                  progress: Progress | None = None, **spec):
  """Featurizes a run's examples into the store ``out`` (what ``jattr featurize`` does).

  Args:
    run_dir: a trained run directory.
    out: the store directory (created, or resumed if it holds the same config).
    queries: ``"train"``, ``"test"`` or ``"samples"``.
    like: a train store whose measurement, draws and projection to reuse.
    chunk_size: per-example gradients at once (None: fit 1 GiB).
    store_chunk_rows: rows per store chunk.
    progress: ``jattr.progress`` callback.
    **spec: ``measurement``, ``time``, ``num_draws``, ``timesteps``, ``draw_seed``,
      ``proj_dim``, ``proj_kind``, ``proj_seed``, ``block_size`` (None or absent:
      from ``like`` or the defaults).

  Returns:
    The complete ``FeatureStore``.
  """

  unknown = set(spec) - set(SPEC_DEFAULTS)
  if unknown:
    raise TypeError(f"unknown featurize options {sorted(unknown)}; expected some of "
                    f"{sorted(SPEC_DEFAULTS)}")
  if queries not in QUERIES:
    raise ValueError(f"queries must be one of {QUERIES}, got {queries!r}")
  like_config = FeatureStore.load(like).config if like else None
  s = resolve_spec(spec, like_config)
  run_dir = pathlib.Path(run_dir)
  cfg, apply_fn, params = load_run(run_dir)
  params_hash = model_hash(params)
  if like_config is not None and like_config["model"]["params_sha256"] != params_hash:
    raise ValueError(f"--like store {like} was made with other parameters (params_sha256 "
                     f"{like_config['model']['params_sha256'][:12]}…) than run {run_dir} "
                     f"({params_hash[:12]}…)")
  x, dataset_info, examples_hash = query_examples(cfg, run_dir, queries)
  proj = ProjectionConfig(dim=s["proj_dim"], kind=s["proj_kind"], seed=s["proj_seed"],
                          block_size=s["block_size"])
  draws = fixed_draws(jax.random.key(s["draw_seed"]), s["num_draws"], cfg.model.image_shape,
                      cfg.num_timesteps, s["timesteps"])
  kwargs = {} if s["time"] is None else {"time": s["time"]}
  fn = measurement_fn(s["measurement"], apply_fn, cfg.noise_schedule, draws,
                      parameterization=cfg.train.parameterization, **kwargs)
  model_info = {"unet": dataclasses.asdict(cfg.model), "schedule": cfg.schedule,
                "num_timesteps": cfg.num_timesteps,
                "parameterization": cfg.train.parameterization}
  config = feature_config(
      params_hash=params_hash, measurement=s["measurement"], measurement_kwargs=kwargs,
      num_draws=s["num_draws"], timesteps=s["timesteps"], draw_seed=s["draw_seed"],
      projection=proj, dataset=dataset_info.pop("name"), num_examples=len(x),
      examples_hash=examples_hash, model_info=model_info, dataset_info=dataset_info)
  store = FeatureStore.open(out, config, len(x), proj.dim, min(store_chunk_rows, len(x)))
  if chunk_size is None:
    chunk_size = _auto_chunk_size(params, store.chunk_rows)
  return store_featurize(fn, params, x, proj, store, chunk_size=min(chunk_size, store.chunk_rows),
                         progress=progress)


# ---------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------


def _read_complete(path):

  store = FeatureStore.load(path)
  if not store.complete:
    raise ValueError(f"feature store {path} is incomplete ({len(store.missing_chunks())} of "
                     f"{store.num_chunks} chunks missing); rerun its `jattr featurize` command")
  return store


def score_stores(train_store, query_store, method: str = "trak", *,
                 damping: float | None = None, relative_damping: float = 1e-3,
                 tile: tuple[int, int] = (1024, 8192)) -> tuple[np.ndarray, dict]:
  """τ [Q, N] from two complete, compatible feature stores (what ``jattr score`` does).

  Args:
    train_store, query_store: store directories.
    method: ``"trak"``, ``"grad_dot"`` or ``"grad_cosine"``.
    damping: TRAK's explicit λ (None: the scale-free default).
    relative_damping: c of the default λ = c·tr(ΦᵀΦ)/k.
    tile: (tile_q, tile_n) of the tiled assembly.

  Returns:
    ``(tau float32 [Q, N], info)`` with ``info`` holding the method, λ used and both
    configurations.
  """

  if method not in SCORE_METHODS:
    raise ValueError(f"method must be one of {SCORE_METHODS}, got {method!r}")
  train, query = _read_complete(train_store), _read_complete(query_store)
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
  """Writes ``score_stores``' result to an .npz atomically (``tau`` [Q, N] + metadata)."""
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  return atomic.write_npz(
      out, tau=tau, method=info["method"],
      damping=np.nan if info["damping"] is None else info["damping"],
      relative_damping=info["relative_damping"], train_store=info["train_store"],
      query_store=info["query_store"], train_config=json.dumps(info["train_config"]),
      query_config=json.dumps(info["query_config"]))
