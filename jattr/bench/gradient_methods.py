"""Gradient-feature methods (TRAK, D-TRAK, gradient dot/cosine) for the LDS harness.

Each factory has the harness signature ``factory(cache, **options) -> (score_fn, grid)``
(``jattr.bench.registry``): it featurises the cache's training set once, under the
full-data model, and ``score_fn(hparams, queries)`` featurises the queries with the
same output function, draws and projection and returns τ [Q, N].

    φ_i = Pᵀ ∇_θ f(θ; x_i),   τ[q, i] = φ_qᵀ (ΦᵀΦ + λ I)⁻¹ φ_i,   λ = c · tr(ΦᵀΦ)/k

(``jattr.methods.trak``). The relative damping c is the only hyper-parameter; the
grid spans seven decades and is chosen on validation queries only. The (t, ε) draws
of the features use ``draw_seed`` (default 1), not the benchmark's measurement
draws (seed 0): a method must not see the noise its evaluation uses.

Two featurisers give φ: ``feature_fn`` (dense projection P of the per-example
gradient, of all parameters or, with ``covered="kernels"``, of the Conv/Linear
kernels only) and ``structured_feature_fn`` (the Kronecker projection
P_in ⊗ P_out per kernel, ``jattr.features.structured``, which never forms the
gradient and covers the kernels only).

Every factory takes ``wrt`` (a ``jattr.wrt`` selector; ``None``: all parameters):
the gradients are taken with respect to the selected parameters only, the others
held fixed (``featurize(..., wrt=...)``); for ``structured_feature_fn`` it selects
layers by the names the UNet gives its ``layer`` calls.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
from flax import traverse_util

from jattr import models
from jattr.diffusion import conditioning
from jattr.diffusion import draws as draws_lib
from jattr.diffusion.measurements import measurement_fn
from jattr.features.projection import ProjectionConfig, featurize
from jattr.features.structured import StructuredConfig, structured_featurize
from jattr.bench.lds_cache import unet_config
from jattr.methods import baselines
from jattr.methods.trak import trak_fit, trak_score

RELATIVE_DAMPING_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _measurement_factory(cache, measurement: str, num_draws: int, draw_seed: int,
                         timesteps: str):
  """``apply_fn -> f(θ; x₀)``: ``measurement`` over ``num_draws`` draws of ``draw_seed``."""
  shape = tuple(cache.train_images.shape[1:])
  draws = draws_lib.fixed_draws(jax.random.key(draw_seed), num_draws, shape,
                                cache.schedule.num_timesteps, timesteps=timesteps)
  return functools.partial(measurement_fn, measurement, schedule=cache.schedule, draws=draws,
                           parameterization=cache.train_config.parameterization)


def _split_kernels(params):
  """(kernels, rest): the Conv/Linear kernels of a params dict and everything else."""
  flat = traverse_util.flatten_dict(params)
  kernels = {p: v for p, v in flat.items() if p[-1] == "kernel"}
  rest = {p: v for p, v in flat.items() if p[-1] != "kernel"}
  return traverse_util.unflatten_dict(kernels), rest


def feature_fn(cache, *, measurement: str = "loss", num_draws: int = 10, draw_seed: int = 1,
               timesteps: str = "uniform", dim: int = 4096, kind: str = "rademacher",
               projection_seed: int = 0, chunk_size: int = 25, covered: str = "all",
               wrt=None, nonzeros: int = 2, grad_dtype: str | None = None,
               store_dtype: str | None = None):
  """``features(images [B, H, W, C]) -> Φ [B, k]`` for the cache's full-data model.

  ``covered="kernels"`` projects the gradient of the Conv/Linear kernels only (the
  parameters the structured projection covers), holding biases and norms fixed.
  ``wrt``: the ``jattr.wrt`` selector of the parameters differentiated (within
  ``covered``'s); ``None``: all. ``nonzeros``: s of a ``kind="sparse"`` projection.
  ``grad_dtype="bfloat16"``: the gradients computed with the model in bf16
  (``ProjectionConfig.grad_dtype``). ``store_dtype="bfloat16"``: Φ rounded to bf16
  and back, as a bf16 ``FeatureStore`` keeps and reads it.
  """
  if covered not in ("all", "kernels"):
    raise ValueError(f"covered must be 'all' or 'kernels', got {covered!r}")
  if store_dtype not in (None, "float32", "bfloat16"):
    raise ValueError(f"store_dtype must be None, 'float32' or 'bfloat16', got {store_dtype!r}")
  fn = _measurement_factory(cache, measurement, num_draws, draw_seed, timesteps)(cache.apply_fn)
  config = ProjectionConfig(dim=dim, kind=kind, seed=projection_seed, nonzeros=nonzeros,
                            grad_dtype=grad_dtype)
  params = cache.full_params
  if covered == "kernels":
    params, rest = _split_kernels(params)
    full_fn = fn

    def fn(kernels, x0):
      merged = {**traverse_util.flatten_dict(kernels), **rest}
      return full_fn(traverse_util.unflatten_dict(merged), x0)

  def features(examples):
    examples = conditioning.asarray(examples, _dtype(cache.full_params))
    n = conditioning.count(examples)
    phi = featurize(fn, params, examples, config, chunk_size=min(chunk_size, n), wrt=wrt)
    return phi if store_dtype is None else as_stored(phi, store_dtype)

  return features


def as_stored(phi, dtype: str = "bfloat16"):
  """Φ as a ``FeatureStore`` of ``dtype`` returns it: cast to float32, rounded to
  ``dtype`` (numpy's round-to-nearest-even, what ``write_chunk`` does), read back as
  float32; in Φ's dtype."""
  stored = np.asarray(phi, np.float32).astype(jax.numpy.dtype(dtype)).astype(np.float32)
  return jax.numpy.asarray(stored, jax.numpy.result_type(phi))


def structured_feature_fn(cache, *, measurement: str = "loss", num_draws: int = 10,
                          draw_seed: int = 1, timesteps: str = "uniform", dim_in: int = 20,
                          dim_out: int = 8, kind: str = "rademacher", projection_seed: int = 0,
                          chunk_size: int = 25, wrt=None):
  """``features(images) -> Φ [B, L·k_in·k_out]``: Kronecker-projected kernel gradients.

  The cache's UNet is rebuilt with its kernels routed through the structured
  projection's ``layer`` (``jattr.models.make_layered_apply_fn``); L is its number
  of Conv/Linear layers (26 for the digits benchmark UNet). ``wrt`` selects layers
  by their ``layer`` names (``jattr.features.structured``); ``None``: all.
  """
  layered = models.make_layered_apply_fn(
      unet_config(cache.spec, tuple(cache.train_images.shape[1:])))
  make_f = _measurement_factory(cache, measurement, num_draws, draw_seed, timesteps)

  def fn(params, x0, layer):
    return make_f(functools.partial(layered, layer=layer))(params, x0)

  config = StructuredConfig(dim_in=dim_in, dim_out=dim_out, kind=kind, seed=projection_seed)
  params = cache.full_params

  def features(examples):
    examples = conditioning.asarray(examples, _dtype(cache.full_params))
    return structured_featurize(fn, params, examples, config,
                                chunk_size=min(chunk_size, conditioning.count(examples)), wrt=wrt)

  return features


def _dtype(params):
  """The images are cast to the parameters' dtype (float32, or float64 in tests)."""
  return jax.tree.leaves(params)[0].dtype


def cached_query_features(features):
  """Featurises each query split once (the λ grid reuses them)."""
  memo = {}

  def get(queries):
    key = queries.memo_key
    if key not in memo:
      memo[key] = features(queries.examples)
    return memo[key]

  return get


def trak_method(cache, *, grid=RELATIVE_DAMPING_GRID, featurizer=feature_fn,
                **feature_options):
  """TRAK (f = loss) or D-TRAK (any other f) on the full-data model.

  ``featurizer`` is ``feature_fn`` (dense projection) or ``structured_feature_fn``.
  """
  timing = {"featurize_train_s": 0.0, "featurize_queries_s": 0.0}

  def timed(examples, stage):  # featurisation wall time, compile included (train first)
    t0 = time.perf_counter()
    out = jax.block_until_ready(featurize_examples(examples))
    timing[stage] += time.perf_counter() - t0
    return out

  featurize_examples = featurizer(cache, **feature_options)
  train = timed(cache.train_examples, "featurize_train_s")
  query_features = cached_query_features(lambda x: timed(x, "featurize_queries_s"))
  states = {}

  def score_fn(hparams, queries):
    c = hparams.get("relative_damping")  # absent: the library default rule
    if c not in states:
      states[c] = trak_fit(train, relative_damping=c)
    return np.asarray(trak_score(states[c], query_features(queries)))

  score_fn.timing = timing  # read by the harness after scoring (jattr.bench.drivers)
  return score_fn, [c if isinstance(c, dict) else {"relative_damping": c} for c in grid]


def grad_similarity_method(cache, *, similarity: str = "dot", **feature_options):
  """Gradient dot product or cosine of the projected features (no curvature)."""
  if similarity not in ("dot", "cosine"):
    raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
  features = feature_fn(cache, **feature_options)
  train = features(cache.train_examples)
  query_features = cached_query_features(features)
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
  # D-TRAK's CIFAR-2 projection, k = 32,768 features (``_dim32768``; ``_k100`` above is
  # K = 100 draws), beside the default k = 4096, at K = 10 and 100
  # (experiments/cifar2, docs/cifar2.md).
  for k in (10, 100):
    suffix = ("" if k == 10 else f"_k{k}") + "_dim32768"
    out[f"trak{suffix}"] = functools.partial(trak_method, measurement="loss", num_draws=k,
                                             dim=32768)
    for f in ("square_norm", "l2_norm", "l1_norm", "linf_norm", "mean", "weighted_loss"):
      out[f"dtrak_{f}{suffix}"] = functools.partial(trak_method, measurement=f, num_draws=k,
                                                    dim=32768)
  out["trak_gaussian"] = functools.partial(trak_method, measurement="loss", kind="gaussian")
  out["dtrak_square_norm_gaussian"] = functools.partial(trak_method, measurement="square_norm",
                                                        kind="gaussian")
  # The sparse projection (s non-zeros per row of P, P·s adds per example instead of
  # the dense 2·P·k flops), against the dense Rademacher rows above.
  # Another dense P (seed 1) is the projection's own noise, the yardstick of these.
  for f, prefix in (("loss", "trak"), ("square_norm", "dtrak_square_norm"), ("mean", "dtrak_mean")):
    for nz in (1, 2, 4):
      out[f"{prefix}_sparse_s{nz}"] = functools.partial(trak_method, measurement=f,
                                                        kind="sparse", nonzeros=nz)
    out[f"{prefix}_proj_seed1"] = functools.partial(trak_method, measurement=f, projection_seed=1)
    out[f"{prefix}_sparse_s2_proj_seed1"] = functools.partial(
        trak_method, measurement=f, kind="sparse", nonzeros=2, projection_seed=1)
  # Kernels only (biases and GroupNorm, 3.8% of the digits UNet, left out): the
  # structured projection with k_in × k_out = 20 × 8 per layer (4160 features over
  # the 26 layers; k_out = 8 = d_out of most layers, more would repeat the same
  # 8 output directions) or 12 × 12 (LoGra's square choice, 3744), and the dense
  # projection (k = 4096) of the same kernels, to separate "which parameters" from
  # "which projection".
  for f, prefix in (("loss", "trak"), ("square_norm", "dtrak_square_norm")):
    out[f"{prefix}_structured"] = functools.partial(
        trak_method, featurizer=structured_feature_fn, measurement=f, dim_in=20, dim_out=8)
    out[f"{prefix}_structured_12x12"] = functools.partial(
        trak_method, featurizer=structured_feature_fn, measurement=f, dim_in=12, dim_out=12)
    out[f"{prefix}_kernels"] = functools.partial(trak_method, measurement=f, covered="kernels")
  # The library default with no tuning: λ at which the kernel's effective dimension
  # is a quarter of its rank (``jattr.methods.trak.effective_dimension_damping``);
  # ``*_c1e-3`` the old default c = 1e-3 (λ = 1e-3 · tr(ΦᵀΦ)/k), for the record.
  for prefix, f in (("trak", "loss"), ("dtrak_square_norm", "square_norm"),
                    ("dtrak_mean", "mean")):
    out[f"{prefix}_default"] = functools.partial(trak_method, measurement=f, grid=({},))
    out[f"{prefix}_c1e-3"] = functools.partial(trak_method, measurement=f, grid=(1e-3,))
    # bf16: the gradients computed with the model in bf16 (projected in float32), or
    # float32 features rounded to bf16 as a bf16 feature store keeps them.
    out[f"{prefix}_default_bf16_grads"] = functools.partial(
        trak_method, measurement=f, grid=({},), grad_dtype="bfloat16")
    out[f"{prefix}_default_bf16_store"] = functools.partial(
        trak_method, measurement=f, grid=({},), store_dtype="bfloat16")
  out["grad_dot"] = functools.partial(grad_similarity_method, similarity="dot")
  out["grad_cosine"] = functools.partial(grad_similarity_method, similarity="cosine")
  out["grad_cosine_square_norm"] = functools.partial(grad_similarity_method, similarity="cosine",
                                                     measurement="square_norm")
  return out


LDS_VARIANTS = _variants()
