"""Curvature of a run on disk, and influence scores from it (``jattr fit-curvature``,
``jattr influence``).

    jattr fit-curvature --run DIR --out CURV [--approx kfac|ekfac|diagonal|dense]
                        [--weight-sharing expand|reduce] [--num-draws 10]
                        [--timesteps uniform] [--draw-seed 0] [--damping λ]
                        [--estimation-mode ggn_curvature_prop] [--seed 0]
                        [--batch-size 64] [--grad-batch-size B] [--wrt REGEX] [--overwrite]
    jattr influence     --run DIR --curvature CURV --out scores.npz
                        [--measurement loss|elbo|loss_at_time|square_norm|weighted_loss|…]
                        [--time T] [--queries samples|test|train] [--damping λ]
                        [--tile-size 256] [--chunk-size C] [--wrt REGEX]

``fit-curvature`` fits the GGN of the run's training loss

    L(θ) = 1/(N K) Σ_{i,k} (1/D) ‖ε_θ(x_t(x_i, t_k, ε_k), t_k) − ε_k‖²

at the run's EMA parameters, over its whole training set and K fixed draws, with
``jattr.curvature.fit_kfac`` (+ ``fit_ekfac``), ``fit_diagonal`` or, for models of at
most ``MAX_DENSE_PARAMS`` parameters, the dense G (eigendecomposed once). K-FAC runs
on the UNet rebuilt with ``conv_impl="xla"`` (``jattr.models.kfac_apply_fn``; the
parameters are the same), as it did when the factors came from kfac-jax, which
recognises only ``lax.conv_general_dilated``. The native fit does not need it (its
layer registry gives the im2col UNet the same blocks and factors); it is kept so
that K-FAC fits stay comparable with earlier ones, and on CPU the native fit is
faster on it (docs/benchmarks.md). The per-example passes use the run's own
``apply_fn``. The state is saved with ``jattr.io.curvature_store.save_curvature``;
its sidecar records what ``curvature_meta`` lists (model hash, draws, dataset,
damping default…).

``influence`` loads the curvature (refusing one fitted to other parameters) and
writes

    τ[q, i] = ∇m_q(θ)ᵀ (C + λ I)⁻¹ ∇ℓ_i(θ)          (jattr.methods.influence)

for the run's generated samples (``samples.npz``), held-out real images or the
training set itself as queries q, against every training example i, to an .npz
(``tau`` [Q, N] float32 plus metadata). ℓ_i is the training loss over the
curvature's draws; m_q the chosen measurement over the same draws. Query gradients
are preconditioned once; training gradients are made ``--tile-size`` at a time, so
memory is about (Q + tile)·P whatever N.

``--wrt REGEX`` fits (and scores) with respect to the parameters whose paths match
(``jattr.wrt``), the others held fixed: G is the GGN in θ_S, every gradient ∇_{θ_S}.
The curvature records the selection (``meta["wrt"]``, ``selection_record``) and
``influence`` takes it from there (a ``--wrt`` that disagrees is refused), so the
curvature and the gradients always share one selection.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import jax
import numpy as np

from jattr import __version__ as jattr_version
from jattr.curvature import (CURVATURE_KINDS, DEFAULT_ESTIMATION_MODE, DEFAULT_SKETCH_SAMPLES,
                             ESTIMATION_MODES, MAX_DENSE_PARAMS, WEIGHT_SHARING, check_damping,
                             dense_ggn, dense_state, fit_diagonal, fit_ekfac, fit_kfac,
                             fit_low_rank_ggn, fit_sketched_ggn)
from jattr.features.projection import ProjectionConfig
from jattr.curvature.dense import check_dense_size
from jattr.diffusion import conditioning, fixed_draws
from jattr.diffusion.measurements import MEASUREMENTS
from jattr.io import atomic, guard
from jattr.io.curvature_store import (curvature_exists, load_curvature, read_curvature_meta,
                                      save_curvature)
from jattr.io.hashing import array_hash, model_hash
from jattr.methods.influence import influence
from jattr.models import kfac_apply_fn, num_params
from jattr.models.unet import config_record
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.runs.config import QUERIES
from jattr.runs.features import query_examples
from jattr.runs.run import latent_space, load_run, run_examples, training_data
from jattr.runs.stores import selection_record
from jattr.wrt import restrict

CURVATURES = CURVATURE_KINDS
"""What ``fit_run_curvature`` fits (``approx``)."""
GRAD_BYTES = 1 << 30
"""Budget for one pass of per-example gradients or GGN rows (examples × K × rows × P)."""
JACOBIAN_BYTES = 1 << 27
"""Budget for one batch of the dense Jacobian J [B K D, P]."""


INFLUENCE_KEYS = ("tau", "curvature_kind", "curvature_meta")
"""Arrays every ``write_influence`` file holds (an existing --out without them is refused)."""


def curvature_meta(*, kind: str, model_hash: str, damping: float | None, weight_sharing: str | None,
                   num_draws: int, timesteps: str, draw_seed: int, dataset: str,
                   num_examples: int, examples_hash: str, estimation_mode: str,
                   num_samples: int, seed: int, parameterization: str = "eps",
                   images_hash: str | None = None, selection: dict | None = None,
                   **extra) -> dict:
  """The standard sidecar ``meta`` of a fitted curvature.

  Args:
    kind: ``CURVATURES``.
    model_hash: sha256 of the parameters (``jattr.io.hashing.model_hash``).
    damping: the default λ of ``influence`` (None: 0.1 × mean eigenvalue per block).
    weight_sharing: ``"expand"``/``"reduce"`` for K-FAC and EK-FAC, else None.
    num_draws, timesteps, draw_seed: the K fixed draws (``fixed_draws``).
    dataset, num_examples, examples_hash: the training set the curvature averages
      over (name, N, sha256 of its indices).
    images_hash: sha256 of the training images themselves (``array_hash``): a
      curvature is refused with other images even where the indices agree.
    estimation_mode, num_samples, seed: how G was sampled.
    parameterization: how the network output is read.
    selection: the ``selection_record`` of the ``wrt`` it was fitted with, stored as
      ``"wrt"``; ``None`` (all parameters) stores nothing, as before selections.
    **extra: anything else (timings, versions, the model's config).

  Returns:
    A JSON-able dict. The measurement is always ``"loss"``: the curvature is that
    of the training loss.
  """
  return {"kind": kind, "model_hash": model_hash, "damping": damping,
          "weight_sharing": weight_sharing, "measurement": "loss",
          "parameterization": parameterization,
          "draws": {"num_draws": int(num_draws), "timesteps": timesteps, "seed": int(draw_seed)},
          "dataset": {"name": dataset, "split": "train", "num": int(num_examples),
                      "indices_sha256": examples_hash,
                      **({} if images_hash is None else {"images_sha256": images_hash})},
          "estimation": {"mode": estimation_mode, "num_samples": int(num_samples),
                         "seed": int(seed)},
          **({} if selection is None else {"wrt": dict(selection)}),
          **extra}


def dense_ggn_batched(apply_fn, params, schedule, x0, draws, *, batch_size: int | None = None,
                      progress: Progress | None = None):
  """``jattr.curvature.dense_ggn`` over all N examples, ``batch_size`` at a time.

  Args:
    apply_fn, params, schedule, x0, draws: as in ``dense_ggn``.
    batch_size: examples per batch (None: the most whose J [batch K D, P] fits
      128 MiB).
    progress: ``jattr.progress`` callback, per batch.

  Returns:
    G, [P, P] in ``ravel_pytree(params)`` order.
  """

  if batch_size is None:
    p = num_params(params)
    batch_size = max(1, JACOBIAN_BYTES // (4 * draws.num_draws * int(np.prod(x0.shape[1:])) * p))
  return dense_ggn(apply_fn, params, schedule, x0, draws, batch_size=batch_size,
                   progress=progress)


def fit_run_curvature(run_dir, out, *, approx: str = "kfac", weight_sharing: str = "expand",
                      num_draws: int = 10, timesteps: str = "uniform", draw_seed: int = 0,
                      damping: float | None = None, estimation_mode: str | None = None,
                      num_samples: int | None = None, seed: int = 0, batch_size: int = 64,
                      grad_batch_size: int | None = None, chunk_size: int | None = None,
                      max_dense_params: int = MAX_DENSE_PARAMS, overwrite: bool = False,
                      progress: Progress | None = None, wrt=None,
                      projection: ProjectionConfig | None = None, rank: int = 256):
  """Fits a curvature of a run's training loss and saves it (what ``jattr fit-curvature`` does).

  Args:
    run_dir: a trained run directory (``jattr.runs``).
    out: the curvature directory to write.
    approx: ``"kfac"``, ``"ekfac"`` (K-FAC's eigenbasis, refitted eigenvalues),
      ``"diagonal"``, ``"dense"`` (at most ``max_dense_params`` parameters) or
      ``"sketch"`` (the GGN in the span of ``projection``) or ``"low_rank"`` (the top
      ``rank`` eigenpairs of G by Lanczos, the rest a scaled identity).
    weight_sharing: K-FAC's ``"expand"`` or ``"reduce"`` (K-FAC and EK-FAC).
    num_draws, timesteps, draw_seed: the K fixed draws (``fixed_draws``).
    damping: the default λ stored with it (None: 0.1 × the mean eigenvalue).
    estimation_mode: ``jattr.curvature.ESTIMATION_MODES`` (None: the default).
    num_samples, seed: of the sampled modes (num_samples None: 1, and
      ``DEFAULT_SKETCH_SAMPLES`` for the sketch).
    batch_size: examples per K-FAC update.
    grad_batch_size: examples per per-example-gradient pass (EK-FAC, diagonal;
      None: the most whose K·num_samples·P gradients fit 1 GiB).
    chunk_size: GGN rows per vmap in those passes.
    max_dense_params: the largest P ``"dense"`` accepts.
    overwrite: replace a curvature already in ``out``.
    progress: ``jattr.progress`` callback: each stage (K-FAC, EK-FAC, diagonal)
      reports 0/1 when it starts and 1/1 when it ends; the dense fit per batch.
    wrt: the parameters to fit the curvature in (``jattr.wrt`` selector; ``None``:
      all), the others held fixed; recorded in ``meta["wrt"]``.
    projection: P of ``"sketch"`` (None: a sparse P to k = 4096 with 4 non-zeros per
      row, seed 0); stored with the curvature.
    rank: r of ``"low_rank"`` (2r Lanczos iterations, each a pass over the data).

  Returns:
    ``(state, meta)`` as saved.

  Raises:
    ValueError: bad arguments, an existing ``out`` without ``overwrite``, or
      ``"dense"`` for a model above ``max_dense_params`` (checked before any fitting).
  """

  if approx not in CURVATURES:
    raise ValueError(f"approx must be one of {CURVATURES}, got {approx!r}")
  if weight_sharing not in WEIGHT_SHARING:
    raise ValueError(f"weight_sharing must be one of {WEIGHT_SHARING}, got {weight_sharing!r}")
  if timesteps not in ("uniform", "random"):
    raise ValueError(f"timesteps must be 'uniform' or 'random', got {timesteps!r}")
  if num_samples is None:
    num_samples = DEFAULT_SKETCH_SAMPLES if approx == "sketch" else 1
  for name, value, optional in (("num_draws", num_draws, False), ("batch_size", batch_size, False),
                                ("grad_batch_size", grad_batch_size, True),
                                ("chunk_size", chunk_size, True),
                                ("num_samples", num_samples, False),
                                ("max_dense_params", max_dense_params, False)):
    guard.check_count(name, value, optional=optional)
  check_damping(damping)
  estimation_mode = DEFAULT_ESTIMATION_MODE if estimation_mode is None else estimation_mode
  if estimation_mode not in ESTIMATION_MODES:
    raise ValueError(f"estimation_mode must be one of {ESTIMATION_MODES}, got "
                     f"{estimation_mode!r}")
  if curvature_exists(out) and not overwrite:
    raise ValueError(f"--out {out} already holds a curvature; choose another directory or "
                     "pass --overwrite")
  guard.check_output_dir(out, "--out", kind="curvature directory", is_own=curvature_exists)
  report = resolve_progress(progress)
  run_dir = pathlib.Path(run_dir)
  cfg, apply_fn, full_params = load_run(run_dir)
  selection = selection_record(full_params, wrt)  # raises if it selects nothing
  # K-FAC, EK-FAC, the diagonal and the dense G all run on the restricted model:
  # the frozen leaves are constants, the curvature is that of θ_S.
  apply_fn, params = restrict(apply_fn, full_params, wrt)
  p = num_params(params)
  if approx == "dense":
    check_dense_size(p, max_dense_params, what=f"--approx dense on run {run_dir}")
  ds, idx = training_data(cfg)
  # (x, labels) for a conditional run; latents for a latent run
  x0 = jax.tree.map(jax.numpy.asarray, run_examples(cfg, ds, latent_space(cfg, run_dir)))
  n = conditioning.count(x0)
  draws = fixed_draws(jax.random.key(draw_seed), int(num_draws), cfg.model.image_shape,
                      cfg.num_timesteps, timesteps)
  schedule = cfg.noise_schedule
  param = cfg.train.parameterization
  key = jax.random.key(seed)
  if grad_batch_size is None:
    grad_batch_size = max(1, min(n, GRAD_BYTES // (4 * int(num_draws) * num_samples * p)))
  sampled = dict(estimation_mode=estimation_mode, key=key, num_samples=num_samples)
  timings = {}
  t0 = time.perf_counter()
  if approx in ("kfac", "ekfac"):
    kfac_apply, _ = restrict(kfac_apply_fn(cfg.model), full_params, wrt)
    stage = f"fit-curvature: K-FAC ({weight_sharing}), N = {n}, K = {num_draws}, P = {p:,}"
    report(stage, 0, 1)
    state = fit_kfac(kfac_apply, params, schedule, x0, draws, weight_sharing=weight_sharing,
                     batch_size=batch_size, parameterization=param, **sampled)
    jax.block_until_ready(state)
    timings["kfac_seconds"] = time.perf_counter() - t0
    report(stage, 1, 1)
    if approx == "ekfac":
      t1 = time.perf_counter()
      stage = f"fit-curvature: EK-FAC eigenvalues, {grad_batch_size} examples per pass"
      report(stage, 0, 1)
      state = fit_ekfac(apply_fn, params, schedule, x0, draws, state, batch_size=grad_batch_size,
                        chunk_size=chunk_size, parameterization=param,
                        **{**sampled, "key": jax.random.fold_in(key, 1)})
      jax.block_until_ready(state)
      timings["ekfac_seconds"] = time.perf_counter() - t1
      report(stage, 1, 1)
  elif approx == "diagonal":
    stage = f"fit-curvature: GGN diagonal, N = {n}, K = {num_draws}"
    report(stage, 0, 1)
    state = fit_diagonal(apply_fn, params, schedule, x0, draws, batch_size=grad_batch_size,
                         chunk_size=chunk_size, parameterization=param, **sampled)
    jax.block_until_ready(state)
    report(stage, 1, 1)
  elif approx == "low_rank":
    stage = f"fit-curvature: low-rank GGN, r = {rank} (Lanczos), N = {n}, K = {num_draws}"
    report(stage, 0, 1)
    state = fit_low_rank_ggn(apply_fn, params, schedule, x0, draws, min(int(rank), p), key=key,
                             chunk_size=chunk_size or batch_size)
    report(stage, 1, 1)
  elif approx == "sketch":
    if projection is None:
      projection = ProjectionConfig(dim=4096, kind="sparse", seed=0, nonzeros=4)
    stage = (f"fit-curvature: sketched GGN, k = {projection.dim}, N = {n}, K = {num_draws}, "
             f"S = {num_samples}")
    report(stage, 0, 1)
    state = fit_sketched_ggn(apply_fn, params, schedule, x0, draws, projection,
                             batch_size=grad_batch_size, chunk_size=chunk_size or 256,
                             parameterization=param, **sampled)
    report(stage, 1, 1)
  else:
    g = dense_ggn_batched(apply_fn, params, schedule, x0, draws, progress=progress)
    timings["ggn_seconds"] = time.perf_counter() - t0
    # Eigendecomposed once (float64): every later damping and query costs products.
    state = dense_state(g)
    del g
  timings["fit_seconds"] = time.perf_counter() - t0
  meta = curvature_meta(
      kind=approx, model_hash=model_hash(full_params), damping=damping,
      weight_sharing=weight_sharing if approx in ("kfac", "ekfac") else None,
      num_draws=num_draws, timesteps=timesteps, draw_seed=draw_seed, dataset=cfg.dataset,
      num_examples=n, examples_hash=array_hash(idx), images_hash=array_hash(np.asarray(ds.x)),
      estimation_mode=estimation_mode,
      num_samples=num_samples, seed=seed, parameterization=param,
      run=str(run_dir), model={"unet": config_record(cfg.model), "schedule": cfg.schedule,
                               "num_timesteps": cfg.num_timesteps},
      batch_size=int(batch_size), grad_batch_size=int(grad_batch_size),
      timings=timings, versions={"jattr": jattr_version, "jax": jax.__version__},
      backend=jax.default_backend(), selection=selection)
  save_curvature(out, state, meta, overwrite=overwrite)
  return state, read_curvature_meta(out)


# ---------------------------------------------------------------------------------
# influence
# ---------------------------------------------------------------------------------

_UNSET = object()


def influence_run(run_dir, curvature_dir, *, measurement: str = "loss", time_: int | None = None,
                  queries: str = "samples", damping=_UNSET, tile_size: int = 256,
                  chunk_size: int | None = None, progress: Progress | None = None,
                  wrt=_UNSET) -> tuple[np.ndarray, dict]:
  """τ [Q, N] of a run's queries against its training set (what ``jattr influence`` does).

  ``jattr.methods.influence.influence`` with the saved curvature, its tiles written
  into a host array.

  Args:
    run_dir: a trained run directory.
    curvature_dir: made by ``fit_run_curvature`` for this run's parameters.
    measurement: the query measurement (``MEASUREMENTS``).
    time_: the timestep of ``"loss_at_time"``.
    queries: ``"samples"`` (``samples.npz``), ``"test"`` (held-out real images) or
      ``"train"``.
    damping: λ ≥ 0 or None (0.1 × mean eigenvalue); unset: the curvature's stored
      default.
    tile_size: training examples per gradient tile.
    chunk_size: examples per vmap (None: the most whose gradients fit 1 GiB).
    progress: ``jattr.progress`` callback, per training tile.
    wrt: the selector of the gradients; unset: the curvature's (``meta["wrt"]``,
      none: all parameters). Given, it must select what the curvature was fitted
      with (a different selection is refused).

  Returns:
    ``(tau float32 [Q, N], info)``, ``info`` holding the measurement, damping,
    query and curvature descriptions.

  Raises:
    ValueError: a curvature of another model, training set or selection, bad
      arguments.
  """

  if queries not in QUERIES:
    raise ValueError(f"queries must be one of {QUERIES}, got {queries!r}")
  if measurement not in MEASUREMENTS:
    raise ValueError(f"measurement must be one of {MEASUREMENTS}, got {measurement!r}")
  guard.check_count("tile_size", tile_size)
  guard.check_count("chunk_size", chunk_size, optional=True)
  run_dir = pathlib.Path(run_dir)
  cfg, apply_fn, params = load_run(run_dir)
  if wrt is _UNSET:
    stored = read_curvature_meta(curvature_dir).get("wrt")
    wrt = None if stored is None else stored.get("selector")
    if wrt in ("<callable>", "<mask>"):
      raise ValueError(f"curvature {curvature_dir} was fitted with a Python selector "
                       f"({wrt}); pass the same selector as wrt=")
  selection = selection_record(params, wrt)
  selected = params if wrt is None else restrict(apply_fn, params, wrt)[1]
  state, meta = load_curvature(curvature_dir, params, selection=selection, selected=selected)
  ds, idx = training_data(cfg)
  if meta["dataset"]["indices_sha256"] != array_hash(idx):
    raise ValueError(f"curvature {curvature_dir} was fitted on another training set "
                     f"({meta['dataset']['name']}, N = {meta['dataset']['num']}) than run "
                     f"{run_dir} ({cfg.dataset}, N = {len(idx)})")
  stored = meta["dataset"].get("images_sha256")
  if stored is not None and stored != array_hash(np.asarray(ds.x)):
    raise ValueError(f"curvature {curvature_dir} was fitted on other training images than "
                     f"run {run_dir} loads now (sha256 {stored[:16]}… recorded, "
                     f"{array_hash(np.asarray(ds.x))[:16]}… now): the data at data_dir "
                     "changed; fit the curvature again")
  damping = meta.get("damping") if damping is _UNSET else damping
  check_damping(damping)
  xq, query_info, query_hash = query_examples(cfg, run_dir, queries)
  x = run_examples(cfg, ds, latent_space(cfg, run_dir))  # labelled / latent as the run is
  n, q = conditioning.count(x), conditioning.count(xq)
  d = meta["draws"]
  draws = fixed_draws(jax.random.key(d["seed"]), d["num_draws"], cfg.model.image_shape,
                      cfg.num_timesteps, d["timesteps"])
  param = meta.get("parameterization", cfg.train.parameterization)
  tn = min(int(tile_size), n)
  if chunk_size is None:
    chunk_size = max(1, min(tn, GRAD_BYTES // (4 * num_params(selected))))
  tau = np.empty((q, n), np.float32)
  influence(apply_fn, params, cfg.noise_schedule, draws, x, xq, state, measurement=measurement,
            damping=damping, parameterization=param, time=time_, tile_size=tn,
            chunk_size=chunk_size, out=tau, progress=progress, wrt=wrt)
  info = {"measurement": measurement, "time": time_, "damping": damping,
          "wrt": selection,
          "queries": {**query_info, "num": q, "sha256": query_hash},
          "curvature": str(curvature_dir), "curvature_meta": meta,
          "train_indices": idx}
  return tau, info




def write_influence(path: str | os.PathLike, tau: np.ndarray, info: dict) -> pathlib.Path:
  """Writes ``influence_run``'s result to an .npz atomically (``tau`` [Q, N] + metadata).

  Raises:
    ValueError: ``path`` is a directory or an existing file that is not an influence
      file (``jattr.io.guard.check_output_file``; ``jattr influence`` checks it first).
  """
  out = guard.check_output_file(path, "--out", kind="influence", keys=INFLUENCE_KEYS)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = info["curvature_meta"]
  return atomic.write_npz(
      out, tau=tau, measurement=info["measurement"],
      time=-1 if info["time"] is None else info["time"],
      damping=np.nan if info["damping"] is None else info["damping"],
      queries=json.dumps(info["queries"]), curvature=info["curvature"],
      curvature_kind=meta["kind"], curvature_meta=json.dumps(meta),
      model_hash=meta["model_hash"], train_indices=info["train_indices"])
