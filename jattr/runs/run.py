"""A run directory: one trained denoiser, its recipe, checkpoints and samples.

Layout of ``<run>/``::

    config.json         the RunConfig (dataset, model, schedule, recipe, seeds)
    train_indices.npy   which examples of the dataset the model was trained on
    checkpoints/        orbax TrainState per segment (resumable)
    losses.csv          step, training loss
    samples.npz         generated samples (x [B,H,W,C] in [-1, 1], key, sampler)
    samples.png         the same as a picture
    attribution/        index.html + query_XXX.png (each sample beside its top
                        training images), scores.npz (``tau`` [Q, N]), train_features.npy

The workflows on run directories live here; the CLI and the experiment drivers call
them, and everything below (the core and ``jattr.io``) neither parses flags nor
decides where files go.
"""

from __future__ import annotations

import numbers
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattr import diffusion
from jattr.data import Dataset, load_dataset, random_subset, resize
from jattr.diffusion.measurements import measurement_fn
from jattr.features import ProjectionConfig, featurize
from jattr.grads import to_chunks
from jattr.io import atomic, checkpoint, guard, images
from jattr.io.feature_store import config_diff, describe_diff
from jattr.io.lock import DirectoryLock
from jattr.methods.trak import trak_fit, trak_score
from jattr.models import make_apply_fn, make_init_fn, num_params
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.runs.config import RunConfig, load_config
from jattr.runs.report_parts import damping_header, write_run_report
from jattr.train import TrainState, init_state, make_optimizer, member_keys, train


def training_data(cfg: RunConfig) -> tuple[Dataset, np.ndarray]:
  """The dataset the run trains on, and its indices into the full split.

  Raises:
    ValueError: the split is empty, ``num_train`` exceeds it, or its images do not
      have the model's shape.
  """
  ds = load_dataset(cfg.dataset, cfg.data_dir, split="train")
  if len(ds) == 0:
    raise ValueError(f"dataset {cfg.dataset!r} has no training images"
                     + (f" in {cfg.data_dir}" if cfg.data_dir else ""))
  idx = np.arange(len(ds))
  if cfg.num_train is not None:
    if cfg.num_train > len(ds):
      raise ValueError(f"num_train = {cfg.num_train}: expected at most the {len(ds)} training "
                       f"images of dataset {cfg.dataset!r}")
    ds, idx = random_subset(ds, cfg.num_train, cfg.subset_seed)
  if cfg.image_size is not None:
    ds = resize(ds, cfg.image_size)
  if ds.shape != cfg.model.image_shape:
    raise ValueError(f"dataset {cfg.dataset!r} gives images of shape {ds.shape} but the model "
                     f"expects {cfg.model.image_shape}; set image_size or the model's image_shape")
  return ds, idx


def model_fns(cfg: RunConfig):
  """``(apply_fn, init_fn)`` of the run's UNet."""
  return make_apply_fn(cfg.model), make_init_fn(cfg.model)


def train_run(cfg: RunConfig, run_dir: str | os.PathLike, *,
              progress: Progress | None = None) -> TrainState:
  """Trains (or resumes training) the run's model and writes the run directory.

  One writer at a time: the run directory is locked while it trains
  (``jattr.io.lock``); a second ``train_run`` on it raises ``InUseError``.

  Nothing is written before everything is checked (``check_run_dir``, the data,
  the model): a refused call leaves the directory as it was, and a directory that
  is not a jattr run is never written into.
  """
  run = pathlib.Path(run_dir)
  check_run_dir(run, cfg)
  ds, idx = training_data(cfg)
  apply_fn, init_fn = model_fns(cfg)
  with DirectoryLock(run, "run directory"):
    check_run_dir(run, cfg)  # again under the lock: another writer may have come first
    return _train_run(cfg, run, ds, idx, apply_fn, init_fn, progress)


def _stored_config(cfg_path: pathlib.Path) -> dict:
  """The config.json of a run, checked to be one that ``train_run`` wrote."""
  doc = guard.read_json(cfg_path, "run config")
  try:
    canonical = RunConfig.from_json(doc, where=str(cfg_path)).to_json()
  except ValueError as e:
    raise ValueError(f"{cfg_path.parent} is not a jattr run directory: {e}. Choose a new or "
                     f"empty directory") from None
  if doc != canonical:
    keys = config_diff(doc, canonical)
    raise ValueError(f"{cfg_path.parent} is not a jattr run directory: {cfg_path} was not "
                     f"written by `jattr train` (it differs from a run config in "
                     f"{', '.join(keys[:3])}); choose a new or empty directory")
  return doc


