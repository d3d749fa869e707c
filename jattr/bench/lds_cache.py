"""The on-disk LDS cache: subset models and their measurements, built once, reused always.

Everything that defines an LDS benchmark — data, split, architecture, recipe,
subsets, seeds, draws, sampler — is an ``LdsSpec``. Its canonical JSON is hashed,
and the cache lives in ``<root>/<dataset>-<hash>/``:

    spec.json                   the spec, its hash, the format version
    data.json                   the sha256 of the training images (checked on reuse)
    split.npz                   train/validation/test indices into the dataset,
                                subset masks [M, N]
    full/                       train_many checkpoint of the full-data model
                                (the model attributed; generated queries come from it)
    queries.npz                 validation, test and generated query images, and the
                                sampler key of each generated sample
    models/replicate_<r>/       train_many checkpoint of the M subset models of seed
                                replicate r (every subset model has seed r: common
                                random numbers)
    y/replicate_<r>.npz         measurements y [Q_total, M] of replicate r, written
                                once its models are trained
    timing.json                 wall-clock and CPU seconds per stage, summed over
                                resumptions
    autoencoder.npz             a latent benchmark's autoencoder (``LdsSpec.latent``),
                                trained once on the N training images

A latent benchmark (``LdsSpec.latent`` set) trains that autoencoder right after the
split, encodes the training and held-out images, and runs everything else (the
full and subset models, generation, the measurements) on the latents: the cache's
``train_images`` and query ``x`` are then latents, and ``train_pixels`` /
``query_pixels`` hold the images (held-out originals, generated decoded) for display.

``build`` runs the stages in order and skips every stage whose output exists, so a
second call with the same spec reads the cache and trains nothing, and a build
killed at any point resumes from the last segment checkpoint of the stage it was in
(``train_many``'s own resume) with identical numbers. One builder at a time: a
build that has anything to write holds the cache's ``jattr.io.lock.DirectoryLock``;
loading a complete cache takes no lock. The training images are fingerprinted
(``data.json``), so a cache is never reused with other data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
import typing
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jattr import data as data_lib
from jattr import models
from jattr.diffusion import draws as draws_lib
from jattr.diffusion.latent import LatentSpace, decode_latents, encode_images
from jattr.diffusion import samplers
from jattr.diffusion.schedules import Schedule
from jattr.eval.lds import noise_ceiling, spearman_brown, subset_masks, subset_size
from jattr.eval.measure import member_measure_fn
from jattr.eval.selection import Queries, QuerySet
from jattr.io import atomic, checkpoint, guard
from jattr.io.hashing import array_hash
from jattr.io.lock import DirectoryLock
from jattr.models.autoencoder import (LATENT_SCALING, LatentConfig, autoencoder_space,
                                      pack_autoencoder, unpack_autoencoder)
from jattr.progress import Progress
from jattr.train import TrainConfig, init_state, make_optimizer, member_keys, train_many
from jattr.types import ApplyFn, Params

FORMAT_VERSION = 1
SPLITS = ("validation", "test", "generated")
DATA_RECORD = "data.json"
"""The fingerprint of the training images the cache was built from."""
AUTOENCODER_FILE = "autoencoder.npz"
"""A latent benchmark's autoencoder (``jattr.models.autoencoder.pack_autoencoder``)."""


