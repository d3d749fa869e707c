"""Influence functions (K-FAC, EK-FAC, diagonal GGN) for the LDS harness.

Each factory has the harness signature ``factory(cache, **options) -> (score_fn, grid)``
(``jattr.eval.cli``). It fits the curvature of the training loss of the cache's
full-data model once, over its N training images and K fixed draws, and
``score_fn(hparams, queries)`` returns

    τ[q, i] = ∇m_q(θ)ᵀ (G̃ + λ I)⁻¹ ∇ℓ_i(θ)         (jattr.methods.influence)

with m = ℓ = the diffusion loss over the same K draws. λ is 0.1 × the mean
eigenvalue of each block by default (``damping_factor``): the ``*_default`` variants
use exactly that with no tuning (the claim under test: K-FAC influence needs no
method-specific tuning); the others choose the factor on validation queries from
``DAMPING_FACTOR_GRID``.

K-FAC is fitted on the UNet rebuilt with native convolutions (``conv_impl="xla"``,
same parameters): kfac-jax's graph matcher does not recognise the im2col
convolutions the CPU build uses (docs/influence.md §11). The fit time (wall, one
process, compile included) is recorded in ``fit_seconds`` of the returned score
function for the results table.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jattr import models
from jattr.curvature import fit_diagonal, fit_ekfac, fit_kfac
from jattr.diffusion import draws as draws_lib
from jattr.io import lds_cache
from jattr.diffusion.measurements import measurement_fn
from jattr.grads.per_example import per_example_flat_grads
from jattr.methods.influence import influence_scores, inverse_vp_fn

DAMPING_FACTOR_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
APPROXIMATIONS = ("kfac", "ekfac", "diagonal", "identity")


def fit_curvature(cache, *, approx: str = "kfac", weight_sharing: str = "expand",
                  num_draws: int = 10, draw_seed: int = 1, batch_size: int = 50):
  """Fits the curvature of the cache's full-data model; returns (state, draws, seconds)."""
  if approx not in APPROXIMATIONS:
    raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}")
  train = jnp.asarray(cache.train_images)
  shape = tuple(train.shape[1:])
  draws = draws_lib.fixed_draws(jax.random.key(draw_seed), num_draws, shape,
                                cache.schedule.num_timesteps)
  param = cache.train_config.parameterization
  t0 = time.perf_counter()
  if approx == "identity":  # C = I: the exact (unprojected) gradient dot product
    return None, draws, 0.0
  if approx == "diagonal":
    state = fit_diagonal(cache.apply_fn, cache.full_params, cache.schedule, train, draws,
                         batch_size=batch_size, parameterization=param)
  else:
    config = dataclasses.replace(lds_cache.unet_config(cache.spec, shape), conv_impl="xla")
    state = fit_kfac(models.make_apply_fn(config), cache.full_params, cache.schedule, train,
                     draws, weight_sharing=weight_sharing, batch_size=batch_size,
                     parameterization=param)
    if approx == "ekfac":
      state = fit_ekfac(cache.apply_fn, cache.full_params, cache.schedule, train, draws, state,
                        batch_size=batch_size, parameterization=param)
  jax.block_until_ready(jax.tree.leaves(state))
  return state, draws, time.perf_counter() - t0


_FITTED: dict = {}


def _fit_once(cache, **options):
  """``fit_curvature``, memoised per cache and options within one process (the tuned
  and the ``_default`` variant of a method share one fit; the time is the fit's)."""
  key = (str(cache.directory), cache.spec.digest(), tuple(sorted(options.items())))
  if key not in _FITTED:
    _FITTED.clear()  # one curvature at a time: a 30M-parameter state is large
    _FITTED[key] = fit_curvature(cache, **options)
  return _FITTED[key]


def influence_method(cache, *, approx: str = "kfac", weight_sharing: str = "expand",
                     num_draws: int = 10, draw_seed: int = 1, measurement: str = "loss",
                     tune: bool = True, grid=DAMPING_FACTOR_GRID, batch_size: int = 50):
  """K-FAC / EK-FAC / diagonal influence on the full-data model."""
  state, draws, seconds = _fit_once(cache, approx=approx, weight_sharing=weight_sharing,
                                    num_draws=num_draws, draw_seed=draw_seed,
                                    batch_size=batch_size)
  param = cache.train_config.parameterization
  loss = measurement_fn("loss", cache.apply_fn, cache.schedule, draws, parameterization=param)
  m_fn = measurement_fn(measurement, cache.apply_fn, cache.schedule, draws,
                        parameterization=param)
  grads = jax.jit(lambda f, x: per_example_flat_grads(f, cache.full_params, x, chunk_size=50),
                  static_argnums=0)
  # N × P and Q × P gradients fit easily at this size: computed once, reused over
  # the damping grid (``influence`` recomputes them tile by tile for large N).
  train_grads = grads(loss, jnp.asarray(cache.train_images))
  query_grads = {}
  unravel = ravel_pytree(cache.full_params)[1]

  def score_fn(hparams, queries):
    key = (queries.name, queries.images.shape)
    if key not in query_grads:
      query_grads[key] = jax.vmap(unravel)(grads(m_fn, jnp.asarray(queries.images)))
    ivp = inverse_vp_fn(state, damping_factor=hparams.get("damping_factor", 0.1))
    return np.asarray(influence_scores(query_grads[key], train_grads, ivp, chunk_size=50))

  score_fn.fit_seconds = seconds
  grid = [{"damping_factor": c} for c in grid] if tune else [{}]
  return score_fn, grid


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
  out["diagonal_ggn"] = functools.partial(influence_method, approx="diagonal")
  out["grad_dot_exact"] = functools.partial(influence_method, approx="identity", tune=False)
  return out


VARIANTS = _variants()
