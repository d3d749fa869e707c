"""Random projection of per-example gradients, regenerated from a seed.

TRAK-style features compress a gradient g ∈ R^P to

    φ = Pᵀ g ∈ R^k,      P_{pj} ~ N(0, 1)/√k   or   ±1/√k (Rademacher),

so that inner products are preserved in expectation, E[φ_iᵀ φ_j] = g_iᵀ E[P Pᵀ] g_j
= g_iᵀ g_j (E[P Pᵀ] = I), with relative error O(1/√k) (Johnson–Lindenstrauss).

P (P × k, e.g. 10⁷ × 4096) is never stored. The parameter axis is cut into blocks of
``block_size`` rows and block b of P is regenerated from ``fold_in(key(seed), b)``
each time it is needed, so the same seed always gives the same P, independent of
N, of the chunking, and of the device. ``projection_matrix`` materialises it for
tests and small problems.

``featurize`` fuses per-example gradients and projection chunk by chunk: only a
chunk's gradients [chunk_size, P] exist at once, never the full [N, P]. Called
eagerly, the chunks run from a host loop over one compiled chunk program
(``jattr.grads.loop_chunks``), each at the speed of one unchunked call; inside a
caller's ``jit`` they run with ``lax.map``. The price of chunking is regenerating P
once per chunk (P·k random numbers), so use chunks of at least a few dozen examples. Matmuls run at JAX's default precision; set
``jax_default_matmul_precision`` to ``"highest"`` to exclude TF32 on GPUs (its
≈1e-3 relative error is far below the JL error ≈ 1/√k).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

from jattr.diffusion import checks as diffusion_checks
from jattr.grads.per_example import ExampleFn, apply_chunks, flatten_per_example, in_trace
from jattr.progress import Progress
from jattr.types import Params
from jattr.wrt import Selector, restrict

PROJECTION_KINDS = ("gaussian", "rademacher")


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
  """A seeded random projection R^P → R^k (static and hashable).

  Attributes:
    dim: k, the projected dimension.
    kind: ``"gaussian"`` (entries N(0, 1)/√k) or ``"rademacher"`` (±1/√k).
    seed: integer seed; block b of P comes from ``fold_in(jax.random.key(seed), b)``.
    block_size: rows of P regenerated at a time; memory block_size × k.
  """

  dim: int
  kind: Literal["gaussian", "rademacher"] = "rademacher"
  seed: int = 0
  block_size: int = 1024

  def __post_init__(self):
    if int(self.dim) < 1:
      raise ValueError(f"ProjectionConfig.dim must be >= 1, got {self.dim}")
    if self.kind not in PROJECTION_KINDS:
      raise ValueError(f"ProjectionConfig.kind must be one of {PROJECTION_KINDS}, got {self.kind!r}")
    if int(self.block_size) < 1:
      raise ValueError(f"ProjectionConfig.block_size must be >= 1, got {self.block_size}")


def random_matrix(key: jax.Array, shape: tuple[int, int], kind: str, dtype) -> jax.Array:
  """A [rows, k] block of a projection: N(0,1)/√k or ±1/√k, k = shape[1]."""
  if kind == "gaussian":
    m = jax.random.normal(key, shape, dtype)
  elif kind == "rademacher":
    m = _packed_signs(key, shape, dtype)
  else:
    raise ValueError(f"kind must be one of {PROJECTION_KINDS}, got {kind!r}")
  return m / jnp.sqrt(jnp.asarray(shape[1], dtype))


def _packed_signs(key: jax.Array, shape: tuple[int, int], dtype) -> jax.Array:
  """Uniform ±1 entries, 32 per random word.

  ``jax.random.rademacher`` spends one counter-based hash per entry; regenerating P
  dominated featurization time with it (docs/benchmarks.md). Each uint32 from
  ``jax.random.bits`` carries 32 independent fair bits, so unpacking them gives the
  same distribution for 1/32 of the hashing.
  """
  rows, k = shape
  words = jax.random.bits(key, (rows, -(-k // 32)), jnp.uint32)
  bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
  return (2.0 * bits.reshape(rows, -1)[:, :k].astype(dtype) - 1.0)


def block_matrix(config: ProjectionConfig, block_index, dtype=jnp.float32) -> jax.Array:
  """Rows [b·block_size, (b+1)·block_size) of P, shape [block_size, k]."""
  key = jax.random.fold_in(jax.random.key(config.seed), block_index)
  return random_matrix(key, (config.block_size, config.dim), config.kind, dtype)


def projection_matrix(config: ProjectionConfig, num_params: int, dtype=jnp.float32
                      ) -> jax.Array:
  """The full P [num_params, k] that ``project`` applies block by block.

  Only for tests and small problems: it stores num_params × k numbers.
  """
  num_blocks = -(-int(num_params) // config.block_size)
  blocks = [block_matrix(config, b, dtype) for b in range(num_blocks)]
  return jnp.concatenate(blocks, axis=0)[:num_params]


@functools.partial(jax.jit, static_argnums=0)
def project(config: ProjectionConfig, flat_grads: jax.Array) -> jax.Array:
  """Projects gradients, φ_i = Pᵀ g_i, one block of P at a time.

      Φ = G P = Σ_b G[:, block b] · P_b

  Args:
    config: the projection.
    flat_grads: G, shape [N, P] (``jattr.grads.flatten_per_example`` order).

  Returns:
    Φ, shape [N, k], in ``flat_grads``' dtype.
  """
  if flat_grads.ndim != 2:
    raise ValueError(f"flat_grads must have shape [N, P], got {flat_grads.shape}")
  n, p = flat_grads.shape
  bs, dtype = config.block_size, flat_grads.dtype
  num_full, tail = divmod(p, bs)

  def body(b, acc):
    g_b = jax.lax.dynamic_slice_in_dim(flat_grads, b * bs, bs, axis=1)
    return acc + g_b @ block_matrix(config, b, dtype)

  acc = jnp.zeros((n, config.dim), dtype)
  if num_full:
    acc = jax.lax.fori_loop(0, num_full, body, acc)
  if tail:
    acc = acc + flat_grads[:, num_full * bs:] @ block_matrix(config, num_full, dtype)[:tail]
  return acc


def project_grads_fn(fn: ExampleFn, config: ProjectionConfig
                     ) -> Callable[[Params, Any], jax.Array]:
  """Fuses per-example gradients and projection for one chunk of examples.

      φ_i = Pᵀ ∇_θ fn(θ; z_i)

  Args:
    fn: ``fn(params, example) -> scalar``, for ONE example.
    config: the projection.

  Returns:
    ``features(params, examples [C, ...]) -> [C, k]``.
  """
  batch_grad = jax.vmap(jax.grad(fn), in_axes=(None, 0))

  def features(params, examples):
    return project(config, flatten_per_example(batch_grad(params, examples)))

  return features


def check_finite_params(params: Params) -> None:
  """Raises ValueError naming ``params`` when a parameter is NaN or ±inf.

  A diverged or wrongly loaded model otherwise gives NaN features and, much later,
  NaN scores. One reduction on the device; skipped under a transformation (tracers
  have no values).
  """
  if in_trace(params):
    return
  diffusion_checks.check_finite_params(
      params, consequence="its gradient features would be NaN")


@dataclasses.dataclass(frozen=True)
class _FeatureRows:
  """The chunk kernel of ``featurize`` (hashable: equal (fn, config) share a compile)."""

  fn: ExampleFn
  config: ProjectionConfig

  def __call__(self, params, chunk):
    return project_grads_fn(self.fn, self.config)(params, chunk)


def featurize(fn: ExampleFn, params: Params, examples, config: ProjectionConfig, *,
              chunk_size: int | None = None, progress: Progress | None = None,
              wrt: Selector = None) -> jax.Array:
  """Projected per-example gradients Φ = [Pᵀ ∇_θ fn(θ; z_i)]_i, chunk by chunk.

  With ``wrt`` the gradient is that of the selected leaves θ_S only, the others held
  fixed: φ_i = Pᵀ ∇_{θ_S} fn(θ_S, θ_F; z_i), P of size P_S × k (P_S the number of
  selected parameters, in their leaf order; ``jattr.wrt.restrict``).

  Called eagerly with chunk_size < N, the chunks run from a host loop over one
  compiled chunk program (``jattr.grads.loop_chunks``); inside a caller's ``jit`` they
  run with ``lax.map`` (no progress, no parameter check). Both give the same Φ.

  Args:
    fn: ``fn(params, example) -> scalar``, for ONE example (e.g. a
      ``jattr.diffusion.measurements.measurement_fn``); hashable (a ``jax.jit``
      static argument: the same fn reuses its compiled program).
    params: θ.
    examples: pytree with leading axis N.
    config: the projection.
    chunk_size: examples whose gradients exist at once; ``None`` = all N.
    progress: called after each chunk with examples done (``jattr.progress``).
    wrt: the leaves to differentiate (``None``: all; see ``jattr.wrt``).

  Returns:
    Φ, shape [N, k].

  Raises:
    ValueError: ``params`` (frozen leaves included) hold NaN or inf (eager calls),
      or ``wrt`` selects no leaf.
  """
  check_finite_params(params)
  fn, params = restrict(fn, params, wrt)
  return apply_chunks(_FeatureRows(fn, config), params, examples, chunk_size=chunk_size,
                      progress=progress, desc="featurize")