def check_run_dir(run: str | os.PathLike, cfg: RunConfig, flag: str = "--out") -> None:
  """Checks that ``train_run(cfg, run)`` may write ``run``, before it writes anything.

  ``run`` may be missing or empty (a new run), a run directory of ``cfg`` (resumed),
  or one whose config.json ``train_run`` wrote but that holds no checkpoint yet (a
  run that failed before its first checkpoint: it is re-configured).

  Raises:
    ValueError: ``run`` holds anything else (files of another program, a config.json
      jattr did not write), or a trained run of a different configuration.
    PermissionError, NotADirectoryError: it cannot be written.
  """
  run = pathlib.Path(run)
  cfg_path = run / "config.json"
  guard.check_output_dir(run, flag, kind="run directory",
                         is_own=lambda p: (p / "config.json").is_file())
  if not cfg_path.is_file():
    return
  stored = _stored_config(cfg_path)
  given = cfg.to_json()
  if stored != given and checkpoint.latest_step(run / "checkpoints") is not None:
    keys = config_diff(stored, given)
    raise ValueError(f"{cfg_path} holds a different configuration (differing keys: "
                     f"{describe_diff(stored, given, keys[:5])}); choose another run "
                     f"directory or delete it")


def _train_run(cfg: RunConfig, run: pathlib.Path, ds: Dataset, idx: np.ndarray, apply_fn,
               init_fn, progress: Progress | None) -> TrainState:
  cfg_path = run / "config.json"
  atomic.write_json(cfg_path, cfg.to_json(), indent=2, sort_keys=False)
  atomic.write_npy(run / "train_indices.npy", idx)
  init_key, train_key = member_keys(cfg.seed)
  params = init_fn(init_key)
  t0 = time.perf_counter()
  state, losses = train(apply_fn, params, cfg.noise_schedule, ds.x, cfg.train, train_key,
                        checkpointer=checkpoint.Checkpointer(run / "checkpoints"), progress=progress,
                        meta={"params": num_params(params)})
  elapsed = time.perf_counter() - t0
  atomic.write_text(run / "losses.csv", "step,loss\n" + "".join(
      f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses)))
  atomic.write_json(run / "train_summary.json", {
      "num_params": num_params(params), "num_train": len(ds), "steps": cfg.train.num_steps,
      "final_loss_mean_last_100": float(np.mean(losses[-100:])),
      "seconds_this_invocation": elapsed, "backend": jax.default_backend()},
      indent=2, sort_keys=False)
  return state


def load_run(run_dir: str | os.PathLike) -> tuple[RunConfig, Any, Any]:
  """``(config, apply_fn, ema_params)`` of a trained run.

  Raises:
    FileNotFoundError: if the directory has no config or no checkpoint.
  """
  run = pathlib.Path(run_dir)
  if not (run / "config.json").exists():
    raise FileNotFoundError(f"{run / 'config.json'} not found: is {run} a run directory "
                            f"made by `jattr train`?")
  cfg = load_config(run / "config.json")
  apply_fn, init_fn = model_fns(cfg)
  template = jax.eval_shape(lambda: init_state(init_fn(jax.random.key(0)),
                                               make_optimizer(cfg.train)))
  state, _, step = checkpoint.restore(run / "checkpoints", template)
  if step < cfg.train.num_steps:
    raise ValueError(f"run {run} stopped at step {step} of {cfg.train.num_steps}; "
                     f"run `jattr train` again with the same config to finish it")
  return cfg, apply_fn, state.ema_params


def sample(cfg: RunConfig, apply_fn, params, key: jax.Array, num: int, *,
           return_trajectory: bool = False):
  """Generates ``num`` samples with the run's sampler (jit-compiled).

  Raises:
    ValueError: if ``params`` hold NaN or inf (checked before compiling).
  """
  diffusion.check_finite_params(params)
  shape = (num, *cfg.model.image_shape)
  sched = cfg.noise_schedule
  if cfg.sampler == "ddpm":
    fn = lambda p, k: diffusion.ddpm_sample(  # noqa: E731
        apply_fn, p, sched, k, shape, parameterization=cfg.train.parameterization,
        return_trajectory=return_trajectory)
  elif cfg.sampler == "ddim":
    fn = lambda p, k: diffusion.ddim_sample(  # noqa: E731
        apply_fn, p, sched, k, shape, cfg.sampler_steps,
        parameterization=cfg.train.parameterization, return_trajectory=return_trajectory)
  else:
    raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {cfg.sampler!r}")
  return jax.jit(fn)(params, key)


def sample_run(run_dir: str | os.PathLike, *, num: int | None = None, seed: int | None = None,
               ) -> tuple[np.ndarray, str]:
  """Samples from a trained run; writes ``samples.npz`` and ``samples.png``.

  Raises:
    ValueError: ``num`` < 1 or not an integer, ``seed`` not an integer (checked
      before anything is read or written).
    FileNotFoundError: ``run_dir`` is not a run directory.
  """
  run = pathlib.Path(run_dir)
  if num is not None and (isinstance(num, bool) or not isinstance(num, numbers.Integral)
                          or num < 1):
    raise ValueError(f"num = {num!r}: expected an integer >= 1 (the number of samples)")
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
    raise ValueError(f"seed = {seed!r}: expected an integer")
  if not (run / "config.json").is_file():  # before the lock, which would create the directory
    raise FileNotFoundError(f"{run / 'config.json'} not found: is {run} a run directory "
                            f"made by `jattr train`?")
  guard.check_writable(run, "--run")
  with DirectoryLock(run, "run directory"):
    return _sample_run(run, num, seed)


