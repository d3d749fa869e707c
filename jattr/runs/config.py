"""The configuration of a run directory: what model, data, recipe and attribution.

``RunConfig`` is what ``config.json`` of a run holds (``jattr.runs.run``);
``load_config`` reads one from a JSON file, ``model`` given as a preset name or as
``UNetConfig`` fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal

from jattr.diffusion import Schedule
from jattr.models import UNetConfig, config_by_name
from jattr.train import TrainConfig

QUERIES = ("samples", "test", "train")
"""What a run's workflows can attribute or featurize: its generated ``samples.npz``,
held-out real images (``test``) or its own training images."""


@dataclasses.dataclass(frozen=True)
class AttributionConfig:
  """How ``jattr run`` / ``attribute_run`` attributes the generated samples.

  Attributes:
    measurement: the output function f (``jattr.diffusion.measurements``);
      ``"square_norm"`` is D-TRAK, ``"loss"`` plain TRAK.
    num_draws: K fixed (t, ε) draws f is averaged over.
    timesteps: ``"uniform"`` or ``"random"`` draw timesteps.
    draw_seed: seed of the draws.
    proj_dim: k, the random-projection dimension.
    proj_kind: ``"rademacher"`` or ``"gaussian"``.
    proj_seed: seed of the projection.
    relative_damping: TRAK damping λ as a fraction of the mean eigenvalue of ΦᵀΦ.
    chunk_size: examples whose gradients exist at once.
    top_k: training images shown per sample.
  """

  measurement: str = "square_norm"
  num_draws: int = 10
  timesteps: Literal["uniform", "random"] = "uniform"
  draw_seed: int = 0
  proj_dim: int = 2048
  proj_kind: Literal["rademacher", "gaussian"] = "rademacher"
  proj_seed: int = 0
  relative_damping: float = 1e-3
  chunk_size: int = 128
  top_k: int = 8


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines a trained model.

  Attributes:
    dataset: a ``jattr.data.load_dataset`` name.
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

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_json(cls, d: dict) -> "RunConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown RunConfig keys {sorted(unknown)}; expected some of {sorted(known)}")
    if isinstance(d.get("model"), str):
      d["model"] = config_by_name(d["model"])
    elif isinstance(d.get("model"), dict):
      d["model"] = UNetConfig(**d["model"])
    if isinstance(d.get("train"), dict):
      d["train"] = TrainConfig(**d["train"])
    if isinstance(d.get("attribution"), dict):
      d["attribution"] = AttributionConfig(**d["attribution"])
    return cls(**d)

  @property
  def noise_schedule(self) -> Schedule:
    return Schedule(self.schedule, self.num_timesteps)


def load_config(path: str | os.PathLike) -> RunConfig:
  """Reads a RunConfig from JSON (``model`` may be a preset name)."""
  with open(path) as f:
    return RunConfig.from_json(json.load(f))
