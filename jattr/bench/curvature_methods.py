"""Influence functions (K-FAC, EK-FAC, diagonal GGN, the dense GGN) for the LDS harness.

Each factory has the harness signature ``factory(cache, **options) -> (score_fn, grid)``
(``jattr.bench.registry``). It fits the curvature of the training loss of the cache's
full-data model once, over its N training images and K fixed draws, and
``score_fn(hparams, queries)`` returns

    τ[q, i] = ∇m_q(θ)ᵀ (G̃ + λ I)⁻¹ ∇ℓ_i(θ)         (jattr.methods.influence)

with m = ℓ = the diffusion loss over the same K draws. λ is 0.1 × the mean
eigenvalue of each block by default (``damping_factor``): the ``*_default`` variants
use exactly that with no tuning (the claim under test: K-FAC influence needs no
method-specific tuning); the others choose the factor on validation queries from
``DAMPING_FACTOR_GRID``.

The ``dense_ggn`` variants use the exact GGN (``jattr.curvature.dense_ggn``), the
quantity K-FAC and EK-FAC approximate, eigendecomposed once in float64
(``jattr.curvature.dense_state``; the digits benchmark's P = 12,921: G is 1.3 GB).

K-FAC is fitted on the UNet rebuilt with native convolutions (``conv_impl="xla"``,
same parameters; ``jattr.models.kfac_apply_fn``). The native ``fit_kfac`` does not
need it (its layer registry gives the im2col UNet the same blocks and factors,
docs/influence.md §11); it is kept so that the digits benchmark's K-FAC rows stay
comparable with those fitted through kfac-jax, whose graph matcher does not
recognise im2col convolutions. The fit time (wall, one process, compile included)
is recorded in ``fit_seconds`` of the returned score function for the results table.

The ``sketch_ggn`` variants (``jattr.curvature.fit_sketched_ggn``) fit the GGN in
the span of the projection P of TRAK's features, G_k = PᵀGP from S sampled rows
per (example, draw) pair, and score τ = φ_qᵀ(G_k + λI)⁻¹φ_i on the features
φ = Pᵀ∇ (``sketch_method``). They record, besides ``fit_seconds``, the seconds to
featurise the training set with the same P (TRAK's featurisation, the yardstick of
the fit's cost), both measured in the same process.

``wrt`` (a ``jattr.wrt`` selector; ``None``: all parameters) restricts the model
before anything is fitted (``jattr.wrt.restrict``): the curvature is that of the
selected parameters θ_S, the others held fixed, and the gradients are ∇_{θ_S} — one
selection for the fit and the scores.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from jattr import models
from jattr.bench import gradient_methods, lds_cache
from jattr.curvature import (CURVATURE_KINDS, DEFAULT_ESTIMATION_MODE, DEFAULT_SKETCH_SAMPLES,
                             MAX_DENSE_PARAMS, curvature_kind, dense_ggn, dense_state,
                             fit_diagonal, fit_ekfac, fit_kfac, fit_low_rank_ggn,
                             fit_sketched_ggn, inverse_vp_fn, sketch_scores)
from jattr.curvature.dense import check_dense_size
from jattr.diffusion import draws as draws_lib
from jattr.diffusion.measurements import measurement_fn
from jattr.features.projection import ProjectionConfig
from jattr.grads.per_example import per_example_flat_grads
from jattr.methods.influence import influence_scores
from jattr.wrt import restrict

DAMPING_FACTOR_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
APPROXIMATIONS = (*(k for k in CURVATURE_KINDS if k != "sketch"), "identity",
                  "dense_blockdiag")
"""What ``influence_method`` fits: every stored curvature kind but the sketch (which
scores projected features: ``sketch_method``), the identity (exact gradient dot
products) and the dense GGN's within-layer blocks."""


