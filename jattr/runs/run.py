"""A run directory: one trained denoiser, its recipe, checkpoints and samples.

Layout of ``<run>/``::

    config.json         the RunConfig (dataset, model, schedule, recipe, seeds)
    train_indices.npy   which examples of the dataset the model was trained on
    checkpoints/        orbax TrainState per segment (resumable)
    losses.csv          step, training loss
    samples.npz         generated samples (x [B,H,W,C] in [-1, 1], key, sampler; a
                        latent run adds z, the sampled latents, x being their decoding)
    samples.png         the same as a picture
    autoencoder.npz     a latent run's autoencoder (``RunConfig.latent``), trained first
    attribution/        index.html + query_XXX.png (each sample beside its top
                        training images), scores.npz (``tau`` [Q, N]), train_features.npy

The workflows on run directories live here; the CLI and the experiment drivers call
them, and everything below (the core and ``jattr.io``) neither parses flags nor
decides where files go.

Latent runs (``RunConfig.latent``, ``jattr run --latent``): ``train_run`` first trains
the autoencoder on the training images (``autoencoder.npz``; reused when present and
of the same config and images), then trains the UNet on their latents; ``sample_run``
samples latents and decodes them; ``attribute_run`` featurizes the training latents
and the sampled latents (the gradients are the UNet's, the autoencoder fixed), and
the report shows the decoded samples beside the training images in pixel space.
``training_data`` always gives the pixel images; ``latent_space`` the run's space.
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
from jattr.curvature.sketch import fit_sketched_ggn, sketch_damping, sketch_scores
from jattr.diffusion import conditioning
from jattr.data import Dataset, load_dataset, random_subset, resize
from jattr.diffusion.latent import LatentSpace, decode_latents, latent_dataset
from jattr.diffusion.measurements import measurement_fn
from jattr.features import ProjectionConfig, featurize
from jattr.grads import to_chunks
from jattr.io import atomic, checkpoint, guard, images
from jattr.io.feature_store import config_diff, describe_diff
from jattr.io.hashing import array_hash
from jattr.io.lock import DirectoryLock
from jattr.methods.trak import trak_fit, trak_score
from jattr.models import make_apply_fn, make_init_fn, num_params
from jattr.models.autoencoder import (LATENT_SCALING, AutoencoderConfig, LatentConfig,
                                      autoencoder_space, pack_autoencoder, unpack_autoencoder)
from jattr.models.bridge import null_condition
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.runs.config import SKETCH_NONZEROS, RunConfig, load_config
from jattr.runs.report_parts import damping_header, sketch_damping_header, write_run_report
from jattr.train import TrainState, init_state, make_optimizer, member_keys, train


AUTOENCODER_FILE = "autoencoder.npz"
"""A latent run's autoencoder, in the run directory (``jattr.models.autoencoder``)."""


def pixel_data(cfg: RunConfig) -> tuple[Dataset, np.ndarray]:
  """``training_data`` without the check against the model's shape: the images the
  run trains on (or encodes, for a latent run) and their indices."""
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
  return ds, idx


def training_data(cfg: RunConfig) -> tuple[Dataset, np.ndarray]:
  """The dataset the run trains on, and its indices into the full split.

  For a latent run these are the pixel images (the UNet trains on their latents,
  ``latent_dataset(latent_space(cfg, run), ds)``).

  Raises:
    ValueError: the split is empty, ``num_train`` exceeds it, or its images do not
      have the model's shape (for a latent run: the autoencoder does not fit them or
      the model's shape is not their latent shape).
  """
  ds, idx = pixel_data(cfg)
  if cfg.latent is not None:
    try:
      latent_shape = cfg.latent.latent_shape(ds.shape)
    except ValueError as e:
      raise ValueError(f"dataset {cfg.dataset!r} gives images of shape {ds.shape}, which the "
                       f"run's autoencoder (latent) does not take: {e}") from None
    if tuple(cfg.model.image_shape) != latent_shape:
      raise ValueError(f"a latent run trains the UNet on latents of shape {latent_shape} (images "
                       f"{ds.shape}, downsample {cfg.latent.downsample}, "
                       f"{cfg.latent.latent_channels} latent channels), but model.image_shape "
                       f"is {tuple(cfg.model.image_shape)}: set model.image_shape to "
                       f"{list(latent_shape)} (`jattr run --latent` does)")
  elif ds.shape != cfg.model.image_shape:
    raise ValueError(f"dataset {cfg.dataset!r} gives images of shape {ds.shape} but the model "
                     f"expects {cfg.model.image_shape}; set image_size or the model's image_shape")
  if cfg.conditional and (ds.y.min() < 0 or ds.y.max() >= cfg.model.num_classes):
    raise ValueError(f"dataset {cfg.dataset!r} has labels in [{ds.y.min()}, {ds.y.max()}] but "
                     f"model.num_classes = {cfg.model.num_classes}: expected labels in "
                     f"[0, {cfg.model.num_classes})")
  return ds, idx