def _sample_run(run: pathlib.Path, num: int | None, seed: int | None
                ) -> tuple[np.ndarray, str]:
  cfg, apply_fn, params = load_run(run)
  num = cfg.num_samples if num is None else num
  seed = cfg.sample_seed if seed is None else seed
  x = np.asarray(sample(cfg, apply_fn, params, jax.random.key(seed), num))
  atomic.write_npz(run / "samples.npz", x=x, seed=seed, sampler=cfg.sampler)
  scale = max(1, 64 // cfg.model.image_shape[0])
  png = images.save_grid(x, run / "samples.png", scale=scale, pad=2)
  return x, png




def attribute_run(run_dir: str | os.PathLike, *, progress: Progress | None = None,
                  wrt: str | None = None) -> str:
  """Attributes the run's samples to its training images with (D-)TRAK; writes a report.

  Features are φ = Pᵀ∇_θ f(θ; x) with the run's ``AttributionConfig`` (f, K draws,
  projection) for every training image and every sample; scores are
  τ[q, i] = φ_qᵀ(ΦᵀΦ + λI)⁻¹φ_i (``jattr.methods.trak``). The report
  (``jattr.runs.write_run_report``, docs/report.md) shows each sample's proponents,
  opponents and pixel neighbours, the damping and the method's benchmark row.
  ``wrt`` (a regex on parameter paths, ``jattr.wrt``; default: the config's
  ``attribution.wrt``, None: all) takes the gradients with respect to the matching
  parameters only.

  Returns:
    The path of ``attribution/index.html``.
  """
  run = pathlib.Path(run_dir)
  cfg, apply_fn, params = load_run(run)
  a = cfg.attribution
  wrt = a.wrt if wrt is None else wrt
  if not (run / "samples.npz").exists():
    raise FileNotFoundError(f"{run / 'samples.npz'} not found: run `jattr sample --run {run}`")
  samples = np.load(run / "samples.npz")["x"]
  ds, idx = training_data(cfg)
  draws = diffusion.fixed_draws(jax.random.key(a.draw_seed), a.num_draws, cfg.model.image_shape,
                                cfg.num_timesteps, a.timesteps)
  f = measurement_fn(a.measurement, apply_fn, cfg.noise_schedule, draws,
                     parameterization=cfg.train.parameterization)
  proj = ProjectionConfig(a.proj_dim, a.proj_kind, a.proj_seed, nonzeros=a.proj_nonzeros)
  out = run / "attribution"
  out.mkdir(exist_ok=True)
  t0 = time.perf_counter()
  train_feats = _featurize_blocks(f, params, ds.x, proj, a.chunk_size, progress, "train", wrt)
  query_feats = _featurize_blocks(f, params, samples, proj, a.chunk_size, progress, "samples",
                                  wrt)
  t_feat = time.perf_counter() - t0
  atomic.write_npy(out / "train_features.npy", train_feats)
  t0 = time.perf_counter()
  state = trak_fit(jnp.asarray(train_feats), relative_damping=a.relative_damping)
  scores = np.asarray(trak_score(state, jnp.asarray(query_feats)))
  t_score = time.perf_counter() - t0
  method = "D-TRAK" if a.measurement != "loss" else "TRAK"
  damping, notes, links = damping_header(a, float(state.damping), out)
  with np.load(run / "samples.npz") as z:
    sample_labels = np.asarray(z["y"]) if "y" in z.files else None  # conditional models
  return write_run_report(
      out, samples, scores, ds, idx, query_labels=sample_labels, top_k=a.top_k,
      title=f"{method} attribution of {len(samples)} samples ({cfg.dataset})",
      details={"method": f"{method}, f = {a.measurement}",
               "draws": f"K = {a.num_draws} ({a.timesteps}, seed {a.draw_seed})",
               "projection": f"k = {a.proj_dim} {a.proj_kind} (seed {a.proj_seed}"
                             + (f", s = {a.proj_nonzeros})" if a.proj_kind == "sparse" else ")"),
               "damping": damping,
               **({} if wrt is None else {"parameters": f"w.r.t. {wrt!r} (jattr.wrt)"}),
               "training images": f"N = {len(ds)} ({cfg.dataset})",
               "queries": f"{len(samples)} generated samples (samples.npz)",
               "time": f"featurization {t_feat:.1f} s, scoring {t_score:.1f} s"},
      notes=notes, links=links)


def _featurize_blocks(f, params, x, proj, chunk_size: int, progress: Progress | None,
                      what: str, wrt=None):
  """``featurize`` over blocks of 4 chunks, reporting progress per block.

  One compiled program serves every block: the examples are split with
  ``jattr.grads.to_chunks`` (the last block padded with its final example)."""
  report = resolve_progress(progress)
  n = x.shape[0]
  blocks, _ = to_chunks(np.asarray(x), 4 * chunk_size)
  out = []
  for b, xb in enumerate(blocks):
    out.append(np.asarray(featurize(f, params, jnp.asarray(xb), proj, chunk_size=chunk_size,
                                    wrt=wrt)))
    report(f"featurize {what}", min((b + 1) * 4 * chunk_size, n), n)
  return np.concatenate(out)[:n]