def fit_curvature(cache, *, approx: str = "kfac", weight_sharing: str = "expand",
                  num_draws: int = 10, draw_seed: int = 1, batch_size: int = 50,
                  estimation_mode: str = DEFAULT_ESTIMATION_MODE, wrt=None, rank: int = 256):
  """Fits the curvature of the cache's full-data model; returns (state, draws, seconds).

  With ``wrt`` the curvature is that of the selected parameters (module docstring).
  """
  if approx not in APPROXIMATIONS:
    raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}")
  train = cache.train_examples
  shape = tuple(cache.train_images.shape[1:])
  draws = draws_lib.fixed_draws(jax.random.key(draw_seed), num_draws, shape,
                                cache.schedule.num_timesteps)
  param = cache.train_config.parameterization
  apply_fn, params = restrict(cache.apply_fn, cache.full_params, wrt)
  t0 = time.perf_counter()
  if approx == "identity":  # C = I: the exact (unprojected) gradient dot product
    return None, draws, 0.0
  if approx in ("dense", "dense_blockdiag"):
    check_dense_size(ravel_pytree(params)[0].size, MAX_DENSE_PARAMS,
                     what=f"approx={approx!r}")
    # The exact GGN G [P, P] (the reference every other curvature approximates),
    # eigendecomposed once in float64 so that each damping of the grid costs a
    # diagonal rescaling: (G + λI)⁻¹ = U diag(1/(s + λ)) Uᵀ.
    g = np.asarray(dense_ggn(apply_fn, params, cache.schedule, train, draws,
                             batch_size=batch_size), np.float64)
    if approx == "dense_blockdiag":
      # Only the blocks within one layer (module): K-FAC's block-diagonal structure
      # with each block exact, to separate its two approximations.
      layer = layer_ids(params)
      g = np.where(layer[:, None] == layer[None, :], g, 0.0)
    return dense_state(g), draws, time.perf_counter() - t0
  if approx == "low_rank":
    # The top-r eigenpairs of G by Lanczos (2r GGN matvecs over the N·K pairs), the
    # rest of the spectrum its mean remaining eigenvalue.
    state = fit_low_rank_ggn(apply_fn, params, cache.schedule, train, draws, rank,
                             key=jax.random.key(2), chunk_size=batch_size)
    jax.block_until_ready(jax.tree.leaves(state))
    return state, draws, time.perf_counter() - t0
  if approx == "diagonal":
    state = fit_diagonal(apply_fn, params, cache.schedule, train, draws,
                         batch_size=batch_size, parameterization=param)
  else:
    kfac_apply, _ = restrict(models.kfac_apply_fn(lds_cache.unet_config(cache.spec, shape)),
                             cache.full_params, wrt)
    state = fit_kfac(kfac_apply, params, cache.schedule, train,
                     draws, weight_sharing=weight_sharing, batch_size=batch_size,
                     parameterization=param, estimation_mode=estimation_mode)
    if approx == "ekfac":
      state = fit_ekfac(apply_fn, params, cache.schedule, train, draws, state,
                        batch_size=batch_size, parameterization=param,
                        estimation_mode=estimation_mode)
  jax.block_until_ready(jax.tree.leaves(state))
  return state, draws, time.perf_counter() - t0


