"""Random projection of per-example gradients, regenerated from a seed.

TRAK-style features compress a gradient g ∈ R^P to

    φ = Pᵀ g ∈ R^k,      P_{pj} ~ N(0, 1)/√k   or   ±1/√k (Rademacher),

so that inner products are preserved in expectation, E[φ_iᵀ φ_j] = g_iᵀ E[P Pᵀ] g_j
= g_iᵀ g_j (E[P Pᵀ] = I), with relative error O(1/√k) (Johnson–Lindenstrauss).

A dense P costs 2·P·k flops per example, an order of magnitude more than the
gradient it compresses once k is in the thousands. The ``"sparse"`` kind is a
sparse Johnson–Lindenstrauss transform (a block count-sketch): the k columns are
cut into s = ``nonzeros`` blocks of m = k/s, and row p of P has one entry ±1/√s in
each block, at a hashed column h_l(p) with an independent fair sign σ_l(p):

    P_{p, l·m + h_l(p)} = σ_l(p)/√s,   l = 0 … s−1,   every other entry 0.

Then E[P Pᵀ] = I again (the diagonal is Σ_l 1/s = 1; off the diagonal each term
has a fair sign), so inner products stay unbiased, and their variance is that of
the dense Rademacher P: Var[φ_iᵀφ_j] = (‖g_i‖²‖g_j‖² + (g_iᵀg_j)² − 2Σ_p g_{ip}²g_{jp}²)/k
(each of the s blocks is a count-sketch of width m, with variance k/m = s times
that, averaged over s independent blocks). What s buys is lighter tails when a
few coordinates carry most of a gradient. Projecting costs P·s scatter-adds.

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

bf16 gradients. ``ProjectionConfig(grad_dtype="bfloat16")`` computes each per-example
gradient with the parameters (frozen ones included) and the example's float leaves
cast to bfloat16, so the model's forward and backward passes run in bf16; the
gradient (bf16 values) is cast back to each parameter's own dtype and projected
there (float32 for a float32 model: P is the same P, and the projection's sums are
not rounded to bf16). Only the functions that take gradients from a config
(``project_grads_fn``, ``featurize``) read it; ``project`` projects what it is given.
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

DENSE_KINDS = ("gaussian", "rademacher")
"""The kinds with a dense P (``random_matrix``; the structured projection's too)."""
PROJECTION_KINDS = DENSE_KINDS + ("sparse",)
GRAD_DTYPES = ("bfloat16",)
"""The low precisions ``ProjectionConfig.grad_dtype`` may name (``None``: the model's own)."""
_SCATTER_ROWS = 8192
"""Rows of P scattered per step of the sparse projection (whole blocks of it)."""


@dataclasses.dataclass(frozen=True)
class ProjectionConfig:
  """A seeded random projection R^P → R^k (static and hashable).

  Attributes:
    dim: k, the projected dimension.
    kind: ``"gaussian"`` (entries N(0, 1)/√k), ``"rademacher"`` (±1/√k) or
      ``"sparse"`` (``nonzeros`` entries ±1/√nonzeros per row; module docstring).
    seed: integer seed; block b of P comes from ``fold_in(jax.random.key(seed), b)``.
    block_size: rows of P regenerated at a time; memory block_size × k (dense) or
      block_size × nonzeros (sparse).
    nonzeros: s, the non-zeros per row of a ``"sparse"`` P; k must be a multiple of
      s. Ignored by the dense kinds (and left out of their ``projection_spec``).
    grad_dtype: ``None`` (the gradients in the parameters' dtype, as always) or
      ``"bfloat16"`` (``jnp.bfloat16`` is accepted and stored as its name): the
      per-example gradients of ``project_grads_fn`` / ``featurize`` are computed with
      params and examples cast to bf16, then projected in the parameters' dtype
      (module docstring). Left out of ``projection_spec`` when ``None``, so stores
      made before the option read as ``None`` and a bf16 store never matches one.
  """

  dim: int
  kind: Literal["gaussian", "rademacher", "sparse"] = "rademacher"
  seed: int = 0
  block_size: int = 1024
  nonzeros: int = 2
  grad_dtype: str | None = None

  def __post_init__(self):
    if self.grad_dtype is not None:
      try:
        name = jnp.dtype(self.grad_dtype).name
      except TypeError:
        name = repr(self.grad_dtype)
      if name not in GRAD_DTYPES:
        raise ValueError(f"ProjectionConfig.grad_dtype must be None (the parameters' dtype) "
                         f"or one of {GRAD_DTYPES}, got {self.grad_dtype!r}")
      object.__setattr__(self, "grad_dtype", name)  # the name: hashable, JSON-able
    if int(self.dim) < 1:
      raise ValueError(f"ProjectionConfig.dim must be >= 1, got {self.dim}")
    if self.kind not in PROJECTION_KINDS:
      raise ValueError(f"ProjectionConfig.kind must be one of {PROJECTION_KINDS}, got {self.kind!r}")
    if int(self.block_size) < 1:
      raise ValueError(f"ProjectionConfig.block_size must be >= 1, got {self.block_size}")
    if self.kind == "sparse":
      if int(self.nonzeros) < 1:
        raise ValueError(f"ProjectionConfig.nonzeros must be >= 1, got {self.nonzeros}")
      if int(self.dim) % int(self.nonzeros):
        raise ValueError(f"ProjectionConfig.dim = {self.dim} must be a multiple of nonzeros = "
                         f"{self.nonzeros} (the sparse P has one non-zero per row in each of "
                         f"nonzeros column blocks of dim / nonzeros)")


def random_matrix(key: jax.Array, shape: tuple[int, int], kind: str, dtype) -> jax.Array:
  """A [rows, k] block of a projection: N(0,1)/√k or ±1/√k, k = shape[1]."""
  if kind == "gaussian":
    m = jax.random.normal(key, shape, dtype)
  elif kind == "rademacher":
    m = _packed_signs(key, shape, dtype)
  else:
    raise ValueError(f"kind must be one of {DENSE_KINDS}, got {kind!r}")
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


def sparse_rows(config: ProjectionConfig, block_indices, dtype=jnp.float32
                ) -> tuple[jax.Array, jax.Array]:
  """The non-zeros of blocks ``block_indices`` of a sparse P, in row order.

  Row p of block b gets, in each column block l < s (width m = k/s), the column
  l·m + h_l(p) and the value σ_l(p)/√s, both from one uint32 word of
  ``jax.random.bits(fold_in(key(seed), b), (block_size, s))``: the low bit is the
  sign, the other 31 bits modulo m the column (bias ≤ m/2³¹ in the column's
  distribution; none in the sign, which is what makes E[P Pᵀ] = I).

  Returns:
    ``(columns, values)``, each [len(block_indices)·block_size, s]: int32 columns
    in [0, k) and values ±1/√s.
  """
  s, bs = int(config.nonzeros), config.block_size
  m = config.dim // s

  def one(b):
    key = jax.random.fold_in(jax.random.key(config.seed), b)
    return jax.random.bits(key, (bs, s), jnp.uint32)

  words = jax.vmap(one)(jnp.asarray(block_indices)).reshape(-1, s)
  columns = ((words >> 1) % jnp.uint32(m)).astype(jnp.int32) + m * jnp.arange(s, dtype=jnp.int32)
  values = ((words & jnp.uint32(1)).astype(dtype) * 2 - 1) / jnp.sqrt(jnp.asarray(s, dtype))
  return columns, values


def block_matrix(config: ProjectionConfig, block_index, dtype=jnp.float32) -> jax.Array:
  """Rows [b·block_size, (b+1)·block_size) of P, shape [block_size, k]."""
  if config.kind == "sparse":
    columns, values = sparse_rows(config, jnp.asarray(block_index)[None], dtype)
    rows = jnp.arange(config.block_size)[:, None]
    return jnp.zeros((config.block_size, config.dim), dtype).at[rows, columns].add(values)
  key = jax.random.fold_in(jax.random.key(config.seed), block_index)
  return random_matrix(key, (config.block_size, config.dim), config.kind, dtype)


def projection_matrix(config: ProjectionConfig, num_params: int, dtype=jnp.float32
                      ) -> jax.Array:
  """The full P [num_params, k] that ``project`` applies block by block.

  Only for tests and small problems: it stores num_params × k numbers.
  """
  num_blocks = -(-int(num_params) // config.block_size)
  # vmapped over the blocks (eagerly: a compiled program per seed would cost more)
  blocks = jax.vmap(lambda b: block_matrix(config, b, dtype))(jnp.arange(num_blocks))
  return blocks.reshape(-1, config.dim)[:num_params]


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
  if config.kind == "sparse":
    return _project_sparse(config, flat_grads.T).T
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


def _project_sparse(config: ProjectionConfig, grads_t: jax.Array) -> jax.Array:
  """Φᵀ = Pᵀ Gᵀ for a sparse P, from Gᵀ [P, C]: Φᵀ[c] += v·Gᵀ[p] per non-zero (p, c, v).

  Whole blocks of P are scattered a group at a time (about ``_SCATTER_ROWS`` rows:
  one scatter of rows × s updates, each a contiguous row of C numbers, into Φᵀ
  [k, C]; scattering columns of Φ [C, k] instead ran 8× slower on jaxlib 0.10's
  CPU backend), so the cost is P·s adds per example, and no more than
  group × block_size × s non-zeros exist at once.

  Returns:
    Φᵀ, [k, C].
  """
  p, n = grads_t.shape
  bs, dtype = config.block_size, grads_t.dtype
  group = max(1, _SCATTER_ROWS // bs)
  span = group * bs
  num_groups, rest = divmod(p, span)

  def scatter(acc_t, g_t, first_block, num_blocks):
    columns, values = sparse_rows(config, first_block + jnp.arange(num_blocks), dtype)
    rows = g_t.shape[0]
    updates = (values[:rows, :, None] * g_t[:, None, :]).reshape(-1, n)
    return acc_t.at[columns[:rows].reshape(-1)].add(updates, mode="promise_in_bounds")

  def body(i, acc_t):
    g_t = jax.lax.dynamic_slice_in_dim(grads_t, i * span, span, axis=0)
    return scatter(acc_t, g_t, i * group, group)

  acc_t = jnp.zeros((config.dim, n), dtype)
  if num_groups:
    acc_t = jax.lax.fori_loop(0, num_groups, body, acc_t)
  if rest:
    acc_t = scatter(acc_t, grads_t[num_groups * span:], num_groups * group, -(-rest // bs))
  return acc_t


def _cast_floats(tree, dtype):
  """``tree`` with its floating leaves cast to ``dtype`` (integer labels etc. kept)."""
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a),
                                                                   jnp.floating) else a, tree)


@dataclasses.dataclass(frozen=True)
class InDtype:
  """``fn(params, example)`` evaluated on params and example cast to ``dtype``.

  Differentiated with respect to the uncast params, the gradient comes back in the
  params' dtype holding the ``dtype`` gradient's values (the cast's transpose casts
  the cotangent back), so the model's forward and backward passes run in ``dtype``.
  Hashable (a ``jax.jit`` static argument) when ``fn`` is.
  """

  fn: ExampleFn
  dtype: str

  def __call__(self, params, example):
    return self.fn(_cast_floats(params, self.dtype), _cast_floats(example, self.dtype))


def in_grad_dtype(fn: ExampleFn, config: ProjectionConfig) -> ExampleFn:
  """``fn`` run in ``config.grad_dtype`` (``InDtype``), or ``fn`` itself for ``None``."""
  if config.grad_dtype is None or (isinstance(fn, InDtype) and fn.dtype == config.grad_dtype):
    return fn
  return InDtype(fn, config.grad_dtype)


def project_grads_fn(fn: ExampleFn, config: ProjectionConfig
                     ) -> Callable[[Params, Any], jax.Array]:
  """Fuses per-example gradients and projection for one chunk of examples.

      φ_i = Pᵀ ∇_θ fn(θ; z_i)

  With ``config.grad_dtype`` set, ∇_θ fn is computed with θ and z_i cast to that
  dtype (``InDtype``) and projected in θ's dtype.

  Args:
    fn: ``fn(params, example) -> scalar``, for ONE example.
    config: the projection.

  Returns:
    ``features(params, examples [C, ...]) -> [C, k]``.
  """
  fn = in_grad_dtype(fn, config)
  if config.kind == "sparse":  # the gradients made as Gᵀ [P, C]: no transpose of G
    batch_grad_t = jax.vmap(jax.grad(fn), in_axes=(None, 0), out_axes=-1)

    def features(params, examples):
      leaves = jax.tree.leaves(batch_grad_t(params, examples))
      grads_t = jnp.concatenate([g.reshape(-1, g.shape[-1]) for g in leaves], axis=0)
      return _project_sparse(config, grads_t).T

    return features

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
              wrt: Selector = None, mesh=None) -> jax.Array:
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
    mesh: a ``jax.sharding.Mesh``: the examples split over its ``"data"`` axis,
      each device featurizing its block, chunk_size at a time (``jattr.devices``);
      ``None``: ``jattr.devices.current_mesh()`` (none set: one device).

  Returns:
    Φ, shape [N, k], in the dtype of ``params`` (with ``config.grad_dtype``
    ``"bfloat16"`` too: only the gradients are computed in bf16).

  Raises:
    ValueError: ``params`` (frozen leaves included) hold NaN or inf (eager calls),
      or ``wrt`` selects no leaf.
  """
  check_finite_params(params)
  if wrt is not None:  # the frozen leaves in grad_dtype too (cast inside the kernel)
    fn = in_grad_dtype(fn, config)
  fn, params = restrict(fn, params, wrt)
  return apply_chunks(_FeatureRows(fn, config), params, examples, chunk_size=chunk_size,
                      progress=progress, desc="featurize", mesh=mesh)