@dataclasses.dataclass(frozen=True)
class LdsSpec:
  """Everything that defines an LDS benchmark; its hash names the cache.

  Attributes:
    dataset: a ``jattr.data.DATASET_NAMES`` entry, or the path of your own data (an
      image folder or an .npz / .npy file; ``jattr.data.load_dataset``).
    data_split: which split of the dataset to draw train and held-out queries from.
    image_size: resize images to this side first (None: keep).
    classes: keep only these labels (None: all).
    num_train: N, the training set (drawn with ``split_indices``).
    num_validation, num_test: held-out real queries, disjoint from the training set
      and from each other.
    num_generated: queries sampled from the full-data model.
    split_seed: seed of the train/validation/test split.
    model: the UNet: ``{"preset": name, **overrides}`` with a
      ``jattr.models.config_by_name`` preset and ``UNetConfig`` fields to replace
      (``image_shape`` is set from the data); any dict when a model is passed to
      ``build`` directly.
    schedule: ``Schedule`` fields, e.g. ``{"kind": "linear", "num_timesteps": 1000}``.
    train: ``TrainConfig`` fields (the recipe shared by every model).
    num_subsets: M.
    alpha: subset fraction α.
    subset_seed: seed of the subset draw.
    num_seeds: S, seed replicates per subset (replicate r uses seed r for all M).
    full_seed: seed of the full-data model.
    num_draws: K, fixed (t, ε) draws of the measurement.
    draw_seed: seed of the draws.
    draw_timesteps: ``"uniform"`` (range(0, T, T//K)) or ``"random"``.
    sampler: ``{"kind": "ddim", "num_steps": 50, "eta": 0.0}`` or ``{"kind": "ddpm"}``.
    sample_seed: generated sample j uses the key ``fold_in(key(sample_seed), j)``.
    conditional: class-conditional benchmark: every model is trained on the pairs
      (image, label), the UNet gets ``num_classes`` (the dataset's labels) and its
      null class, held-out queries carry their labels and generated sample j is
      drawn for class j mod num_classes. For classifier-free guidance, train with
      ``train.cond_dropout`` > 0.
    guidance_scales: conditional only: the classifier-free guidance scales of the
      generated queries. The first gives the ``generated`` split; every further
      scale s adds a split ``generated_g{s}`` of samples from the same keys and
      classes (``generated_split_name``), measured under the same subset models.
    latent: latent diffusion: ``jattr.models.autoencoder.LatentConfig`` fields (``{}``
      for its defaults). The cache trains that autoencoder once on the N training
      images (``autoencoder.npz``, deterministic), and every model is trained,
      sampled and measured on latents; the UNet's ``image_shape`` is the latent
      shape, and a model passed to ``build`` must take latents. None (the default,
      left out of the hash): pixel space.
  """

  dataset: str = "digits"
  data_split: str = "train"
  image_size: int | None = None
  classes: tuple[int, ...] | None = None
  num_train: int = 300
  num_validation: int = 100
  num_test: int = 100
  num_generated: int = 100
  split_seed: int = 0
  model: dict = dataclasses.field(default_factory=lambda: {"preset": "digits"})
  schedule: dict = dataclasses.field(
      default_factory=lambda: {"kind": "linear", "num_timesteps": 1000})
  train: dict = dataclasses.field(default_factory=dict)
  num_subsets: int = 64
  alpha: float = 0.5
  subset_seed: int = 0
  num_seeds: int = 2
  full_seed: int = 0
  num_draws: int = 100
  draw_seed: int = 0
  draw_timesteps: str = "uniform"
  sampler: dict = dataclasses.field(
      default_factory=lambda: {"kind": "ddim", "num_steps": 50, "eta": 0.0})
  sample_seed: int = 0
  conditional: bool = False
  guidance_scales: tuple[float, ...] = (1.0,)
  latent: dict | None = None

  def __post_init__(self):
    # Every field's type first (jattr.io.guard), then the values: a spec from a file
    # or from Python is refused before anything is built, naming the key.
    guard.check_fields(self)
    if self.classes is not None:
      object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
    object.__setattr__(self, "guidance_scales", tuple(float(s) for s in self.guidance_scales))
    if not self.guidance_scales or any(not s >= 0 for s in self.guidance_scales):
      raise guard.ConfigError("guidance_scales", f" = {list(self.guidance_scales)}: expected "
                              "a non-empty list of scales >= 0", "LdsSpec")
    if self.conditional and not isinstance(self.model.get("num_classes"), int):
      raise guard.ConfigError("model.num_classes", ": a conditional benchmark needs the "
                              "model's number of classes (an int; label num_classes is the "
                              "null class of guidance)", "LdsSpec")
    if not self.conditional and self.guidance_scales != (1.0,):
      raise guard.ConfigError("guidance_scales", f" = {list(self.guidance_scales)}: guidance "
                              "needs a conditional benchmark (conditional: true)", "LdsSpec")
    try:
      data_lib.dataset_source(self.dataset)  # a built-in name or your own data's path
    except ValueError as e:
      raise guard.ConfigError("dataset", f" = {guard.show(self.dataset)}: {e}",
                              "LdsSpec") from None
    guard.one_of(self, "draw_timesteps", ("uniform", "random"))
    guard.at_least(self, "image_size", 1, optional=True)
    for name in ("num_train", "num_subsets", "num_seeds", "num_draws"):
      guard.at_least(self, name, 1)
    for name in ("num_test", "num_generated", "split_seed", "subset_seed"):
      guard.at_least(self, name, 0)
    if self.num_validation < 1:
      raise guard.ConfigError("num_validation", f" = {self.num_validation}: expected an "
                              f"integer >= 1 (selection needs validation queries)", "LdsSpec")
    try:
      subset_size(self.num_train, self.alpha)  # validates alpha and N
    except ValueError as e:
      raise guard.ConfigError("alpha", f" = {guard.show(self.alpha)}: {e}", "LdsSpec") from None
    try:
      guard.from_dict(TrainConfig, self.train, key="train")  # the recipe
      schedule = guard.from_dict(Schedule, self.schedule, key="schedule")
      _check_sampler_spec(self.sampler)
      if self.latent is not None:
        guard.from_dict(LatentConfig, self.latent, key="latent")
    except guard.ConfigError as e:
      raise guard.ConfigError(e.key, e.problem, "LdsSpec", rel=e.rel) from None
    if self.num_draws > schedule.num_timesteps and self.draw_timesteps == "uniform":
      raise guard.ConfigError("num_draws", f" = {self.num_draws}: expected at most "
                              f"schedule.num_timesteps = {schedule.num_timesteps} uniform draws",
                              "LdsSpec")

  @classmethod
  def from_dict(cls, d: dict, *, where: str | None = None, key: str = "") -> "LdsSpec":
    """A spec from its JSON form, every key and type checked (``jattr.io.guard``).

    Args:
      d: the JSON object.
      where: the file it came from, named in every error.
      key: its key in that file (``"spec"`` in an experiment config).

    Raises:
      ValueError (``jattr.io.guard.ConfigError``): an unknown key (with the nearest
        valid one), a wrong type or a value out of range, naming the key.
    """
    return guard.from_dict(cls, d, where=where, key=key)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["classes"] = None if self.classes is None else list(self.classes)
    d["guidance_scales"] = list(self.guidance_scales)
    if not self.conditional:  # unconditional specs keep the digests they had
      del d["conditional"], d["guidance_scales"]
    if self.latent is None:  # pixel specs keep the digests they had
      del d["latent"]
    return d

  @property
  def generated_splits(self) -> tuple[str, ...]:
    """The generated query splits: ``generated``, then one per further guidance scale."""
    return ("generated",) + tuple(generated_split_name(s) for s in self.guidance_scales[1:])

  def digest(self) -> str:
    """Hex SHA-256 of the canonical JSON of the spec (and the format version)."""
    text = json.dumps({"version": FORMAT_VERSION, "spec": self.to_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()

  @property
  def train_config(self) -> TrainConfig:
    return TrainConfig(**self.train)

  @property
  def noise_schedule(self) -> Schedule:
    return Schedule(**self.schedule)

  @property
  def latent_config(self) -> LatentConfig | None:
    """The autoencoder of a latent benchmark, or None."""
    return None if self.latent is None else LatentConfig(**self.latent)

  def model_shape(self, image_shape) -> tuple[int, int, int]:
    """The shape the models work on for images of ``image_shape``: the images', or
    their latents' for a latent benchmark."""
    latent = self.latent_config
    return tuple(image_shape) if latent is None else latent.latent_shape(image_shape)


def generated_split_name(scale: float) -> str:
  """``generated_g3`` for guidance scale 3, ``generated_g1.5`` for 1.5."""
  return f"generated_g{float(scale):g}"


DATASET_IMAGE_SHAPES = {"digits": (8, 8, 1), "fashion_mnist": (28, 28, 1),
                        "cifar2": (32, 32, 3), "olivetti": (64, 64, 1)}
"""(H, W, C) of each dataset's images as its loader gives them (``jattr.data``)."""
SAMPLER_KEYS = {"ddim": {"kind": str, "num_steps": int, "eta": float, "clip_x0": bool},
                "ddpm": {"kind": str, "clip_x0": bool}}
"""The keys ``LdsSpec.sampler`` may hold, by ``kind`` (the samplers' keywords)."""


def check_unet_model(spec: LdsSpec) -> None:
  """Checks ``spec.model`` as the UNet ``build`` makes of it (no ``model`` given): a
  ``preset`` and ``UNetConfig`` fields, ``image_shape`` coming from the data.

  The UNet is built for the image shape the dataset's loader gives
  (``DATASET_IMAGE_SHAPES``, ``image_size`` applied), so its checks run before
  anything is loaded or built.

  Raises:
    ValueError (``jattr.io.guard.ConfigError``): naming ``model.KEY``.
  """
  model = spec.model
  hints = typing.get_type_hints(models.UNetConfig)
  names = [f.name for f in dataclasses.fields(models.UNetConfig) if f.name != "image_shape"]
  guard.check_keys(model, ["preset", *names], key="model", what="model")
  fields = {k: guard.check_value(v, hints[k], f"model.{k}") for k, v in model.items()
            if k != "preset"}
  preset = model.get("preset")
  try:
    if preset is not None:
      guard.check_value(preset, str, "model.preset")
      base = models.config_by_name(preset)
    else:
      base = models.UNetConfig(image_shape=(8, 8, 1))
    h, w, c = DATASET_IMAGE_SHAPES.get(spec.dataset, base.image_shape)
    if spec.image_size is not None:
      h = w = spec.image_size
    dataclasses.replace(base, image_shape=spec.model_shape((h, w, c)), **fields)
  except (ValueError, TypeError) as e:
    raise guard.ConfigError("model", f": {e}") from None


def _check_sampler_spec(sampler: dict) -> None:
  kind = sampler.get("kind")
  if kind not in SAMPLER_KEYS:
    tip = guard.suggest(kind, SAMPLER_KEYS) if isinstance(kind, str) else ""
    raise guard.ConfigError("sampler.kind", f" = {guard.show(kind)}: expected \"ddim\" or "
                            f"\"ddpm\"{tip}")
  keys = SAMPLER_KEYS[kind]
  guard.check_keys(sampler, keys, key="sampler", what=f"{kind} sampler")
  for k, v in sampler.items():
    guard.check_value(v, keys[k], f"sampler.{k}")
  if sampler.get("num_steps", 1) < 1:
    raise guard.ConfigError("sampler.num_steps", f" = {sampler['num_steps']}: expected an "
                            f"integer >= 1")
  if sampler.get("eta", 0.0) < 0:
    raise guard.ConfigError("sampler.eta", f" = {sampler['eta']}: expected a number >= 0")


@dataclasses.dataclass
class LdsCache:
  """A built cache, loaded: what every method is scored against.

  Attributes:
    spec: the spec it was built from.
    directory: where it lives.
    train_images: the N training images [N, H, W, C] (float32, [−1, 1]); for a
      latent benchmark (``spec.latent``) their latents [N, h, w, c], what every model
      trains on (the splits' query ``x`` are latents too).
    train_cond: their labels [N] for a conditional benchmark, else None.
    train_indices: their indices into the loaded dataset split [N].
    masks: subset membership [M, N].
    splits: ``QuerySet`` by split name (``validation``, ``test``, ``generated``),
      each with measurements y [Q, M, S].
    full_params: EMA parameters of the full-data model (the attributed model).
    apply_fn, init_fn: the model.
    draws: the K fixed draws of the measurement.
    timing: ``{stage: {"wall_s", "cpu_s"}}`` per build stage, summed over runs.
    memo: results the harness's methods share within one process (a fitted
      curvature, unlearned losses), keyed by the method's options; tied to this
      loaded cache, so nothing outlives it or leaks into another cache.
    latent_space: a latent benchmark's autoencoder space, else None.
    train_pixels: a latent benchmark's training images [N, H, W, C], else None.
    query_pixels: a latent benchmark's query images by split, for display: the
      held-out images themselves, the generated ones decoded; else None.
  """

  spec: LdsSpec
  directory: pathlib.Path
  train_images: np.ndarray
  train_indices: np.ndarray
  masks: np.ndarray
  splits: dict
  full_params: Params
  apply_fn: ApplyFn
  init_fn: Callable
  draws: draws_lib.Draws
  timing: dict
  train_cond: np.ndarray | None = None
  memo: dict = dataclasses.field(default_factory=dict, repr=False)
  latent_space: LatentSpace | None = None
  train_pixels: np.ndarray | None = None
  query_pixels: dict | None = None

  @property
  def train_options(self) -> dict:
    """The extra ``train_many`` arguments of the benchmark's recipe: the null class of
    condition dropout for a conditional benchmark."""
    return train_options(self.spec)

  @property
  def train_examples(self):
    """What the methods attribute to: the images, or ``(images, labels)`` when the
    benchmark is conditional."""
    return (self.train_images if self.train_cond is None
            else (self.train_images, self.train_cond))

  @property
  def schedule(self) -> Schedule:
    return self.spec.noise_schedule

  @property
  def train_config(self) -> TrainConfig:
    return self.spec.train_config


# ---------------------------------------------------------------------------------
# Paths and small file helpers
# ---------------------------------------------------------------------------------


def cache_dir(spec: LdsSpec, root: str | os.PathLike) -> pathlib.Path:
  """``<root>/<dataset>-<first 12 hex digits of the spec hash>``."""
  return pathlib.Path(root) / f"{spec.dataset}-{spec.digest()[:12]}"


class _Timer:
  """Wall-clock and process CPU seconds of a stage, added to ``timing.json`` on exit.

  CPU seconds (all threads) are recorded beside wall seconds because the machine
  may be shared: on an otherwise idle machine with c cores, wall ≈ CPU / c when
  XLA keeps every core busy.
  """

  def __init__(self, directory: pathlib.Path, stage: str):
    self.directory, self.stage = directory, stage

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    if exc[0] is not None:
      return False
    add_timing(self.directory, self.stage, time.perf_counter() - self.wall,
               time.process_time() - self.cpu)
    return False


def add_timing(directory: pathlib.Path, stage: str, wall: float, cpu: float) -> None:
  """Adds ``wall``/``cpu`` seconds to ``stage`` in ``directory/timing.json``."""
  path = directory / "timing.json"
  timing = json.loads(path.read_text()) if path.exists() else {}
  entry = timing.get(stage, {"wall_s": 0.0, "cpu_s": 0.0})
  entry["wall_s"] += wall
  entry["cpu_s"] += cpu
  timing[stage] = entry
  atomic.write_json(path, timing)


# ---------------------------------------------------------------------------------
# Model, data, draws
# ---------------------------------------------------------------------------------


def unet_config(spec: LdsSpec, image_shape: tuple[int, int, int]) -> models.UNetConfig:
  """The UNet that ``spec.model`` describes, for images of ``image_shape``."""
  fields = dict(spec.model)
  preset = fields.pop("preset", None)
  if preset is not None:
    config = models.config_by_name(preset)
    return dataclasses.replace(config, image_shape=tuple(image_shape), **fields)
  return models.UNetConfig(**{"image_shape": tuple(image_shape), **fields})


def _unet_from_spec(spec: LdsSpec, image_shape: tuple[int, int, int]):
  config = unet_config(spec, image_shape)
  return models.make_init_fn(config), models.make_apply_fn(config)


def load_data(spec: LdsSpec, data_dir=None):
  """The dataset split of ``spec``, resized and class-filtered as it asks."""
  ds = data_lib.load_dataset(spec.dataset, data_dir=data_dir, split=spec.data_split)
  if spec.classes is not None:
    ds = data_lib.filter_classes(ds, spec.classes)
  if spec.image_size is not None and ds.shape[:2] != (spec.image_size, spec.image_size):
    ds = data_lib.resize(ds, spec.image_size)
  return ds


def make_draws(spec: LdsSpec, image_shape) -> draws_lib.Draws:
  """The K fixed (t, ε) draws of the measurement."""
  return draws_lib.fixed_draws(jax.random.key(spec.draw_seed), spec.num_draws,
                               tuple(image_shape), spec.noise_schedule.num_timesteps,
                               timesteps=spec.draw_timesteps)


def sample_keys(spec: LdsSpec) -> jax.Array:
  """One sampler key per generated query: ``fold_in(key(sample_seed), j)``."""
  base = jax.random.key(spec.sample_seed)
  return jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(spec.num_generated))


def make_sample_fn(apply_fn: ApplyFn, spec: LdsSpec, image_shape, guidance_scale: float = 1.0
                   ) -> Callable[..., jax.Array]:
  """``sample_fn(params, key) -> image [H, W, C]``: the spec's sampler run on a batch of one.

  Sampling one image per key is what lets counterfactual retraining regenerate
  query j alone, from exactly the noise that produced it. For a conditional spec
  it is ``sample_fn(params, key, label)``, sampled for class ``label`` with
  classifier-free guidance at ``guidance_scale`` (the null class is label
  ``model.num_classes``).
  """
  sched, cfg = spec.noise_schedule, spec.train_config
  sampler = dict(spec.sampler)
  kind = sampler.pop("kind")
  run = samplers.ddim_sample if kind == "ddim" else samplers.ddpm_sample
  shape = (1,) + tuple(image_shape)

  def sample_fn(params, key):
    return run(apply_fn, params, sched, key, shape, parameterization=cfg.parameterization,
               **sampler)[0]

  def cond_sample_fn(params, key, label):
    cond = jnp.reshape(label, (1,)).astype(jnp.int32)
    null = None if guidance_scale == 1.0 else jnp.full((1,), spec.model["num_classes"],
                                                       jnp.int32)
    return run(apply_fn, params, sched, key, shape, parameterization=cfg.parameterization,
               cond=cond, guidance_scale=guidance_scale, null_cond=null, **sampler)[0]

  return cond_sample_fn if spec.conditional else sample_fn


def train_options(spec: LdsSpec) -> dict:
  """The extra ``train_many`` arguments of the spec's recipe: ``null_cond`` for a
  conditional benchmark (what condition dropout substitutes), none otherwise."""
  return {"null_cond": null_class(spec)} if spec.conditional else {}


def null_class(spec: LdsSpec) -> jax.Array:
  """ONE example's null condition of a conditional spec: the label ``model.num_classes``
  (what condition dropout substitutes, and guidance contrasts with)."""
  return jnp.int32(spec.model["num_classes"])


def generated_labels(spec: LdsSpec, train_labels) -> np.ndarray:
  """The class of generated sample j: the training set's classes in turn (j mod C)."""
  classes = np.unique(np.asarray(train_labels))
  return classes[np.arange(spec.num_generated) % classes.size].astype(np.int32)


def generate(apply_fn: ApplyFn, params: Params, spec: LdsSpec, keys: jax.Array,
             image_shape, labels=None, guidance_scale: float = 1.0) -> np.ndarray:
  """Sample j from ``keys[j]`` alone (``make_sample_fn``; for class ``labels[j]`` when the
  spec is conditional); returns [len(keys), H, W, C]."""
  fn = make_sample_fn(apply_fn, spec, image_shape, guidance_scale)
  if spec.conditional:
    return np.asarray(jax.jit(lambda ks, ys: jax.lax.map(lambda a: fn(params, *a), (ks, ys)))(
        keys, jnp.asarray(labels, jnp.int32)))
  return np.asarray(jax.jit(lambda ks: jax.lax.map(lambda k: fn(params, k), ks))(keys))


def abstract_state(init_fn, config: TrainConfig, num_members: int):
  optimizer = make_optimizer(config)
  one = jax.eval_shape(lambda k: init_state(init_fn(k), optimizer), member_keys(0)[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((num_members,) + a.shape, a.dtype), one)


def _finished_state(directory: pathlib.Path, init_fn, config: TrainConfig, num_members: int):
  """The stacked state of a finished train_many run in ``directory``, or None."""
  if checkpoint.latest_step(directory) != config.num_steps:
    return None
  state, _, _ = checkpoint.restore(directory, abstract_state(init_fn, config, num_members))
  return state


# ---------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------


def check_spec_record(path: pathlib.Path, record: dict) -> None:
  """Writes ``record`` (with a ``"digest"``) to ``path``, or checks the one there.

  A cache directory belongs to one spec: resuming it with another would mix the
  two, so a different saved digest raises and nothing is touched.
  """
  if path.exists():
    saved = json.loads(path.read_text())
    if saved.get("digest") != record["digest"]:
      raise ValueError(f"{path} holds a different spec (digest {saved.get('digest')}, "
                       f"expected {record['digest']}); remove the directory or use another root")
  else:
    atomic.write_json(path, record)


def build(spec: LdsSpec, root: str | os.PathLike, *, data_dir=None,
          model: tuple[Callable, ApplyFn] | None = None, strategy: str = "map",
          chunk_size: int | None = None, query_chunk: int = 64,
          progress: Progress | None = None) -> LdsCache:
  """Builds the cache of ``spec`` under ``root``, or loads it if it is there.

  Stages, each skipped when its output exists (module docstring): split and
  subsets; the full-data model; query images (generated from the full model);
  then per seed replicate r = 0..S−1, the M subset models and their measurements.
  The measurements y[q, j, r] are ``jattr.eval.measure.measure_loss`` of the EMA
  parameters over the spec's fixed draws.

  Args:
    spec: the benchmark definition.
    root: the folder holding caches.
    data_dir: data directory for non-embedded datasets (not part of the hash).
    model: ``(init_fn, apply_fn)`` to use instead of the UNet of ``spec.model``
      (``spec.model`` should then describe it, since it is what gets hashed).
    strategy, chunk_size: how ``train_many`` runs the member axis; they do not
      change the models, so they are not part of the hash.
    query_chunk: queries per measurement call.
    progress: ``jattr.progress`` callback for the trainings.

  Returns:
    The loaded ``LdsCache``.
  """
  ds = load_data(spec, data_dir)  # before any write: an unknown dataset leaves nothing
  spec.model_shape(ds.shape)  # a latent spec's autoencoder must take these images
  directory = cache_dir(spec, root)
  args = (spec, directory, ds, model, strategy, chunk_size, query_chunk, progress)
  if _is_complete(directory, spec):  # only reads: no lock, so many scorers may share it
    return _build(*args)
  with DirectoryLock(directory, "LDS cache"):  # one builder at a time
    return _build(*args)


def _is_complete(directory: pathlib.Path, spec: LdsSpec) -> bool:
  names = ["spec.json", DATA_RECORD, "split.npz", "queries.npz",
           *(f"y/replicate_{r}.npz" for r in range(spec.num_seeds)),
           *(() if spec.latent is None else (AUTOENCODER_FILE,))]
  return all((directory / n).exists() for n in names)


def check_data_record(path: pathlib.Path, train_images: np.ndarray) -> None:
  """Records the sha256 of the training images a cache was built from, or checks it.

  The data directory is not part of the spec hash (the same benchmark may live in
  different places), so the images themselves are fingerprinted: a cache reused
  with a different copy, order or version of the dataset is refused, naming both
  fingerprints, instead of silently pairing its trained models with other images.
  A cache built before the fingerprint existed records it on first use.
  """
  digest = array_hash(np.asarray(train_images, np.float32))
  if path.exists():
    saved = json.loads(path.read_text()).get("train_images_sha256")
    if saved != digest:
      raise ValueError(
          f"the LDS cache {path.parent} was built from other training images: its record "
          f"{path.name} has sha256 {str(saved)[:16]}…, the data loaded now hashes to "
          f"{digest[:16]}… (a different copy, order or version of the dataset at data_dir?). "
          "Point data_dir at the data the cache was built from, or use another cache_root")
  else:
    atomic.write_json(path, {"train_images_sha256": digest,
                             "num_train": int(np.shape(train_images)[0])})


def _autoencoder(path: pathlib.Path, latent: LatentConfig, images: np.ndarray, progress):
  """``(AutoencoderConfig, params)`` of a latent benchmark: read from ``path``, or
  trained (``LatentConfig.fit``, deterministic) and written there when ``path`` is
  missing or holds another autoencoder (of other images or another config)."""
  record = {"latent": latent.to_dict(), "scaling": LATENT_SCALING,
            "images_sha256": array_hash(np.asarray(images, np.float32))}
  if path.is_file():
    with np.load(path, allow_pickle=False) as z:
      config, params, saved = unpack_autoencoder(z)
    if saved == record:
      return config, params
  with _Timer(path.parent, "autoencoder"):
    config, params, losses = latent.fit(images, progress=progress)
    atomic.write_npz(path, **pack_autoencoder(config, params, record, losses))
  return config, params


def _build(spec: LdsSpec, directory: pathlib.Path, ds, model, strategy, chunk_size,
           query_chunk, progress) -> LdsCache:
  directory.mkdir(parents=True, exist_ok=True)
  check_spec_record(directory / "spec.json",
                    {"version": FORMAT_VERSION, "digest": spec.digest(), "spec": spec.to_dict()})
  config, sched = spec.train_config, spec.noise_schedule
  image_shape = spec.model_shape(ds.shape)  # the latents' for a latent benchmark
  init_fn, apply_fn = model if model is not None else _unet_from_spec(spec, image_shape)
  draws = make_draws(spec, image_shape)

  # Stage 1: split and subsets.
  split_path = directory / "split.npz"
  if not split_path.exists():
    train_idx, val_idx, test_idx = data_lib.split_indices(
        len(ds), [spec.num_train, spec.num_validation, spec.num_test], spec.split_seed)
    masks = subset_masks(spec.num_train, spec.num_subsets, spec.alpha, spec.subset_seed)
    # Write-then-rename (jattr.io.atomic): a build killed mid-write never leaves a
    # half file that a resumed build would take for a finished stage.
    atomic.write_npz(split_path, train=train_idx, validation=val_idx, test=test_idx, masks=masks)
  split = dict(np.load(split_path))
  train_images = ds.x[split["train"]]
  masks = split["masks"]
  check_data_record(directory / DATA_RECORD, train_images)
  space, train_pixels = None, None
  if spec.latent is not None:  # Stage 1b: the autoencoder, and the training latents
    space = autoencoder_space(*_autoencoder(directory / AUTOENCODER_FILE, spec.latent_config,
                                            train_images, progress))
    train_pixels, train_images = train_images, encode_images(space, train_images)
  train_cond = None
  train_data = train_images
  if spec.conditional:
    train_cond = np.asarray(ds.y[split["train"]], np.int32)
    num_classes = spec.model["num_classes"]
    if train_cond.min() < 0 or train_cond.max() >= num_classes:
      raise ValueError(f"the training labels lie in [{train_cond.min()}, {train_cond.max()}] "
                       f"but model.num_classes = {num_classes}: expected labels in "
                       f"[0, {num_classes})")
    train_data = (train_images, train_cond)
  cond_opts = train_options(spec)

  # Stage 2: the full-data model.
  full_dir = directory / "full"
  state = _finished_state(full_dir, init_fn, config, 1)
  if state is None:
    with _Timer(directory, "full_model"):
      state = train_many(apply_fn, init_fn, sched, train_data,
                         np.ones((1, spec.num_train), bool), [spec.full_seed], config,
                         strategy=strategy, chunk_size=chunk_size, **cond_opts,
                         checkpointer=checkpoint.Checkpointer(full_dir),
                         meta={"lds_cache": spec.digest()}, progress=progress).state
  full_params = jax.tree.map(lambda a: a[0], state.ema_params)

  # Stage 3: query images.
  queries_path = directory / "queries.npz"
  names = SPLITS + spec.generated_splits[1:]
  if not queries_path.exists():
    with _Timer(directory, "generate"):
      keys = sample_keys(spec)
      arrays = dict(validation=ds.x[split["validation"]], test=ds.x[split["test"]],
                    generated_keys=np.asarray(jax.random.key_data(keys)))
      if space is not None:  # the held-out latents; the images kept for display
        for name in ("validation", "test"):
          arrays[f"{name}_pixels"] = arrays[name]
          arrays[name] = encode_images(space, arrays[name])
      labels = generated_labels(spec, train_cond) if spec.conditional else None
      for name, scale in zip(spec.generated_splits, spec.guidance_scales):
        arrays[name] = (generate(apply_fn, full_params, spec, keys, image_shape, labels, scale)
                        if spec.num_generated else np.zeros((0,) + image_shape, np.float32))
        if spec.conditional:
          arrays[f"{name}_y"] = labels
        if space is not None:
          arrays[f"{name}_pixels"] = decode_latents(space, arrays[name], image_shape=ds.shape)
      if spec.conditional:
        arrays["validation_y"] = np.asarray(ds.y[split["validation"]], np.int32)
        arrays["test_y"] = np.asarray(ds.y[split["test"]], np.int32)
      atomic.write_npz(queries_path, **arrays)
  qz = dict(np.load(queries_path))
  all_queries = np.concatenate([qz[s] for s in names])
  bounds = np.cumsum([0] + [qz[s].shape[0] for s in names])
  if spec.conditional:  # each query measured under its own label
    all_queries = (all_queries, np.concatenate([qz[f"{s}_y"] for s in names]))

  # Stage 4: seed replicates of the subset models, and their measurements.
  (directory / "y").mkdir(exist_ok=True)
  measure = member_measure_fn(apply_fn, sched, draws, parameterization=config.parameterization,
                              query_chunk=query_chunk)
  ys = []
  for r in range(spec.num_seeds):
    y_path = directory / "y" / f"replicate_{r}.npz"
    if not y_path.exists():
      model_dir = directory / "models" / f"replicate_{r}"
      state = _finished_state(model_dir, init_fn, config, spec.num_subsets)
      if state is None:
        with _Timer(directory, f"train_replicate_{r}"):
          state = train_many(apply_fn, init_fn, sched, train_data, masks,
                             [r] * spec.num_subsets, config, strategy=strategy,
                             chunk_size=chunk_size, **cond_opts,
                             checkpointer=checkpoint.Checkpointer(model_dir),
                             meta={"lds_cache": spec.digest(), "replicate": r},
                             progress=progress).state
      with _Timer(directory, f"measure_replicate_{r}"):
        y = np.asarray(measure(state.ema_params, jax.tree.map(jnp.asarray, all_queries)),
                       np.float64)
        atomic.write_npz(y_path, y=y)
    ys.append(np.load(y_path)["y"])
  y_all = np.stack(ys, axis=-1)  # [Q_total, M, S]

  splits = {}
  for s, a, b in zip(names, bounds[:-1], bounds[1:]):
    keys = qz["generated_keys"] if s.startswith("generated") else None
    splits[s] = QuerySet(Queries(s, qz[s], keys, qz.get(f"{s}_y")), y_all[a:b])
  timing_path = directory / "timing.json"
  timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
  query_pixels = None if space is None else {s: qz[f"{s}_pixels"] for s in names}
  return LdsCache(spec=spec, directory=directory, train_images=train_images,
                  train_indices=split["train"], masks=masks, splits=splits,
                  full_params=full_params, apply_fn=apply_fn, init_fn=init_fn, draws=draws,
                  timing=timing, train_cond=train_cond, latent_space=space,
                  train_pixels=train_pixels, query_pixels=query_pixels)


def load_spec(path: str | os.PathLike) -> LdsSpec:
  """Reads an ``LdsSpec`` from a JSON file (the ``spec`` entry of a config, or a bare spec)."""
  d = json.loads(pathlib.Path(path).read_text())
  return LdsSpec.from_dict(d.get("spec", d))


def save_report(path: str | os.PathLike, record: dict) -> None:
  """Writes a results record (JSON) atomically, creating parent folders."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_json(path, record)


def cache_summary(cache: LdsCache) -> dict[str, Any]:
  """A JSON-able summary: spec hash, sizes, noise ceilings, build times."""
  out = {"directory": str(cache.directory), "digest": cache.spec.digest(),
         "num_train": int(cache.masks.shape[1]), "num_subsets": int(cache.masks.shape[0]),
         "num_seeds": cache.spec.num_seeds, "timing_s": cache.timing, "ceilings": {}}
  for name, qs in cache.splits.items():
    if qs.y.shape[0] and qs.y.shape[-1] >= 2:
      c = noise_ceiling(qs.y)
      full = float(spearman_brown(c.mean)) if c.mean > 0 else None
      out["ceilings"][name] = {"split_half": c.mean, "ci": [c.ci_low, c.ci_high],
                               "spearman_brown_full": full}
  out["build_wall_s"] = float(sum(v["wall_s"] for v in cache.timing.values()))
  out["build_cpu_s"] = float(sum(v["cpu_s"] for v in cache.timing.values()))
  return out
