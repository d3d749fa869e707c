"""The configuration of a run directory: what model, data, recipe and attribution.

``RunConfig`` is what ``config.json`` of a run holds (``jattr.runs.run``);
``load_config`` reads one from a JSON file, ``model`` given as a preset name or as
``UNetConfig`` fields.

Every key is checked before anything runs (``jattr.io.guard``): an unknown key is
refused with the nearest valid one (``train.num_step`` → ``train.num_steps``), a
value of the wrong type (``"num_train": "48"``, ``"num_steps": 4.5``, ``true`` for an
integer) or out of range (``num_train: 0``) is refused naming the file, the key, the
value and what is expected. A config built in Python is held to the same checks
(``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Literal

from jattr.data import dataset_source
from jattr.diffusion import Schedule
from jattr.diffusion.measurements import MEASUREMENTS
from jattr.io import guard
from jattr.models import UNetConfig, config_by_name
from jattr.models.unet import config_record
from jattr.models.autoencoder import LatentConfig
from jattr.train import TrainConfig

QUERIES = ("samples", "test", "train")
"""What a run's workflows can attribute or featurize: its generated ``samples.npz``,
held-out real images (``test``) or its own training images."""
ATTRIBUTION_MEASUREMENTS = tuple(m for m in MEASUREMENTS if m != "loss_at_time")
ATTRIBUTION_METHODS = ("sketch_ggn", "trak")
SKETCH_NONZEROS = 4
"""Non-zeros per row of the sketch's sparse projection (the digits benchmark's)."""
"""Output functions ``AttributionConfig`` takes (``loss_at_time`` needs a time it has
no field for; ``jattr featurize --measurement loss_at_time --time T`` does)."""


@dataclasses.dataclass(frozen=True)
class AttributionConfig:
  """How ``jattr run`` / ``attribute_run`` attributes the generated samples.

  Attributes:
    method: ``"sketch_ggn"`` (the default): influence with the sketched GGN
      (``jattr.curvature.fit_sketched_ggn``), τ = φ_qᵀ(G_k + λI)⁻¹φ_i on features
      φ = Pᵀ∇ℓ of the loss (both sides), P sparse (4 non-zeros per row) to
      ``sketch_dim``, ``sketch_samples`` rows per (example, draw), λ =
      ``damping_factor`` × the mean eigenvalue of G_k. ``"trak"``: TRAK / D-TRAK
      with ``measurement``, the ``proj_*`` projection and ``relative_damping``. A
      run directory whose config has no ``method`` was made before the sketch
      existed; it is attributed with the default, the sketch (``jattr attribute``).
    measurement: TRAK's output function f (``jattr.diffusion.measurements``);
      ``"square_norm"`` is D-TRAK, ``"loss"`` plain TRAK.
    num_draws: K fixed (t, ε) draws f is averaged over.
    timesteps: ``"uniform"`` or ``"random"`` draw timesteps.
    draw_seed: seed of the draws.
    proj_dim: k, the random-projection dimension.
    proj_kind: ``"rademacher"``, ``"gaussian"`` or ``"sparse"`` (``nonzeros``
      non-zeros per row of P: P·s adds per example instead of 2·P·k flops).
    proj_seed: seed of the projection.
    proj_nonzeros: s of the ``"sparse"`` projection (k a multiple of s); left out
      of ``config.json`` for the dense kinds.
    sketch_dim: k of the sketch.
    sketch_samples: S of the sketch.
    sketch_examples: G_k is fitted on a random subset of this many training examples
      (seed ``draw_seed``; None: all of them), to bound the fit's cost: each example
      costs K·S backward passes. The features and scores cover every example.
    damping_factor: the sketch's λ / mean eigenvalue of G_k (None: 0.1, the library
      default of every curvature).
    relative_damping: TRAK damping λ as a fraction c of the mean eigenvalue of ΦᵀΦ;
      ``None`` (the default): the effective-dimension rule of
      ``jattr.methods.trak.effective_dimension_damping`` (λ at which the kernel's
      effective dimension is a quarter of its rank).
    chunk_size: examples whose gradients exist at once.
    top_k: training images shown per sample.
    wrt: a regular expression on parameter paths (``jattr.wrt``): attribute with
      respect to the matching parameters only, the others held fixed; ``None``: all.
      Left out of ``config.json`` when ``None``, so run directories made before the
      field existed keep their config.
  """

  method: Literal["sketch_ggn", "trak"] = "sketch_ggn"
  measurement: str = "square_norm"
  num_draws: int = 10
  timesteps: Literal["uniform", "random"] = "uniform"
  draw_seed: int = 0
  proj_dim: int = 2048
  proj_kind: Literal["rademacher", "gaussian", "sparse"] = "rademacher"
  proj_seed: int = 0
  proj_nonzeros: int = 2
  sketch_dim: int = 2048
  sketch_samples: int = 4
  sketch_examples: int | None = 512
  damping_factor: float | None = None
  relative_damping: float | None = None
  chunk_size: int = 128
  top_k: int = 8
  wrt: str | None = None

  def __post_init__(self):
    guard.check_fields(self)
    guard.one_of(self, "measurement", ATTRIBUTION_MEASUREMENTS)
    guard.one_of(self, "method", ATTRIBUTION_METHODS)
    for name in ("num_draws", "proj_dim", "chunk_size", "top_k", "sketch_dim", "sketch_samples"):
      guard.at_least(self, name, 1)
    guard.at_least(self, "sketch_examples", 1, optional=True)
    if self.sketch_dim % SKETCH_NONZEROS:
      raise guard.ConfigError("sketch_dim", f" = {self.sketch_dim}: expected a multiple of "
                              f"{SKETCH_NONZEROS} (the sketch's sparse projection)",
                              "AttributionConfig")
    if self.damping_factor is not None and not self.damping_factor > 0:
      raise guard.ConfigError("damping_factor", f" = {self.damping_factor}: expected null or "
                              "a number > 0", "AttributionConfig")
    guard.at_least(self, "relative_damping", 0, optional=True)
    guard.at_least(self, "proj_nonzeros", 1)
    if self.proj_kind == "sparse" and self.proj_dim % self.proj_nonzeros:
      raise guard.ConfigError("proj_dim", f" = {self.proj_dim}: expected a multiple of "
                              f"proj_nonzeros = {self.proj_nonzeros} (the sparse projection "
                              "has one non-zero in each of proj_nonzeros column blocks)",
                              "AttributionConfig")
    if self.wrt is not None:
      try:
        re.compile(self.wrt)
      except re.error as e:
        raise guard.ConfigError("wrt", f" = {guard.show(self.wrt)}: not a regular expression "
                                f"({e})", "AttributionConfig") from None


DEFAULT_ATTRIBUTION = AttributionConfig()
SKETCH_FIELDS = ("method", "sketch_dim", "sketch_samples", "sketch_examples",
                 "damping_factor")
"""Left out of ``config.json`` at their defaults, so run directories made before the
sketch keep their config."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines a trained model.

  Attributes:
    dataset: a ``jattr.data.load_dataset`` name, or the path of your own data (an
      image folder, an ``.npz`` or ``.npy`` file; ``jattr.data.dataset_source``), which
      must exist when the config is made and is recorded in config.json as given.
    data_dir: folder of the real datasets (None: ``$JATTR_DATA``; digits needs none).
    num_train: train on a seeded random subset of this size (None: all).
    subset_seed: seed of that subset.
    image_size: resize images to this square size (None: native).
    model: the UNet (a preset's config, possibly edited).
    schedule: ``"linear"`` or ``"cosine"``.
    num_timesteps: T.
    train: the optimisation recipe.
    seed: model seed; ``member_keys(seed)`` gives its init and training keys.
    num_samples, sampler, sampler_steps, sample_seed: what ``jattr sample`` makes.
    guidance_scale: classifier-free guidance scale of the samples of a
      class-conditional run (``model.num_classes`` set: the run trains on (image,
      label) pairs, sample j is drawn for class j mod C, and the report shows the
      classes); 1 is plain conditional sampling.

    latent: latent diffusion (``jattr run --latent``): the autoencoder
      (``jattr.models.autoencoder.LatentConfig``) that ``train_run`` trains first on
      the training images; the UNet is then trained, sampled and attributed on their
      latents, so ``model.image_shape`` must be the latent shape (H/f, W/f, c). None
      (the default, left out of ``config.json``): pixel space.

  A run is class-conditional exactly when ``model.num_classes`` is set
  (``jattr run --conditional``); the two combine.
  """

  dataset: str = "digits"
  data_dir: str | None = None
  num_train: int | None = None
  subset_seed: int = 0
  image_size: int | None = None
  model: UNetConfig = dataclasses.field(default_factory=lambda: config_by_name("digits"))
  schedule: Literal["linear", "cosine"] = "linear"
  num_timesteps: int = 1000
  train: TrainConfig = TrainConfig()
  seed: int = 0
  num_samples: int = 64
  sampler: Literal["ddpm", "ddim"] = "ddpm"
  sampler_steps: int = 100
  sample_seed: int = 0
  attribution: AttributionConfig = AttributionConfig()
  guidance_scale: float = 1.0
  latent: LatentConfig | None = None

  def __post_init__(self):
    guard.check_fields(self)
    try:  # a built-in name, or the path of an existing image folder / .npz / .npy
      dataset_source(self.dataset)
    except ValueError as e:
      raise guard.ConfigError("dataset", f" = {guard.show(self.dataset)}: {e}",
                              "RunConfig") from None
    guard.at_least(self, "num_train", 1, optional=True)
    guard.at_least(self, "image_size", 1, optional=True)
    guard.at_least(self, "subset_seed", 0)  # numpy's generators take no negative seed
    for name in ("num_timesteps", "num_samples", "sampler_steps"):
      guard.at_least(self, name, 1)
    guard.at_least(self, "guidance_scale", 0.0)
    if self.guidance_scale != 1.0 and not self.conditional:
      raise guard.ConfigError("guidance_scale", f" = {self.guidance_scale}: guidance needs a "
                              "class-conditional model (model.num_classes)", "RunConfig")
    if self.model.cond_dim is not None:
      raise guard.ConfigError("model.cond_dim", f" = {self.model.cond_dim}: a run trains on "
                              "a dataset's images and labels; embedding conditions (cond_dim) "
                              "are for the library (jattr.models)", "RunConfig")
    if self.attribution.num_draws > self.num_timesteps:
      raise guard.ConfigError("attribution.num_draws", f" = {self.attribution.num_draws}: "
                              f"expected at most num_timesteps = {self.num_timesteps}",
                              "RunConfig")

  def to_json(self) -> dict:
    d = json.loads(json.dumps(dataclasses.asdict(self)))
    if d["attribution"].get("wrt") is None:  # the config of runs made before the field
      del d["attribution"]["wrt"]
    for name in SKETCH_FIELDS:  # at their defaults: the config runs had before the sketch
      if d["attribution"][name] == getattr(DEFAULT_ATTRIBUTION, name):
        del d["attribution"][name]
    if d["attribution"]["proj_kind"] != "sparse":  # as before the sparse kind existed
      del d["attribution"]["proj_nonzeros"]
    if d["guidance_scale"] == 1.0:  # as before guidance existed
      del d["guidance_scale"]
    d["model"] = json.loads(json.dumps(config_record(self.model)))  # as before conditioning
    if d["train"]["cond_dropout"] == 0.0:
      del d["train"]["cond_dropout"]
    if d["latent"] is None:  # pixel runs keep the config they had
      del d["latent"]
    return d

  @property
  def conditional(self) -> bool:
    """Class-conditional: the model takes each image's label (``model.num_classes``)."""
    return self.model.num_classes is not None

  @classmethod
  def from_json(cls, d: dict, where: str | None = None) -> "RunConfig":
    """A RunConfig from its JSON form, every key and type checked (``jattr.io.guard``).

    Args:
      d: the JSON object; ``model`` may be a preset name.
      where: the file it came from, named in every error.

    Raises:
      ValueError (``jattr.io.guard.ConfigError``): an unknown key (with the nearest
        valid one), a missing one, a wrong type or a value out of range.
    """
    if isinstance(d, dict) and isinstance(d.get("model"), str):
      try:
        d = {**d, "model": config_by_name(d["model"])}
      except ValueError as e:
        raise guard.ConfigError("model", f" = {guard.show(d['model'])}: {e}", where) from None
    return guard.from_dict(cls, d, where=where)

  @property
  def noise_schedule(self) -> Schedule:
    return Schedule(self.schedule, self.num_timesteps)


def load_config(path: str | os.PathLike) -> RunConfig:
  """Reads a RunConfig from JSON (``model`` may be a preset name).

  Raises:
    FileNotFoundError: no such file.
    ValueError: invalid JSON (line and column), or a key ``RunConfig.from_json``
      refuses; the message names the file.
  """
  return RunConfig.from_json(guard.read_json(path, "RunConfig file"), where=str(path))
