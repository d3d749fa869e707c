"""The methods the LDS harness knows, by name (``jattr lds --method NAME``).

Adding a method: register ``METHODS[name] = factory`` where
``factory(cache, **options) -> (score_fn, grid)``; ``score_fn(hparams, queries)``
returns τ [Q, N] (positive = proponent) and ``grid`` lists the candidate
hyper-parameters (``[{}]`` if none). Hyper-parameters are chosen on validation
queries only (``jattr.eval.selection.select_and_evaluate``).
"""

from __future__ import annotations

import pathlib
import zlib
from typing import Callable

import jax.numpy as jnp
import numpy as np

from jattr.bench import (curvature_methods, ensemble_method, gradient_methods, lds_cache,
                         mucs_method)
from jattr.methods.baselines import pixel_cosine


def random_method(cache: lds_cache.LdsCache, seed: int = 0):
  """τ[q, i] ~ N(0, 1), fixed per split: a harness check whose LDS must be ~0."""
  n = cache.masks.shape[1]

  def score_fn(hparams, queries):
    rng = np.random.default_rng([seed, zlib.crc32(queries.name.encode())])
    return rng.normal(size=(queries.images.shape[0], n))

  return score_fn, [{}]


def pixel_cosine_method(cache: lds_cache.LdsCache):
  """τ[q, i] = cos(x_q, x_i) of flattened pixels (``jattr.methods.baselines``)."""
  train = jnp.asarray(cache.train_images)

  def score_fn(hparams, queries):
    return np.asarray(pixel_cosine(jnp.asarray(queries.images), train))

  return score_fn, [{}]


def scores_file_method(path: str | pathlib.Path):
  """Precomputed τ from an .npz with one [Q, N] array per split name."""
  with np.load(path) as z:
    table = {k: np.asarray(z[k]) for k in z.files}

  def score_fn(hparams, queries):
    if queries.name not in table:
      raise ValueError(f"{path} has no scores for the {queries.name!r} split; found "
                       f"{sorted(table)}")
    return table[queries.name]

  return score_fn, [{}]


METHODS: dict[str, Callable] = {
    "random": random_method,
    "pixel_cosine": pixel_cosine_method,
    **gradient_methods.LDS_VARIANTS,
    **curvature_methods.LDS_VARIANTS,
    "ensemble": ensemble_method.ensemble_method,
    **mucs_method.LDS_VARIANTS,
}