def training_examples(cfg: RunConfig, ds: Dataset):
  """What the run trains on and attributes to: the images, or (images, labels)."""
  return (ds.x, np.asarray(ds.y, np.int32)) if cfg.conditional else ds.x


def sample_labels(cfg: RunConfig, ds: Dataset, num: int) -> np.ndarray | None:
  """The class of sample j of a conditional run: the training classes in turn."""
  if not cfg.conditional:
    return None
  classes = np.unique(np.asarray(ds.y))
  return classes[np.arange(num) % classes.size].astype(np.int32)


def model_fns(cfg: RunConfig):
  """``(apply_fn, init_fn)`` of the run's UNet."""
  return make_apply_fn(cfg.model), make_init_fn(cfg.model)


def _autoencoder_record(latent: LatentConfig, images: np.ndarray) -> dict:
  return {"latent": latent.to_dict(), "scaling": LATENT_SCALING,
          "image_shape": list(images.shape[1:]), "images_sha256": array_hash(images)}


def stored_autoencoder(path: str | os.PathLike, latent: LatentConfig, images
                       ) -> tuple[AutoencoderConfig, Any] | None:
  """The autoencoder ``fit_autoencoder(path, latent, images)`` stored, or None when
  ``path`` is missing or holds one of another config or other training images."""
  path = pathlib.Path(path)
  if not path.is_file():
    return None
  images = np.asarray(images, np.float32)
  try:
    with np.load(path, allow_pickle=False) as z:
      config, params, record = unpack_autoencoder(z)
  except (ValueError, OSError, KeyError, TypeError):
    return None
  if record != _autoencoder_record(latent, images):
    return None
  return config, params


def fit_autoencoder(path: str | os.PathLike, latent: LatentConfig, images, *,
                    progress: Progress | None = None) -> tuple[AutoencoderConfig, Any]:
  """The autoencoder of ``latent`` trained on ``images``, stored at ``path`` (``.npz``).

  Read from ``path`` when that holds the one of the same config trained on the same
  images (their sha256 is recorded); otherwise trained (``LatentConfig.fit``:
  deterministic) and written to ``path`` atomically.

  Returns:
    ``(AutoencoderConfig, params)``: ``autoencoder_space(*result)`` is its space.
  """
  images = np.asarray(images, np.float32)
  found = stored_autoencoder(path, latent, images)
  if found is not None:
    return found
  config, params, losses = latent.fit(images, progress=progress)
  atomic.write_npz(path, **pack_autoencoder(config, params, _autoencoder_record(latent, images),
                                            losses))
  return config, params


def latent_space(cfg: RunConfig, run_dir: str | os.PathLike, ds: Dataset | None = None, *,
                 progress: Progress | None = None) -> LatentSpace | None:
  """The space the run's UNet lives in: None for a pixel run, else its autoencoder's.

  With ``ds`` (the run's ``training_data``; what ``train_run`` passes) the autoencoder
  is trained on ``ds.x`` and stored in ``<run>/autoencoder.npz`` unless that already
  holds the one of ``cfg.latent`` trained on these images
  (``fit_autoencoder``: deterministic given ``cfg.latent.seed``). Without it the
  stored one is read.

  Raises:
    FileNotFoundError: a latent run without its ``autoencoder.npz`` (and no ``ds``).
    ValueError: the stored autoencoder is not the config's.
  """
  if cfg.latent is None:
    return None
  path = pathlib.Path(run_dir) / AUTOENCODER_FILE
  if ds is not None:
    return autoencoder_space(*fit_autoencoder(path, cfg.latent, ds.x, progress=progress))
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: the run is a latent run and its autoencoder is "
                            f"trained by `jattr train`")
  with np.load(path, allow_pickle=False) as z:
    config, params, _ = unpack_autoencoder(z)
  if config != cfg.latent.autoencoder(config.image_shape) or (
      cfg.latent.latent_shape(config.image_shape) != tuple(cfg.model.image_shape)):
    raise ValueError(f"{path} holds an autoencoder of another configuration than the run's "
                     f"latent section; run `jattr train` again to retrain it")
  return autoencoder_space(config, params)


