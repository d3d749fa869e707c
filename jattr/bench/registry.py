"""The methods the LDS harness knows, by name (``jattr lds --method NAME``).

Adding a method: register ``METHODS[name] = factory`` where
``factory(cache, **options) -> (score_fn, grid)``; ``score_fn(hparams, queries)``
returns τ [Q, N] (positive = proponent) and ``grid`` lists the candidate
hyper-parameters (``[{}]`` if none). Hyper-parameters are chosen on validation
queries only (``jattr.eval.selection.select_and_evaluate``).

With respect to a subset of the parameters: the factories of ``WRT_METHODS`` (the
gradient-feature, influence and unlearning methods) take ``wrt=`` (a ``jattr.wrt``
selector, a regex in a config); an experiment config names such a variant under
``variants`` (``{"trak_lora": {"method": "trak", "wrt": "^lora/"}}``) and
``jattr lds --wrt REGEX`` scores every requested one of them w.r.t. REGEX
(``method_factory``).
"""

from __future__ import annotations

import functools
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


WRT_METHODS = frozenset({*gradient_methods.LDS_VARIANTS, *curvature_methods.LDS_VARIANTS,
                         *mucs_method.LDS_VARIANTS})
"""The methods whose factories take ``wrt=`` (they differentiate or move parameters);
the others (random, pixel cosine, the ensemble, score files) do not depend on a
selection of the parameters."""


def method_factory(name: str, variants: dict | None = None, wrt=None
                   ) -> tuple[str, Callable]:
  """``(report name, factory(cache) -> (score_fn, grid))`` of a method or a variant.

  Args:
    name: a ``METHODS`` name, or a key of ``variants``.
    variants: ``{name: {"method": METHODS name, **options}}`` (an experiment
      config's ``variants``): the method's factory with those options, e.g.
      ``{"method": "trak", "wrt": "^lora/"}``.
    wrt: a selector to score with (``jattr lds --wrt``): applied to the methods of
      ``WRT_METHODS``, whose report name becomes ``"NAME[wrt=REGEX]"`` (so it never
      overwrites the row of the method w.r.t. all parameters); others unchanged.

  Raises:
    ValueError: an unknown name, or a variant of an unknown method, or ``wrt`` given
      both in the variant and as an argument.
  """
  variants = variants or {}
  if name in variants:
    options = dict(variants[name])
    base = options.pop("method", None)
  elif name in METHODS:
    options, base = {}, name
  else:
    raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)} and the config's "
                     f"variants {sorted(variants)}")
  if base not in METHODS:
    raise ValueError(f"variant {name!r}: method = {base!r} is not one of {sorted(METHODS)}")
  if "wrt" in options and base not in WRT_METHODS:
    raise ValueError(f"variant {name!r}: method {base!r} takes no wrt (it does not depend on "
                     f"a selection of the parameters); wrt is for {sorted(WRT_METHODS)}")
  if wrt is not None and base in WRT_METHODS:
    if "wrt" in options:
      raise ValueError(f"variant {name!r} has its own wrt={options['wrt']!r}; do not also "
                       f"pass --wrt {wrt!r}")
    options["wrt"] = wrt
    name = f"{name}[wrt={wrt}]"
  factory = METHODS[base]
  return name, (functools.partial(factory, **options) if options else factory)
