"""Train M denoisers on M subsets of one dataset as one compiled program.

Member m is defined by a subset S_m of the training set and a seed s_m. Its keys are
``member_keys(s_m) = (init_key, train_key)``; it starts from ``init_fn(init_key)``
and trains exactly as ``jattr.train.train(apply_fn, init_fn(init_key), ...,
train_key, indices=S_m)`` would. Members sharing a seed share their initialisation
and their whole stream of batch positions, timesteps and noise (common random
numbers), so they differ only through their subsets — what makes LDS retraining
measurable. Give distinct seeds to get independent retrainings.

How the member axis runs is a *strategy*:

- ``"vmap"``: all members batched into one program. Fast where batching is cheap
  (GPUs/TPUs, dense layers); on XLA:CPU a vmapped conv becomes a grouped
  convolution, which runs several times slower than the same convs one by one.
- ``"map"``: members one after another inside the program (``lax.map``).
- ``"chunked"``: ``lax.map`` over chunks of ``chunk_size`` members, vmapped inside.
- ``"auto"``: times a short segment of ``"map"`` and ``"vmap"`` on this backend and
  model and keeps the faster (the choice is logged and returned).

Conditional data ``(images, cond)`` are shared by all members like the images
(closed over, never mapped): each member's batch takes the condition rows of its
picked images, and condition dropout (``TrainConfig.cond_dropout``) draws its mask
from the member's step key, so members sharing a seed also drop the same batch
positions' conditions (``jattr.train.loop``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jattr import devices
from jattr.diffusion import conditioning
from jattr.diffusion.schedules import Schedule
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.train.checkpointer import Checkpointer, check_same_job
from jattr.train.loop import (check_data, check_finite_segment, job_config, make_segment_fn,
                              segments)
from jattr.train.state import TrainConfig, TrainState, init_state, make_optimizer
from jattr.types import ApplyFn

Strategy = Literal["auto", "vmap", "map", "chunked"]
STRATEGIES = ("auto", "vmap", "map", "chunked")


class Subsets(NamedTuple):
  """M index subsets of a dataset of N examples, padded to a common length.

  Attributes:
    indices: int32 [M, L]; row m lists member m's examples (sorted) in its first
      ``counts[m]`` entries, padded with its last example.
    counts: int32 [M], the subset sizes.
    num_examples: N.
  """

  indices: np.ndarray
  counts: np.ndarray
  num_examples: int

  @property
  def num_members(self) -> int:
    return int(self.indices.shape[0])

  def masks(self) -> np.ndarray:
    """Boolean [M, N] membership matrix."""
    out = np.zeros((self.num_members, self.num_examples), bool)
    for m in range(self.num_members):
      out[m, self.indices[m, :self.counts[m]]] = True
    return out


def make_subsets(subsets, num_examples: int) -> Subsets:
  """Normalises boolean masks [M, N] or a list of index arrays into ``Subsets``.

  Raises:
    ValueError: on a mask of the wrong width, an index out of [0, N), a repeated
      index, or an empty subset.
  """
  if isinstance(subsets, Subsets):
    return subsets
  if isinstance(subsets, np.ndarray | jax.Array) and np.asarray(subsets).dtype == bool:
    masks = np.asarray(subsets)
    if masks.ndim != 2 or masks.shape[1] != num_examples:
      raise ValueError(f"subset masks must have shape [M, N={num_examples}], got {masks.shape}")
    rows = [np.flatnonzero(m) for m in masks]
  else:
    rows = [np.asarray(r) for r in subsets]
  if not rows:
    raise ValueError("subsets is empty: need at least one member")
  counts = np.array([len(r) for r in rows], np.int32)
  for m, r in enumerate(rows):
    if len(r) == 0:
      raise ValueError(f"subset {m} is empty")
    if r.min() < 0 or r.max() >= num_examples:
      raise ValueError(f"subset {m} has indices outside [0, {num_examples}): "
                       f"min {r.min()}, max {r.max()}")
    if len(np.unique(r)) != len(r):
      raise ValueError(f"subset {m} repeats indices")
  width = int(counts.max())
  table = np.stack([np.concatenate([np.sort(r), np.full(width - len(r), np.sort(r)[-1])])
                    for r in rows]).astype(np.int32)
  return Subsets(table, counts, int(num_examples))


def member_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """``(init_key, train_key)`` of a member with this seed."""
  key = jax.random.key(int(seed))
  return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def map_members(fn, strategy: str, chunk_size: int | None):
  """Lifts ``fn(state, indices, count, train_key)`` to a leading member axis."""
  if strategy == "vmap":
    return jax.vmap(fn)
  if strategy == "map":
    return lambda *xs: jax.lax.map(lambda a: fn(*a), xs)
  if strategy == "chunked":
    if not chunk_size or chunk_size < 1:
      raise ValueError(f"strategy 'chunked' needs chunk_size >= 1, got {chunk_size}")
    return lambda *xs: jax.lax.map(lambda a: fn(*a), xs, batch_size=chunk_size)
  raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


@dataclasses.dataclass
class ManyResult:
  """What ``train_many`` returns.

  Attributes:
    state: stacked ``TrainState``, every leaf with a leading member axis M.
    losses: per-step training loss of every member, [M, num_steps].
    strategy: the strategy that ran (resolved, if ``"auto"`` was asked for).
  """

  state: TrainState
  losses: np.ndarray
  strategy: str


def _time_strategy(build, strategy, chunk_size, args, steps=2) -> float:
  fn = jax.jit(lambda *a: build(strategy, chunk_size)(*a, steps))
  jax.block_until_ready(fn(*args))  # compile and warm up
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def train_many(apply_fn: ApplyFn, init_fn: Callable[[jax.Array], object], schedule: Schedule,
               data, subsets, seeds, config: TrainConfig, *, strategy: Strategy = "auto",
               chunk_size: int | None = None, checkpointer: Checkpointer | None = None,
               meta: dict | None = None, progress: Progress | None = None,
               null_cond=None, mesh=None) -> ManyResult:
  """Trains one denoiser per subset, all in one jit-compiled program.

  Args:
    apply_fn: ``apply_fn(params, x_t, t)`` (``apply_fn(params, x_t, t, cond)`` for
      conditional data); must be vmappable over params.
    init_fn: ``init_fn(key) -> params``, pure.
    schedule: the noise schedule.
    data: training images [N, H, W, C], or the tuple ``(images, cond)`` of
      conditional data (``jattr.train.train``).
    subsets: boolean masks [M, N], a list of M index arrays, or ``Subsets``.
    seeds: M integer seeds (see module docstring); equal seeds = common random
      numbers.
    config: the recipe, shared by all members.
    strategy: how the member axis runs (module docstring).
    chunk_size: members per chunk for ``"chunked"``.
    checkpointer: if given (``jattr.io.checkpoint.Checkpointer(dir)``), the
      stacked state is saved after every segment and an interrupted run resumes
      from it with identical results.
    meta: extra JSON-able metadata checked on resume.
    progress: called after every segment (``jattr.progress``).
    null_cond: ONE example's null condition, what ``config.cond_dropout`` replaces
      conditions with (``jattr.train.train``).
    mesh: a ``jax.sharding.Mesh``; ``None``: ``jattr.devices.current_mesh()``
      (none set: one device). On a mesh the M members are split over its
      ``"data"`` axis (padded to a multiple of D with copies of the last member,
      dropped again); each device runs its members with ``strategy``. A member's
      numbers do not depend on the device it ran on.

  Returns:
    A ``ManyResult``.

  Raises:
    ValueError: on data that are not finite images in [−1, 1] (or a condition
      without their leading axis N), on ``cond_dropout > 0`` without conditional data
      or ``null_cond``; ``DivergedError``
      (a ValueError) when a member's loss or parameters become NaN or inf, naming
      the member and step; the checkpoint keeps the last finite state.
  """
  data = check_data(data, config, null_cond)
  table = make_subsets(subsets, conditioning.count(data))
  seeds = np.asarray(seeds, np.int64).reshape(-1)
  if seeds.shape[0] != table.num_members:
    raise ValueError(f"need one seed per subset: {table.num_members} subsets, "
                     f"{seeds.shape[0]} seeds")
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")

  optimizer = make_optimizer(config)
  segment = make_segment_fn(apply_fn, schedule, config, optimizer, null_cond=null_cond)
  keys = [member_keys(s) for s in seeds]
  init_keys = jnp.stack([k[0] for k in keys])
  train_keys = jnp.stack([k[1] for k in keys])
  indices, counts = jnp.asarray(table.indices), jnp.asarray(table.counts)

  def build(strat, chunk):
    def members(states, idx, cnt, tkeys, num_steps):
      fn = lambda s, i, c, k: segment(s, data, i, c, k, num_steps)  # noqa: E731
      return map_members(fn, strat, chunk)(states, idx, cnt, tkeys)
    return members

  state = jax.jit(jax.vmap(lambda k: init_state(init_fn(k), optimizer)))(init_keys)

  if strategy == "auto":
    strategy = _auto_strategy(build, state, indices, counts, train_keys, apply_fn, data)

  mesh = devices.current_mesh(mesh)
  members = build(strategy, chunk_size)
  run = jax.jit(members if mesh is None else _split_members(members, mesh), static_argnums=4)
  losses = np.zeros((table.num_members, 0), np.float32)
  job = {"kind": "train_many", "config": job_config(config, null_cond),
         "seeds": seeds.tolist(),
         "subsets": subsets_digest(table), **(meta or {})}
  if checkpointer is not None and checkpointer.latest_step() is not None:
    state, saved = checkpointer.restore(state)
    check_same_job(checkpointer, saved.get("job"), job)
    losses = np.asarray(saved["losses"], np.float32).reshape(table.num_members, -1)
  report = resolve_progress(progress)
  desc = f"train_many[M={table.num_members}, {strategy}]"
  start = int(state.step[0])
  m = table.num_members
  args = (indices, counts, train_keys)
  if mesh is not None:  # members padded to a multiple of D and split over "data"
    pad = lambda tree: _pad_members(tree, m, devices.data_size(mesh), mesh)  # noqa: E731
    state, args = pad(state), pad(args)
  host = (lambda tree: tree) if mesh is None else (
      lambda tree: devices.to_host_device(jax.tree.map(lambda a: a[:m], tree), mesh))
  for first, length in segments(start, config.num_steps, config.segment_steps):
    state, seg = run(state, *args, length)
    seg = np.asarray(seg)[:m]
    check_finite_segment(seg, host(state.params), first, config, checkpointer,
                         member_axis=True)
    losses = np.concatenate([losses, np.asarray(seg, np.float32)], axis=1)
    if checkpointer is not None:
      checkpointer.save(int(state.step[0]), host(state),
                        {"job": job, "losses": losses.tolist(), "strategy": strategy})
    report(desc, int(state.step[0]), config.num_steps, loss=float(np.mean(seg)))
  return ManyResult(state=host(state), losses=losses, strategy=strategy)


def _split_members(members, mesh):
  """``members`` run data-parallel: each device takes its block of the member axis."""
  spec = PartitionSpec(devices.DATA)

  def run(states, idx, cnt, tkeys, num_steps):
    body = lambda s, i, c, k: members(s, i, c, k, num_steps)  # noqa: E731
    return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec, spec),
                         axis_names=frozenset({devices.DATA}), check_vma=False)(
                             states, idx, cnt, tkeys)
  return run


def _pad_members(tree, m: int, d: int, mesh):
  """The member axis padded to D·⌈M/D⌉ with copies of member M − 1, split over D."""
  tree, _ = devices.pad_rows(tree, m, d)
  return devices.put(tree, devices.split_rows(mesh))


def _auto_strategy(build, state, indices, counts, train_keys, apply_fn, data) -> str:
  """Times 2 steps of ``map`` and ``vmap`` on (up to) the first 8 members."""
  m = min(8, indices.shape[0])
  if m == 1:
    return "map"
  args = (jax.tree.map(lambda a: a[:m], state), indices[:m], counts[:m], train_keys[:m])
  times = {s: _time_strategy(build, s, None, args) for s in ("map", "vmap")}
  return min(times, key=times.get)


def subsets_digest(table: Subsets) -> str:
  h = hashlib.sha256(table.indices.tobytes())
  h.update(table.counts.tobytes())
  return h.hexdigest()[:16]
