"""The encoded ensemble (Dai & Gifford 2023) as an LDS-harness method.

``ensemble_method(cache, ...)`` trains (once; resumable and cached inside the LDS
cache, ``jattr.bench.ensemble_cache``) M members on a binary-code design over the
cache's training set with the cache's recipe, measures every member on every
query split, and scores

    τ[q, i] = mean_{m: ¬A[m,i]} y[q, m] − mean_{m: A[m,i]} y[q, m]

(``jattr.methods.ensembles.ensemble_scores``). The members are NOT the LDS subset
models, so the LDS of τ is out of sample (docs/ensembles.md §4), and the members'
measurement draws (``draw_seed`` 1) are not the benchmark's (seed 0).
"""

from __future__ import annotations

from jattr.bench import ensemble_cache
from jattr.methods import ensembles


def ensemble_method(cache, *, num_members: int = 32, design: str = "binary_code",
                    design_seed: int = 0, seed: int = 2, num_draws: int = 100,
                    draw_seed: int = 1, strategy: str = "map", progress=None):
  """Harness factory ``(score_fn, [{}])``; the cost is the members' training (cached)."""
  spec = ensemble_cache.EnsembleSpec(num_members=num_members, design=design,
                                     design_seed=design_seed, seed=seed)
  ens = ensemble_cache.build(cache, spec, strategy=strategy, progress=progress)
  y = ensemble_cache.measure_splits(ens, cache, num_draws=num_draws, draw_seed=draw_seed)
  return ensembles.ensemble_score_fn(ens.masks, y), [{}]