def layer_ids(params) -> np.ndarray:
  """For each entry of ``ravel_pytree(params)``, the index of its layer (the leaf's
  parent in the pytree: a conv's kernel and bias share one)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  parents = [jax.tree_util.keystr(path[:-1]) for path, _ in flat]
  index = {name: i for i, name in enumerate(dict.fromkeys(parents))}
  return np.concatenate([np.full(np.size(leaf), index[name]) for name, (_, leaf)
                         in zip(parents, flat)])


def _fit_once(cache, **options):
  """``fit_curvature``, memoised in ``cache.memo`` per options (the tuned and the
  ``_default`` variant of a method share one fit; the time is the fit's). One
  curvature is kept at a time: a 30M-parameter state is large."""
  key = ("curvature", tuple(sorted(options.items())))
  if key not in cache.memo:
    for k in [k for k in cache.memo if k[0] == "curvature"]:
      del cache.memo[k]
    cache.memo[key] = fit_curvature(cache, **options)
  return cache.memo[key]


def influence_method(cache, *, approx: str = "kfac", weight_sharing: str = "expand",
                     num_draws: int = 10, draw_seed: int = 1, measurement: str = "loss",
                     tune: bool = True, grid=DAMPING_FACTOR_GRID, batch_size: int = 50,
                     estimation_mode: str = DEFAULT_ESTIMATION_MODE, wrt=None,
                     rank: int | None = None):
  """K-FAC / EK-FAC / diagonal / dense / low-rank-GGN influence on the full-data model
  (``wrt``: with respect to the selected parameters, fit and gradients alike)."""
  # wrt=None leaves the memo key (and everything else) as it was without the option.
  extra = {} if wrt is None else {"wrt": wrt}
  if rank is not None:
    extra["rank"] = rank
  state, draws, seconds = _fit_once(cache, approx=approx, weight_sharing=weight_sharing,
                                    num_draws=num_draws, draw_seed=draw_seed,
                                    batch_size=batch_size, estimation_mode=estimation_mode,
                                    **extra)
  param = cache.train_config.parameterization
  apply_fn, params = restrict(cache.apply_fn, cache.full_params, wrt)
  loss = measurement_fn("loss", apply_fn, cache.schedule, draws, parameterization=param)
  m_fn = measurement_fn(measurement, apply_fn, cache.schedule, draws,
                        parameterization=param)
  grads = jax.jit(lambda f, x: per_example_flat_grads(f, params, x, chunk_size=50),
                  static_argnums=0)
  # N × P and Q × P gradients fit easily at this size: computed once, reused over
  # the damping grid (``influence`` recomputes them tile by tile for large N).
  train_grads = grads(loss, cache.train_examples)
  query_grads = {}
  unravel = ravel_pytree(params)[1]

  dense = state is not None and curvature_kind(state) == "dense"
  if dense:
    # τ = (∇m U) diag(1/(s + λ)) (∇ℓ U)ᵀ with λ = factor × mean(s) = factor × tr(G)/P,
    # the default of ``dense_inverse_vp``; the rotated training gradients are reused.
    train_rot = np.asarray(train_grads, np.float64) @ state.eigvecs

  def score_fn(hparams, queries):
    key = queries.memo_key
    factor = hparams.get("damping_factor", 0.1)
    if dense:
      if key not in query_grads:
        query_grads[key] = np.asarray(grads(m_fn, queries.examples),
                                      np.float64) @ state.eigvecs
      lam = factor * float(np.mean(state.eigvals))
      return (query_grads[key] / (state.eigvals + lam)) @ train_rot.T
    if key not in query_grads:
      query_grads[key] = jax.vmap(unravel)(grads(m_fn, queries.examples))
    ivp = inverse_vp_fn(state, damping_factor=factor)
    return np.asarray(influence_scores(query_grads[key], train_grads, ivp, chunk_size=50))

  score_fn.fit_seconds = seconds
  grid = [{"damping_factor": c} for c in grid] if tune else [{}]
  return score_fn, grid


def sketch_method(cache, *, dim: int = 4096, kind: str = "sparse", nonzeros: int = 4,
                  num_samples: int = DEFAULT_SKETCH_SAMPLES,
                  estimation_mode: str = "ggn_curvature_prop", num_draws: int = 10,
                  draw_seed: int = 1, measurement: str = "loss", tune: bool = True,
                  grid=DAMPING_FACTOR_GRID, batch_size: int = 10, chunk_size: int = 256,
                  sample_seed: int = 2, wrt=None):
  """Sketched-GGN influence: τ = φ_qᵀ(G_k + λI)⁻¹φ_i with φ = Pᵀ∇ (module docstring).

  The features use the projection of the fit (``gradient_methods.feature_fn``: the
  same draws as the fit, f = ``measurement`` on the query side, the loss on the
  training side); λ = factor × the mean eigenvalue of G_k.
  """
  options = dict(num_draws=num_draws, draw_seed=draw_seed, dim=dim, kind=kind,
                 nonzeros=nonzeros, wrt=wrt)
  t0 = time.perf_counter()
  train = gradient_methods.feature_fn(cache, measurement="loss", **options)(cache.train_examples)
  jax.block_until_ready(train)
  featurize_seconds = time.perf_counter() - t0
  config = ProjectionConfig(dim=dim, kind=kind, seed=0, nonzeros=nonzeros)
  shape = tuple(cache.train_images.shape[1:])
  draws = draws_lib.fixed_draws(jax.random.key(draw_seed), num_draws, shape,
                                cache.schedule.num_timesteps)
  t0 = time.perf_counter()
  state = fit_sketched_ggn(cache.apply_fn, cache.full_params, cache.schedule,
                           cache.train_examples, draws, config, estimation_mode=estimation_mode,
                           num_samples=num_samples, key=jax.random.key(sample_seed),
                           batch_size=batch_size, chunk_size=chunk_size,
                           parameterization=cache.train_config.parameterization, wrt=wrt)
  fit_seconds = time.perf_counter() - t0
  queries = gradient_methods.cached_query_features(
      gradient_methods.feature_fn(cache, measurement=measurement, **options))

  def score_fn(hparams, split):
    return np.asarray(sketch_scores(state, queries(split), train,
                                    damping_factor=hparams.get("damping_factor", 0.1)))

  score_fn.fit_seconds = fit_seconds
  score_fn.timing = {"fit_s": fit_seconds, "featurize_train_s": featurize_seconds}
  return score_fn, ([{"damping_factor": c} for c in grid] if tune else [{}])


def _variants() -> dict:
  out = {}
  for approx in ("kfac", "ekfac"):
    for ws in ("expand", "reduce"):
      name = f"{approx}_{ws}"
      out[name] = functools.partial(influence_method, approx=approx, weight_sharing=ws)
      out[f"{name}_default"] = functools.partial(influence_method, approx=approx,
                                                 weight_sharing=ws, tune=False)
  for approx in ("kfac", "ekfac"):
    out[f"{approx}_expand_k100"] = functools.partial(influence_method, approx=approx,
                                                     num_draws=100, batch_size=20)
    # Factors from every output coordinate (D backward passes per pair) instead of
    # one sampled row: separates K-FAC's sampling noise from its Kronecker structure.
    out[f"{approx}_expand_exact"] = functools.partial(influence_method, approx=approx,
                                                      estimation_mode="ggn_exact",
                                                      batch_size=10)
  out["diagonal_ggn"] = functools.partial(influence_method, approx="diagonal")
  # The exact GGN (P = 12,921 on the digits benchmark: G is 1.3 GB in float64).
  out["dense_ggn"] = functools.partial(influence_method, approx="dense", batch_size=4)
  out["dense_ggn_default"] = functools.partial(influence_method, approx="dense", batch_size=4,
                                               tune=False)
  out["dense_ggn_blockdiag"] = functools.partial(influence_method, approx="dense_blockdiag",
                                                 batch_size=4)
  out["grad_dot_exact"] = functools.partial(influence_method, approx="identity", tune=False)
  # The sketched GGN: k = 4096 (a third of the digits UNet's P), sparse P with 4
  # non-zeros per row, S sampled rows per pair (16 by default; S = 4 and the dense
  # Gaussian P to show what the sample count and the projection cost).
  # Low rank plus rest: Lanczos's top r eigenpairs of G, the rest a scaled identity.
  for r in (256, 1024):
    out[f"low_rank_ggn_r{r}"] = functools.partial(influence_method, approx="low_rank", rank=r,
                                                  batch_size=200)
  out["sketch_ggn"] = sketch_method
  out["sketch_ggn_default"] = functools.partial(sketch_method, tune=False)
  out["sketch_ggn_s4"] = functools.partial(sketch_method, num_samples=4)
  out["sketch_ggn_s64"] = functools.partial(sketch_method, num_samples=64)
  out["sketch_ggn_k8192"] = functools.partial(sketch_method, dim=8192)
  out["sketch_ggn_gaussian"] = functools.partial(sketch_method, kind="gaussian")
  return out


LDS_VARIANTS = _variants()
