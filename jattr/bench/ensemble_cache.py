"""An encoded ensemble trained beside an LDS cache: built once, resumable, keyed by its spec.

The members use the LDS benchmark's data, architecture and recipe (the ``LdsSpec``
of the cache) and the split design of an ``EnsembleSpec``; they live inside the
LDS cache directory, under a name that hashes both specs:

    <lds cache>/ensembles/<design>-<group_by>-m<M>-<hash>/
        spec.json            the ensemble spec, the LDS spec digest, the format version
        design.npz           the design A [M, N] (``jattr.methods.ensembles.design_splits``)
        members/             train_many checkpoint of the M members (resumable)
        y_k<K>_d<seed>.npz   each member's loss on every query split of the cache,
                             y [Q, M] per split name, over K fixed draws of ``seed``
        timing.json          wall-clock and CPU seconds per stage, summed over runs

Every member has the same training seed (common random numbers: members differ by
their data only), chosen apart from the LDS cache's seeds (replicates 0..S−1, full
model 0) so that the ensemble's models share no noise stream with the models it
is judged against.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattr.diffusion import draws as draws_lib
from jattr.bench import lds_cache
from jattr.eval.measure import member_measure_fn
from jattr.io import atomic, checkpoint
from jattr.io.lock import DirectoryLock
from jattr.methods import ensembles
from jattr.progress import Progress
from jattr.train import train_many
from jattr.types import Params

FORMAT_VERSION = 1
GROUP_BY = ("example", "class")


@dataclasses.dataclass(frozen=True)
class EnsembleSpec:
  """What defines an ensemble beside an LDS cache (its hash names the directory).

  Attributes:
    num_members: M.
    design: ``"binary_code"`` or ``"random_half"`` (``design_splits``).
    design_seed: seed of the design.
    group_by: ``"example"`` (groups of ``group_size`` consecutive training
      examples) or ``"class"`` (one group per label, for forgetting a class).
    group_size: examples per group when ``group_by == "example"``.
    seed: the training seed of every member.
  """

  num_members: int = 32
  design: str = "binary_code"
  design_seed: int = 0
  group_by: str = "example"
  group_size: int = 1
  seed: int = 2

  def __post_init__(self):
    if self.design not in ensembles.DESIGNS:
      raise ValueError(f"EnsembleSpec.design must be one of {ensembles.DESIGNS}, got "
                       f"{self.design!r}")
    if self.group_by not in GROUP_BY:
      raise ValueError(f"EnsembleSpec.group_by must be one of {GROUP_BY}, got {self.group_by!r}")
    if int(self.num_members) < 2:
      raise ValueError(f"EnsembleSpec.num_members must be >= 2, got {self.num_members}")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def digest(self, lds_digest: str) -> str:
    """sha256 of this spec and the LDS spec it extends."""
    record = {"ensemble": self.to_dict(), "lds": lds_digest, "version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class Ensemble(NamedTuple):
  """A trained ensemble, loaded.

  Attributes:
    spec: its ``EnsembleSpec``.
    directory: where it lives.
    masks: the design A, boolean [M, N] over the LDS cache's training set.
    params: the members' EMA parameters, every leaf with a leading axis M.
    timing: ``{stage: {"wall_s", "cpu_s"}}``, summed over runs.
  """

  spec: EnsembleSpec
  directory: pathlib.Path
  masks: np.ndarray
  params: Params
  timing: dict


def ensemble_dir(cache: lds_cache.LdsCache, spec: EnsembleSpec) -> pathlib.Path:
  """``<cache>/ensembles/<design>-<group_by>-m<M>-<hash12>``."""
  name = (f"{spec.design}-{spec.group_by}-m{spec.num_members}-"
          f"{spec.digest(cache.spec.digest())[:12]}")
  return cache.directory / "ensembles" / name


def train_labels(cache: lds_cache.LdsCache, data_dir=None) -> np.ndarray:
  """Class labels of the cache's training examples, [N]."""
  ds = lds_cache.load_data(cache.spec, data_dir)
  return np.asarray(ds.y)[cache.train_indices]