def run_examples(cfg: RunConfig, ds: Dataset, space: LatentSpace | None):
  """What the run's UNet trains on and is attributed to: ``training_examples`` of the
  images, or of their latents in a latent run."""
  return training_examples(cfg, ds if space is None else latent_dataset(space, ds))


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
  t0 = time.perf_counter()
  fresh = cfg.latent is not None and stored_autoencoder(run / AUTOENCODER_FILE, cfg.latent,
                                                        ds.x) is None
  space = latent_space(cfg, run, ds, progress=progress)
  t_autoencoder = time.perf_counter() - t0
  examples = run_examples(cfg, ds, space)
  init_key, train_key = member_keys(cfg.seed)
  params = init_fn(init_key)
  t0 = time.perf_counter()
  extra = {"null_cond": null_condition(cfg.model, None)} if cfg.conditional else {}
  state, losses = train(apply_fn, params, cfg.noise_schedule, examples,
                        cfg.train, train_key,
                        checkpointer=checkpoint.Checkpointer(run / "checkpoints"), progress=progress,
                        meta={"params": num_params(params)}, **extra)
  elapsed = time.perf_counter() - t0
  atomic.write_text(run / "losses.csv", "step,loss\n" + "".join(
      f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses)))
  summary = {
      "num_params": num_params(params), "num_train": len(ds), "steps": cfg.train.num_steps,
      "final_loss_mean_last_100": float(np.mean(losses[-100:])),
      "seconds_this_invocation": elapsed, "backend": jax.default_backend()}
  if space is not None:
    latents = examples[0] if cfg.conditional else examples
    recon = decode_latents(space, latents, image_shape=ds.shape)
    summary["latent"] = {
        "latent_shape": list(cfg.model.image_shape),
        "autoencoder_reconstruction_mse": float(np.mean((recon - ds.x) ** 2)),
        "autoencoder_seconds_this_invocation": t_autoencoder if fresh else 0.0}
  atomic.write_json(run / "train_summary.json", summary, indent=2, sort_keys=False)
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
           return_trajectory: bool = False, labels=None):
  """Generates ``num`` samples with the run's sampler (jit-compiled); for a conditional
  run, sample j of class ``labels[j]`` with the run's guidance scale.

  Raises:
    ValueError: if ``params`` hold NaN or inf (checked before compiling).
  """
  diffusion.check_finite_params(params)
  shape = (num, *cfg.model.image_shape)
  sched = cfg.noise_schedule
  cond = {}
  if cfg.conditional:
    if labels is None or np.shape(labels) != (num,):
      raise ValueError(f"a conditional run samples with one label per sample: labels must "
                       f"have shape ({num},), got {np.shape(labels)}")
    cond = {"cond": jnp.asarray(labels, jnp.int32)}
    if cfg.guidance_scale != 1.0:
      cond.update(guidance_scale=cfg.guidance_scale, null_cond=null_condition(cfg.model, num))
  if cfg.sampler == "ddpm":
    fn = lambda p, k: diffusion.ddpm_sample(  # noqa: E731
        apply_fn, p, sched, k, shape, parameterization=cfg.train.parameterization,
        return_trajectory=return_trajectory, **cond)
  elif cfg.sampler == "ddim":
    fn = lambda p, k: diffusion.ddim_sample(  # noqa: E731
        apply_fn, p, sched, k, shape, cfg.sampler_steps,
        parameterization=cfg.train.parameterization, return_trajectory=return_trajectory,
        **cond)
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
  space = latent_space(cfg, run)
  labels = sample_labels(cfg, training_data(cfg)[0], num) if cfg.conditional else None
  x = np.asarray(sample(cfg, apply_fn, params, jax.random.key(seed), num, labels=labels))
  extra = {} if labels is None else {"y": labels, "guidance_scale": cfg.guidance_scale}
  if space is not None:  # x: the decoded images, z: the latents the UNet sampled
    extra["z"], x = x, decode_latents(space, x)
  atomic.write_npz(run / "samples.npz", x=x, seed=seed, sampler=cfg.sampler, **extra)
  scale = max(1, 64 // x.shape[1])
  png = images.save_grid(x, run / "samples.png", scale=scale, pad=2)
  return x, png




def attribute_run(run_dir: str | os.PathLike, *, progress: Progress | None = None,
                  wrt: str | None = None) -> str:
  """Attributes the run's samples to its training images; writes a report.

  Features are φ = Pᵀ∇_θ f(θ; x) with the run's ``AttributionConfig`` (f, K draws,
  projection) for every training image and every sample. With ``method =
  "sketch_ggn"`` (the default) f is the loss, P sparse, and the scores are
  τ[q, i] = φ_qᵀ(G_k + λI)⁻¹φ_i with G_k = PᵀGP the sketched GGN of the training loss
  (``jattr.curvature.fit_sketched_ggn``, λ = 0.1 × its mean eigenvalue by default);
  with ``"trak"`` they are τ[q, i] = φ_qᵀ(ΦᵀΦ + λI)⁻¹φ_i (``jattr.methods.trak``). The report
  (``jattr.runs.write_run_report``, docs/report.md) shows each sample's proponents,
  opponents and pixel neighbours, the damping and the method's benchmark row. In a
  latent run the features are those of the training latents and of the sampled
  latents (``samples.npz``'s ``z``), and the report shows the decoded samples and the
  training images.
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
  space = latent_space(cfg, run)
  with np.load(run / "samples.npz") as z:
    samples = z["x"]
    sample_y = np.asarray(z["y"]) if "y" in z.files else None  # conditional models
    sample_z = np.asarray(z["z"]) if "z" in z.files else None  # latent runs
  if cfg.conditional and sample_y is None:
    raise ValueError(f"{run / 'samples.npz'} has no labels (y) but the run is conditional: "
                     f"run `jattr sample --run {run}` again")
  if space is not None and (sample_z is None or sample_z.shape[1:] != cfg.model.image_shape):
    raise ValueError(f"{run / 'samples.npz'} has no latents (z) of shape "
                     f"{cfg.model.image_shape} but the run is a latent run: run "
                     f"`jattr sample --run {run}` again")
  ds, idx = training_data(cfg)
  draws = diffusion.fixed_draws(jax.random.key(a.draw_seed), a.num_draws, cfg.model.image_shape,
                                cfg.num_timesteps, a.timesteps)
  sketch = a.method == "sketch_ggn"
  measurement = "loss" if sketch else a.measurement
  f = measurement_fn(measurement, apply_fn, cfg.noise_schedule, draws,
                     parameterization=cfg.train.parameterization)
  if sketch:
    proj = ProjectionConfig(a.sketch_dim, "sparse", a.proj_seed, nonzeros=SKETCH_NONZEROS)
  else:
    proj = ProjectionConfig(a.proj_dim, a.proj_kind, a.proj_seed, nonzeros=a.proj_nonzeros)
  out = run / "attribution"
  out.mkdir(exist_ok=True)
  train_x = run_examples(cfg, ds, space)
  t0 = time.perf_counter()
  train_feats = _featurize_blocks(f, params, train_x, proj, a.chunk_size, progress, "train",
                                  wrt)
  attributed = samples if space is None else sample_z  # what the UNet generated
  queries = attributed if sample_y is None else (attributed, sample_y)  # each under its class
  query_feats = _featurize_blocks(f, params, queries, proj, a.chunk_size, progress, "samples",
                                  wrt)
  t_feat = time.perf_counter() - t0
  atomic.write_npy(out / "train_features.npy", train_feats)
  t0 = time.perf_counter()
  if sketch:
    report = resolve_progress(progress)
    stage = (f"sketched GGN (k = {a.sketch_dim}, {a.sketch_samples} rows per example and "
             "draw)")
    report(stage, 0, 1)
    n = conditioning.count(train_x)
    fit_idx = np.arange(n)
    if a.sketch_examples is not None and a.sketch_examples < n:
      fit_idx = np.sort(np.random.default_rng(a.draw_seed).choice(n, a.sketch_examples,
                                                                  replace=False))
    fit_x = jax.tree.map(lambda v: jnp.asarray(np.asarray(v)[fit_idx]), train_x)
    state = fit_sketched_ggn(apply_fn, params, cfg.noise_schedule, fit_x, draws, proj,
                             num_samples=a.sketch_samples,
                             key=jax.random.fold_in(jax.random.key(a.draw_seed), 1),
                             batch_size=max(1, 16 * a.chunk_size
                                            // (a.num_draws * a.sketch_samples)),
                             chunk_size=a.chunk_size,
                             parameterization=cfg.train.parameterization, wrt=wrt)
    report(stage, 1, 1)
    factor = 0.1 if a.damping_factor is None else a.damping_factor
    lam = float(sketch_damping(state, damping_factor=factor))
    t_fit = time.perf_counter() - t0
    scores = np.asarray(sketch_scores(state, jnp.asarray(query_feats), jnp.asarray(train_feats),
                                      damping_factor=factor))
    method = "sketched-GGN influence"
    damping, notes, links = sketch_damping_header(a, lam, out)
    what = f"{method}, f = loss (both sides)"
    projection = (f"k = {a.sketch_dim} sparse (seed {a.proj_seed}, s = {SKETCH_NONZEROS}); "
                  f"G_k from {a.sketch_samples} sampled rows per example and draw of "
                  f"{len(fit_idx)} of the {n} training examples")
    timing = f"featurization {t_feat:.1f} s, sketch fit {t_fit:.1f} s"
  else:
    state = trak_fit(jnp.asarray(train_feats), relative_damping=a.relative_damping)
    scores = np.asarray(trak_score(state, jnp.asarray(query_feats)))
    method = "D-TRAK" if a.measurement != "loss" else "TRAK"
    damping, notes, links = damping_header(a, float(state.damping), out)
    what = f"{method}, f = {a.measurement}"
    projection = (f"k = {a.proj_dim} {a.proj_kind} (seed {a.proj_seed}"
                  + (f", s = {a.proj_nonzeros})" if a.proj_kind == "sparse" else ")"))
    timing = f"featurization {t_feat:.1f} s"
  t_score = time.perf_counter() - t0 - (t_fit if sketch else 0.0)  # the fit is timed apart
  return write_run_report(
      out, samples, scores, ds, idx, query_labels=sample_y, top_k=a.top_k,
      title=f"{method} attribution of {len(samples)} samples ({cfg.dataset})",
      details={"method": what,
               "draws": f"K = {a.num_draws} ({a.timesteps}, seed {a.draw_seed})",
               "projection": projection,
               "damping": damping,
               **({} if wrt is None else {"parameters": f"w.r.t. {wrt!r} (jattr.wrt)"}),
               **({} if space is None else {"space": _latent_detail(cfg)}),
               "training images": f"N = {len(ds)} ({cfg.dataset})",
               "queries": f"{len(samples)} generated samples (samples.npz)",
               "time": f"{timing}, scoring {t_score:.1f} s"},
      notes=notes, links=links)


def _latent_detail(cfg: RunConfig) -> str:
  """The report's line on a latent run's space."""
  shape = "×".join(map(str, cfg.model.image_shape))
  if cfg.latent is None:
    return (f"attribution ran in a latent space ({shape} latents); samples shown decoded, "
            f"training images in pixel space")
  return (f"attribution ran in the autoencoder's latent space ({shape} latents: "
          f"downsample {cfg.latent.downsample}, {cfg.latent.latent_channels} channels, "
          f"{cfg.latent.num_steps} autoencoder steps; gradients of the UNet on the latents, "
          f"the autoencoder fixed); samples shown decoded, training images in pixel space")


def _featurize_blocks(f, params, x, proj, chunk_size: int, progress: Progress | None,
                      what: str, wrt=None):
  """``featurize`` over blocks of 4 chunks, reporting progress per block.

  One compiled program serves every block: the examples are split with
  ``jattr.grads.to_chunks`` (the last block padded with its final example)."""
  report = resolve_progress(progress)
  n = conditioning.count(x)
  blocks, _ = to_chunks(jax.tree.map(np.asarray, x), 4 * chunk_size)
  out = []
  for b in range(jax.tree.leaves(blocks)[0].shape[0]):  # blocks: [num_blocks, 4 C, ...]
    xb = jax.tree.map(lambda a, b=b: jnp.asarray(a[b]), blocks)
    out.append(np.asarray(featurize(f, params, xb, proj, chunk_size=chunk_size, wrt=wrt)))
    report(f"featurize {what}", min((b + 1) * 4 * chunk_size, n), n)
  return np.concatenate(out)[:n]
