"""Gradient-feature methods (TRAK, D-TRAK, gradient dot/cosine) for the LDS harness.

Each factory has the harness signature ``factory(cache, **options) -> (score_fn, grid)``
(``jattr.eval.cli``): it featurises the cache's training set once, under the
full-data model, and ``score_fn(hparams, queries)`` featurises the queries with the
same output function, draws and projection and returns τ [Q, N].

    φ_i = Pᵀ ∇_θ f(θ; x_i),   τ[q, i] = φ_qᵀ (ΦᵀΦ + λ I)⁻¹ φ_i,   λ = c · tr(ΦᵀΦ)/k

(``jattr.methods.trak``). The relative damping c is the only hyper-parameter; the
grid spans seven decades and is chosen on validation queries only. The (t, ε) draws
of the features use ``draw_seed`` (default 1), not the benchmark's measurement
draws (seed 0): a method must not see the noise its evaluation uses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jattr.diffusion import draws as draws_lib
from jattr.diffusion.measurements import measurement_fn
from jattr.features.projection import ProjectionConfig, featurize
from jattr.methods import baselines
from jattr.methods.trak import trak_fit, trak_score

RELATIVE_DAMPING_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def feature_fn(cache, *, measurement: str = "loss", num_draws: int = 10, draw_seed: int = 1,
               timesteps: str = "uniform", dim: int = 4096, kind: str = "rademacher",
               projection_seed: int = 0, chunk_size: int = 25):
  """``features(images [B, H, W, C]) -> Φ [B, k]`` for the cache's full-data model."""
  shape = tuple(cache.train_images.shape[1:])
  draws = draws_lib.fixed_draws(jax.random.key(draw_seed), num_draws, shape,
                                cache.schedule.num_timesteps, timesteps=timesteps)
  fn = measurement_fn(measurement, cache.apply_fn, cache.schedule, draws,
                      parameterization=cache.train_config.parameterization)
  config = ProjectionConfig(dim=dim, kind=kind, seed=projection_seed)
  params = cache.full_params

  def features(images):
    images = jnp.asarray(images, jnp.float32)
    return featurize(fn, params, images, config, chunk_size=min(chunk_size, images.shape[0]))

  return features


def _cached_query_features(features):
  """Featurises each query split once (the λ grid reuses them)."""
  memo = {}

  def get(queries):
    key = (queries.name, queries.images.shape)
    if key not in memo:
      memo[key] = features(queries.images)
    return memo[key]

  return get


def trak_method(cache, *, grid=RELATIVE_DAMPING_GRID, **feature_options):
  """TRAK (f = loss) or D-TRAK (any other f) on the full-data model."""
  features = feature_fn(cache, **feature_options)
  train = features(cache.train_images)
  query_features = _cached_query_features(features)
  states = {}

  def score_fn(hparams, queries):
    c = hparams["relative_damping"]
    if c not in states:
      states[c] = trak_fit(train, relative_damping=c)
    return np.asarray(trak_score(states[c], query_features(queries)))

  return score_fn, [{"relative_damping": c} for c in grid]


def grad_similarity_method(cache, *, similarity: str = "dot", **feature_options):
  """Gradient dot product or cosine of the projected features (no curvature)."""
  if similarity not in ("dot", "cosine"):
    raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
  features = feature_fn(cache, **feature_options)
  train = features(cache.train_images)
  query_features = _cached_query_features(features)
  score = baselines.grad_dot if similarity == "dot" else baselines.grad_cosine

  def score_fn(hparams, queries):
    return np.asarray(score(query_features(queries), train))

  return score_fn, [{}]


def _variants() -> dict:
  """The named variants the harness knows (``jattr lds --method NAME``)."""
  out = {}
  for k in (10, 100):
    suffix = "" if k == 10 else f"_k{k}"
    out[f"trak{suffix}"] = functools.partial(trak_method, measurement="loss", num_draws=k)
    for f in ("square_norm", "l2_norm", "l1_norm", "linf_norm", "mean", "weighted_loss"):
      out[f"dtrak_{f}{suffix}"] = functools.partial(trak_method, measurement=f, num_draws=k)
  out["trak_gaussian"] = functools.partial(trak_method, measurement="loss", kind="gaussian")
  out["dtrak_square_norm_gaussian"] = functools.partial(trak_method, measurement="square_norm",
                                                        kind="gaussian")
  out["grad_dot"] = functools.partial(grad_similarity_method, similarity="dot")
  out["grad_cosine"] = functools.partial(grad_similarity_method, similarity="cosine")
  out["grad_cosine_square_norm"] = functools.partial(grad_similarity_method, similarity="cosine",
                                                     measurement="square_norm")
  return out


VARIANTS = _variants()