def build(cache: lds_cache.LdsCache, spec: EnsembleSpec, *, strategy: str = "map",
          chunk_size: int | None = None, data_dir=None,
          progress: Progress | None = None) -> Ensemble:
  """Trains (or resumes, or loads) the ensemble of ``spec`` beside ``cache``.

  Args:
    cache: the LDS cache whose data and recipe the members share.
    spec: the ensemble.
    strategy, chunk_size: ``train_many``'s member axis (not part of the hash).
    data_dir: data directory, for the labels when ``group_by == "class"``.
    progress: ``jattr.progress`` callback for the training.

  Returns:
    The loaded ``Ensemble``.
  """
  directory = ensemble_dir(cache, spec)
  done = (checkpoint.latest_step(directory / "members") == cache.train_config.num_steps
          and (directory / "design.npz").exists())
  if done:  # only reads: no lock
    return _build(cache, spec, directory, strategy, chunk_size, data_dir, progress)
  with DirectoryLock(directory, "ensemble"):  # one trainer at a time
    return _build(cache, spec, directory, strategy, chunk_size, data_dir, progress)


def _build(cache, spec, directory, strategy, chunk_size, data_dir, progress) -> Ensemble:
  directory.mkdir(parents=True, exist_ok=True)
  record = {"version": FORMAT_VERSION, "ensemble": spec.to_dict(),
            "lds_digest": cache.spec.digest(), "digest": spec.digest(cache.spec.digest())}
  lds_cache.check_spec_record(directory / "spec.json", record)

  n = cache.train_images.shape[0]
  design_path = directory / "design.npz"
  if design_path.exists():
    masks = np.load(design_path)["masks"]
  else:
    groups = train_labels(cache, data_dir) if spec.group_by == "class" else None
    masks = ensembles.design_splits(n, spec.num_members, spec.design, seed=spec.design_seed,
                                    group_size=spec.group_size, groups=groups)
    atomic.write_npz(design_path, masks=masks)

  config = cache.train_config
  model_dir = directory / "members"
  done = checkpoint.latest_step(model_dir) == config.num_steps
  wall, cpu = time.perf_counter(), time.process_time()
  res = train_many(cache.apply_fn, cache.init_fn, cache.schedule, cache.train_examples, masks,
                   [spec.seed] * spec.num_members, config, strategy=strategy,
                   chunk_size=chunk_size, checkpointer=checkpoint.Checkpointer(model_dir),
                   meta={"ensemble": record["digest"]}, progress=progress,
                   **cache.train_options)
  if not done:
    lds_cache.add_timing(directory, "train_members", time.perf_counter() - wall,
                         time.process_time() - cpu)
  timing_path = directory / "timing.json"
  timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
  return Ensemble(spec=spec, directory=directory, masks=masks, params=res.state.ema_params,
                  timing=timing)


def measure_splits(ensemble: Ensemble, cache: lds_cache.LdsCache, *, num_draws: int = 100,
                   draw_seed: int = 1, timesteps: str = "uniform",
                   query_chunk: int = 64) -> dict[str, np.ndarray]:
  """y [Q, M]: each member's loss on each query split of the cache, cached on disk.

      y[q, m] = 1/K Σ_k ℓ(θ_m; x_q, t_k, ε_k)      (``jattr.eval.measure.measure_loss``)

  over K draws of ``draw_seed`` (default 1: not the benchmark's measurement draws,
  which a method must not see).

  Returns:
    ``{split name: y float64 [Q, M]}``.
  """
  path = ensemble.directory / f"y_k{num_draws}_d{draw_seed}_{timesteps}.npz"
  names = [s for s in lds_cache.SPLITS if s in cache.splits]
  if path.exists():
    with np.load(path) as z:
      return {s: np.asarray(z[s]) for s in names}
  shape = tuple(cache.train_images.shape[1:])
  draws = draws_lib.fixed_draws(jax.random.key(draw_seed), num_draws, shape,
                                cache.schedule.num_timesteps, timesteps=timesteps)
  fn = member_measure_fn(cache.apply_fn, cache.schedule, draws,
                         parameterization=cache.train_config.parameterization,
                         query_chunk=query_chunk)
  wall, cpu = time.perf_counter(), time.process_time()
  queries = jnp.asarray(np.concatenate([cache.splits[s].queries.images for s in names]))
  if cache.spec.conditional:
    queries = (queries, jnp.asarray(np.concatenate([cache.splits[s].queries.cond
                                                    for s in names])))
  y = np.asarray(fn(ensemble.params, queries), np.float64)
  bounds = np.cumsum([0] + [cache.splits[s].queries.images.shape[0] for s in names])
  out = {s: y[a:b] for s, a, b in zip(names, bounds[:-1], bounds[1:])}
  atomic.write_npz(path, **out)
  lds_cache.add_timing(ensemble.directory, f"measure_k{num_draws}",
                       time.perf_counter() - wall, time.process_time() - cpu)
  return out
