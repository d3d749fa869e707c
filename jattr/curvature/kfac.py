"""K-FAC for the diffusion training loss, on jattr's own layer registry.

For a dense layer s = W a (W: d_out × d_in; a bias is an extra input fixed at 1),
the rows of the GGN (``jattr.curvature.ggn``) restricted to W are outer products,
γ = vec(g aᵀ) with g = ∂(uᵀf)/∂s the back-propagated output cotangent, so the W
block of G is

    G_W = E[(a aᵀ) ⊗ (g gᵀ)] ≈ E[a aᵀ] ⊗ E[g gᵀ] = A ⊗ G,

the expectation running over the N·K (example, draw) pairs and, inside each
pair, over the output cotangents u_r (``"ggn_exact"``: √(2/D)·e_o for every output
coordinate; the sampled modes: random vectors; ``ggn.ESTIMATION_MODES``). The
approximation treats activations and output gradients as independent; it is exact
when either side is constant (one example-draw; or a last linear layer, whose g is
the same for every example).

**Weight sharing** (conv, a dense layer applied at R positions of a sequence or
image, attention): the per-example row is a sum over positions,
γ = vec(Σ_r g_r a_rᵀ). Two Kronecker approximations (Eschenhagen et al. 2023):

* ``"expand"`` (positions as extra examples):
  A = E_n[(1/R) Σ_r a_r a_rᵀ],  G = E_n[Σ_r g_r g_rᵀ]. Exact for a linear layer
  whose R outputs are separate terms of the loss (a per-pixel layer under the
  per-pixel MSE). kfac-jax's conv and repeated-dense blocks compute the same.
* ``"reduce"`` (positions pooled first):
  A = E_n[ā āᵀ] with ā = (1/R) Σ_r a_r,  G = E_n[g̃ g̃ᵀ] with g̃ = Σ_r g_r. Exact
  when the R outputs are pooled before the loss; cheaper (one outer product per
  example instead of R).

**Layers** come from ``jattr.layer_registry``: every ``dot_general`` or
``conv_general_dilated`` whose weight is a parameter leaf, in any framework (flax
NNX or linen, equinox, plain JAX; jattr's UNet with either conv implementation),
gets a Kronecker block named by the weight's path, with the bias added to its output
as the constant input 1; a LoRA adapter W + c·A B gets one block for A (inputs a,
output cotangents c B g) and one for B (inputs c Aᵀ a, cotangents g). Every other
leaf (normalisation scales and shifts, embeddings, unmatched weights, with a
warning naming each weight's path and the reason) gets the exact GGN diagonal
Σ_r γ_r² / (N K) from the same pass. The statistics come from one forward pass per
pair, with the inputs a of every layer recorded, and one vjp per cotangent u_r
with respect to perturbations of the layer outputs (``layer_registry.instrument``),
never a per-example parameter gradient.

``backend="kfac_jax"`` computes the factors with kfac-jax's graph matcher instead
(``jattr.curvature.kfac_jax_backend``; the optional ``kfac`` extra, on the stack
where kfac-jax runs), the cross-check the tests compare against.

The factors are an exact average over all N·K pairs (no moving average).

State convention: ``fit_kfac`` (expensive, once) returns a ``KfacState`` holding
per block the factors and their eigendecompositions A = Q_A diag(s_A) Q_Aᵀ,
G = Q_G diag(s_G) Q_Gᵀ (reused by EK-FAC); ``kfac_inverse_vp`` (cheap, per vector)
applies (A ⊗ G + λ I)⁻¹. Kronecker blocks act on a parameter block laid out as a
matrix M [d_in(+1), d_out] (each leaf laid out by its layout ops, the bias as a last
row), as (A ⊗ G) M = A M G.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattr import host_memory
from jattr.curvature.ggn import (DEFAULT_ESTIMATION_MODE, EstimationMode, check_damping,
                                 check_estimation_mode, check_examples, check_sampling,
                                 pair_cotangents)
from jattr.diffusion import conditioning
from jattr.diffusion.draws import Draws
from jattr.diffusion.schedules import Schedule, q_sample
from jattr.grads.per_example import sum_chunks
from jattr.layer_registry import (Registry, apply_ops, describe_unmatched, find_layers,
                                  input_rows, instrument, invert_ops, output_rows,
                                  zero_perturbations)
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.types import ApplyFn, Parameterization, Params
from jattr.wrt import Selector, restrict

WEIGHT_SHARING = ("expand", "reduce")
BACKENDS = ("native", "kfac_jax")
DEFAULT_DAMPING_FACTOR = 0.1
"""Default damping λ = 0.1 × the mean eigenvalue of each block's curvature."""


class BlockLayout(NamedTuple):
  """Static description of one curvature block (hashable; not saved as data).

  Attributes:
    name: the path of the block's first leaf (``jattr.wrt.param_paths``).
    kind: ``"kronecker"`` (factors A, G) or ``"diagonal"`` (one diagonal per leaf).
    leaf_indices: indices into ``jax.tree.leaves(params)`` of the block's
      parameters, in the layer's order (kernel, then bias).
    leaf_shapes: their shapes.
    specs: for Kronecker blocks, per leaf the layout ops taking it to its rows of
      the block matrix, [·, d_out] (``("transpose", perm)`` / ``("reshape", shape)``,
      ``jattr.layer_registry.apply_ops``); the pieces are stacked row-wise in leaf
      order. A string (files written before the native K-FAC, kfac-jax's
      rearrange spec) means reshape to [·, d_out].
    matrix_shape: for Kronecker blocks, (d_in(+1), d_out); ``()`` otherwise.
  """

  name: str
  kind: str
  leaf_indices: tuple[int, ...]
  leaf_shapes: tuple[tuple[int, ...], ...]
  specs: tuple
  matrix_shape: tuple[int, ...]


class KronBlock(NamedTuple):
  """A Kronecker block A ⊗ G and its eigendecompositions.

  Attributes:
    a: input factor A, [d_in(+1), d_in(+1)].
    g: output factor G, [d_out, d_out].
    a_eigvals, a_eigvecs: s_A [d_in(+1)] (clipped at 0) and Q_A (columns).
    g_eigvals, g_eigvecs: s_G [d_out] and Q_G.
  """

  a: jax.Array
  g: jax.Array
  a_eigvals: jax.Array
  a_eigvecs: jax.Array
  g_eigvals: jax.Array
  g_eigvecs: jax.Array


class DiagBlock(NamedTuple):
  """A diagonal block: one array per parameter leaf, shaped like it."""

  diag: tuple[jax.Array, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KfacState:
  """The fitted K-FAC curvature: a pytree of factors plus a static layout.

  Attributes:
    blocks: one ``KronBlock`` or ``DiagBlock`` per block, Kronecker blocks first.
    layout: one ``BlockLayout`` per block (static pytree metadata: saving the
      state saves only the arrays; restoring needs a state of the same model as
      the target structure, e.g. ``fit_kfac`` on one example).
  """

  blocks: tuple
  layout: tuple = dataclasses.field(metadata=dict(static=True))



def _psd_eigh(m):
  m = 0.5 * (m + m.T)
  s, q = jnp.linalg.eigh(m)
  return jnp.maximum(s, 0.0), q


def kron_block(a, g) -> KronBlock:
  """A ``KronBlock`` from two symmetric PSD factors (eigendecomposes both)."""
  sa, qa = _psd_eigh(a)
  sg, qg = _psd_eigh(g)
  return KronBlock(a, g, sa, qa, sg, qg)



@dataclasses.dataclass(frozen=True)
class _Source:
  """One site a Kronecker block's rows come from, and the block leaf's role there."""

  site: int
  role: str  # "weight", "lora_a" or "lora_b"


@dataclasses.dataclass(frozen=True)
class _KronPlan:
  """A Kronecker block to accumulate: its leaf, bias, sites and matrix layout."""

  leaf: int
  bias: int | None
  sources: tuple
  ops: tuple
  d_in: int
  d_out: int


def _plan(registry: Registry) -> tuple[tuple, tuple, dict]:
  """(Kronecker plans, diagonal leaves, extra reasons): one block per registry leaf.

  A weight used at several sites (weight sharing across calls) gets one block whose
  positions are those of all its sites; it must have the same matrix layout at each.
  """
  groups: dict[int, list] = {}
  for j, s in enumerate(registry.sites):
    if s.weight is not None:
      groups.setdefault(s.weight, []).append((j, "weight", s.weight_ops, s.d_in, s.d_out, s.bias))
    if s.lora is not None:
      a, b, _ = s.lora
      rank = registry.shapes[a][1]
      groups.setdefault(a, []).append((j, "lora_a", (), s.d_in, rank, None))
      groups.setdefault(b, []).append((j, "lora_b", (), rank, s.d_out,
                                       s.bias if s.weight is None else None))
  plans, in_kron, reasons = [], set(), {}
  for leaf in sorted(groups):
    uses = groups[leaf]
    ops, d_in, d_out = uses[0][2:5]
    if any(u[2:5] != (ops, d_in, d_out) for u in uses):
      reasons[leaf] = "used at layers with different matrix layouts"
      continue
    biases = {u[5] for u in uses}
    bias = biases.pop() if len(biases) == 1 else None
    plans.append(_KronPlan(leaf, bias, tuple(_Source(u[0], u[1]) for u in uses), ops, d_in,
                           d_out))
    in_kron.update(i for i in (leaf, bias) if i is not None)
  diag = tuple(i for i in range(len(registry.shapes)) if i not in in_kron)
  return tuple(plans), diag, reasons


@dataclasses.dataclass(frozen=True)
class _KfacStats:
  """The chunk kernel of the native ``fit_kfac``: Σ over a chunk of pairs of each
  Kronecker block's (A, G) statistics and each diagonal leaf's Σ_r γ_r².

  Equal for equal fields (the registry by identity: ``kfac_registry`` keeps it), so
  that a second fit of the same model reuses the compiled chunk program."""

  apply_fn: ApplyFn
  schedule: Schedule
  registry: Registry
  plans: tuple
  diag: tuple
  weight_sharing: str

  def __call__(self, args, chunk, mask):
    (params,) = args
    x0, t, eps, u = chunk
    u = u * mask[:, None, None].astype(u.dtype)
    run = instrument(self.registry)
    leaves, treedef = jax.tree.flatten(params)
    zeros = zero_perturbations(self.registry)

    def pair(x0, t, eps, u):
      x0, cond = conditioning.split(x0)
      xt = q_sample(self.schedule, x0[None], t[None], eps[None])
      args = (xt, t[None]) + _cond_arg(jax.tree.map(lambda c: c[None], cond))

      def f(zs, diag_leaves):
        full = list(leaves)
        for i, v in zip(self.diag, diag_leaves):
          full[i] = v
        out, inputs = run(jax.tree.unflatten(treedef, full), zs, *args)
        if out.shape != xt.shape:
          raise conditioning.output_shape_error(out.shape, xt.shape)
        return out.reshape(-1), inputs

      _, vjp, inputs = jax.vjp(f, zeros, [leaves[i] for i in self.diag], has_aux=True)
      dzs, dleaves = jax.vmap(vjp)(u)
      return inputs, dzs, dleaves

    inputs, dzs, dleaves = jax.vmap(pair)(x0, t, eps, u)
    weight = mask.astype(u.dtype)
    stats = []
    for plan in self.plans:
      a_parts, g_parts = [], []
      for src in plan.sources:
        site = self.registry.sites[src.site]
        a = jax.vmap(lambda x, s=site: input_rows(s, x))(inputs[src.site])  # [C, R, d_in]
        g = jax.vmap(jax.vmap(lambda y, s=site: output_rows(s, y)))(dzs[src.site])  # [C,U,R,d]
        if src.role == "lora_a":  # ∂f/∂A = Σ a (c B g)ᵀ
          _, ib, c = site.lora
          g = c * g @ leaves[ib].T
        elif src.role == "lora_b":  # ∂f/∂B = Σ (c Aᵀ a) gᵀ
          ia, _, c = site.lora
          a = c * a @ leaves[ia]
        a_parts.append(a)
        g_parts.append(g)
      a = jnp.concatenate(a_parts, axis=1)
      g = jnp.concatenate(g_parts, axis=2)
      if plan.bias is not None:
        a = jnp.concatenate([a, jnp.ones(a.shape[:2] + (1,), a.dtype)], axis=-1)
      if self.weight_sharing == "expand":
        stats.append((jnp.einsum("c,crd,cre->de", weight, a, a) / a.shape[1],
                      jnp.einsum("curd,cure->de", g, g)))
      else:
        a_bar, g_sum = jnp.mean(a, axis=1), jnp.sum(g, axis=2)
        stats.append((jnp.einsum("c,cd,ce->de", weight, a_bar, a_bar),
                      jnp.einsum("cud,cue->de", g_sum, g_sum)))
    return tuple(stats), tuple(jnp.sum(jnp.square(d), axis=(0, 1)) for d in dleaves)


def kfac_registry(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws
                  ) -> Registry:
  """The layer registry ``fit_kfac`` uses: ``apply_fn`` traced on one example-draw.

  The registry depends only on ``apply_fn`` and the shapes and dtypes of its inputs
  (the jaxpr's constants are ``apply_fn``'s own), so the last few are kept: a second
  fit of the same model finds the same ``Registry`` object, hence the same chunk
  kernel, and reuses its compiled program instead of compiling it again.
  """
  images, cond = conditioning.split(x0)
  xt = q_sample(schedule, images[:1], draws.t[:1], draws.eps[:1])
  t = draws.t[:1]
  cond = jax.tree.map(lambda c: c[:1], cond)
  try:
    hash(apply_fn)
  except TypeError:  # an unhashable apply_fn: traced every time
    return find_layers(apply_fn, params, xt, t, *_cond_arg(cond))
  leaves, treedef = jax.tree.flatten(params)
  cond_leaves, cond_tree = jax.tree.flatten(cond)
  return _abstract_registry(apply_fn, treedef, tuple(map(_abstract, leaves)), _abstract(xt),
                            _abstract(t), cond_tree, tuple(map(_abstract, cond_leaves)))


def _cond_arg(cond) -> tuple:
  """The model's trailing arguments: () without a condition, (cond,) with one."""
  return () if cond is None else (cond,)


def _abstract(v) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v))


@functools.lru_cache(maxsize=8)
def _abstract_registry(apply_fn, treedef, leaves, xt, t, cond_tree, cond_leaves) -> Registry:
  cond = jax.tree.unflatten(cond_tree, cond_leaves)
  return find_layers(apply_fn, jax.tree.unflatten(treedef, leaves), xt, t, *_cond_arg(cond))


def fit_kfac(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws, *,
             weight_sharing: str = "expand",
             estimation_mode: EstimationMode = DEFAULT_ESTIMATION_MODE,
             key: jax.Array | None = None, num_samples: int = 1, batch_size: int | None = None,
             chunk_size: int | None = None, parameterization: Parameterization = "eps",
             backend: str = "native", wrt: Selector = None,
             generic_diagonal: str = "per_example",
             progress: Progress | None = None) -> KfacState:
  """Accumulates the K-FAC factors of G over all N examples × K draws.

  Args:
    apply_fn: ``apply_fn(params, x_t [B,H,W,C], t [B]) -> [B,H,W,C]``, any framework;
      its layers are found by ``jattr.layer_registry``.
    params: the parameters θ.
    schedule: the noise schedule.
    x0: training images [N, H, W, C].
    draws: the K fixed (t, ε) draws (the same draws as the training-side
      gradients of the influence scores).
    weight_sharing: ``"expand"`` or ``"reduce"`` for layers applied at several
      positions (see the module docstring).
    estimation_mode: how H_out is factored into cotangents (``ggn.ESTIMATION_MODES``):
      ``"ggn_curvature_prop"`` (default: one Rademacher vector per example-draw,
      unbiased), ``"ggn_exact"`` (D vjps per example-draw: small outputs and tests),
      ``"fisher_gradients"`` or ``"fisher_empirical"``.
    key: PRNG key of the sampled modes (``None``: a fixed key 0); batch b uses
      ``fold_in(key, b)``.
    num_samples: S, cotangents per example-draw for the sampled modes.
    batch_size: examples per pass (each with all K draws; cotangents are drawn per
      batch); ``None`` takes all N at once.
    chunk_size: example-draw pairs per ``vmap`` inside a pass (memory: their
      activations and R·U output cotangents per layer); ``None``: the whole batch.
    parameterization: how the output is read (only ``"fisher_empirical"`` uses it).
    backend: ``"native"`` (default) or ``"kfac_jax"`` (kfac-jax's graph matcher and
      blocks; needs the ``kfac`` extra, and fails on jax >= 0.9.2).
    wrt: the parameters to fit the curvature for (``jattr.wrt``); the others are held
      fixed. The state then covers ``restrict(apply_fn, params, wrt)[1]``, the
      vectors given to ``kfac_inverse_vp`` must be shaped like it.
    generic_diagonal: ``backend="kfac_jax"`` only: ``"per_example"`` (default)
      recomputes kfac-jax's diagonal blocks of unmatched ("generic") parameters
      from per-example GGN rows, ``"kfac_jax"`` keeps kfac-jax's, which squares the
      batch-summed gradient (cross-example terms included).
    progress: called after each batch with examples done, stage ``"kfac"``
      (``jattr.progress``).

  Returns:
    A ``KfacState``.

  Warns:
    UserWarning: naming each weight matrix or kernel (two or more axes) that gets
    only a diagonal block, with the reason.
  """
  check_examples(x0, draws)
  check_estimation_mode(estimation_mode)
  if weight_sharing not in WEIGHT_SHARING:
    raise ValueError(f"weight_sharing must be one of {WEIGHT_SHARING}, got {weight_sharing!r}")
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if generic_diagonal not in ("per_example", "kfac_jax"):
    raise ValueError("generic_diagonal must be 'per_example' or 'kfac_jax', got "
                     f"{generic_diagonal!r}")
  n = conditioning.images(x0).shape[0]
  batch = n if batch_size is None else int(batch_size)
  if batch < 1:
    raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
  if chunk_size is not None and int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
  key = jax.random.PRNGKey(0) if key is None else key
  check_sampling(estimation_mode, key, num_samples)
  apply_fn, params = restrict(apply_fn, params, wrt)
  if backend == "kfac_jax":
    import jattr.curvature.kfac_jax_backend as kfac_jax_backend  # optional: the kfac extra
    return kfac_jax_backend.fit(
        apply_fn, params, schedule, x0, draws, weight_sharing=weight_sharing,
        estimation_mode=estimation_mode, key=key, num_samples=num_samples,
        batch_size=batch_size, parameterization=parameterization,
        generic_diagonal=generic_diagonal, progress=progress)

  registry = kfac_registry(apply_fn, params, schedule, x0, draws)
  plans, diag, reasons = _plan(registry)
  unmatched = describe_unmatched(registry) + [
      f"{registry.paths[i]} {list(registry.shapes[i])}: {why}" for i, why in reasons.items()]
  if unmatched:
    warnings.warn(f"{len(unmatched)} weight matrices/kernels get only a diagonal K-FAC block: "
                  + "; ".join(unmatched[:6]) + (" …" if len(unmatched) > 6 else ""),
                  stacklevel=2)
  kernel = _KfacStats(apply_fn, schedule, registry, plans, diag, weight_sharing)
  report = resolve_progress(progress)
  total = None
  for b, start in enumerate(range(0, n, batch)):
    xb = jax.tree.map(lambda a: a[start:start + batch], x0)
    rows = pair_cotangents(params, xb, draws, jax.random.fold_in(key, b),
                           apply_fn=apply_fn, schedule=schedule,
                           estimation_mode=estimation_mode, num_samples=int(num_samples),
                           parameterization=parameterization)
    pairs = rows[2].shape[0]
    chunk = pairs if chunk_size is None else min(int(chunk_size), pairs)
    total = sum_chunks(kernel, (params,), rows, chunk_size=chunk, init=total)
    del rows
    jax.block_until_ready(total)  # bounded memory: no queue of in-flight batches
    host_memory.release_free_memory()
    report("kfac", min(start + batch, n), n)

  scale = 1.0 / (n * draws.num_draws)
  kron_stats, diag_stats = total
  blocks, layout = [], []
  for plan, (a, g) in zip(plans, kron_stats):
    blocks.append(kron_block(a * scale, g * scale))
    leaves = (plan.leaf,) + ((plan.bias,) if plan.bias is not None else ())
    specs = (plan.ops,) + (((("reshape", (1, plan.d_out)),),) if plan.bias is not None else ())
    layout.append(BlockLayout(registry.paths[plan.leaf], "kronecker", leaves,
                              tuple(registry.shapes[i] for i in leaves), specs,
                              (plan.d_in + (plan.bias is not None), plan.d_out)))
  for i, d in zip(diag, diag_stats):
    blocks.append(DiagBlock((d * scale,)))
    layout.append(BlockLayout(registry.paths[i], "diagonal", (i,), (registry.shapes[i],), (), ()))
  return KfacState(tuple(blocks), tuple(layout))

def check_vector(layout: tuple, v: Params, name: str = "v") -> list:
  """Returns ``jax.tree.leaves(v)`` after checking them against ``layout``."""
  leaves = jax.tree.leaves(v)
  expected = sum(len(lay.leaf_indices) for lay in layout)
  if len(leaves) != expected:
    raise ValueError(f"{name} must have the {expected} parameter leaves of the curvature, got "
                     f"{len(leaves)} leaves")
  for lay in layout:
    for i, shape in zip(lay.leaf_indices, lay.leaf_shapes):
      if i >= len(leaves) or tuple(leaves[i].shape) != shape:
        got = tuple(leaves[i].shape) if i < len(leaves) else "no such leaf"
        raise ValueError(
            f"{name} does not match the curvature's parameters: leaf {i} (block {lay.name}) "
            f"should have shape {shape}, got {got}")
  return leaves


def _leaf_ops(lay: BlockLayout) -> list:
  d_out = lay.matrix_shape[1]
  return [(("reshape", (math.prod(shape) // d_out, d_out)),) if isinstance(ops, str) else ops
          for shape, ops in zip(lay.leaf_shapes, lay.specs)]


def to_block_matrix(lay: BlockLayout, leaves: list):
  """The block's leaves stacked into kfac-jax's [d_in(+1), d_out] matrix.

  Leaves may carry leading batch axes (e.g. [R, *shape] rows); the result is then
  [R, d_in(+1), d_out]. ``leaves`` is the full ``jax.tree.leaves`` list.
  """
  parts = []
  for i, shape, ops in zip(lay.leaf_indices, lay.leaf_shapes, _leaf_ops(lay)):
    x = leaves[i]
    parts.append(apply_ops(x, ops, batch=x.ndim - len(shape)))
  return jnp.concatenate(parts, axis=-2)


def from_block_matrix(lay: BlockLayout, m, leaves: list) -> None:
  """Writes the block matrix ``m`` back into ``leaves`` (inverse of ``to_block_matrix``)."""
  start = 0
  batch = m.ndim - 2
  for i, shape, ops in zip(lay.leaf_indices, lay.leaf_shapes, _leaf_ops(lay)):
    rows = math.prod(shape) // lay.matrix_shape[1]
    leaves[i] = invert_ops(m[..., start:start + rows, :], ops, shape, batch=batch)
    start += rows


def _block_damping(damping, eigvals, damping_factor=DEFAULT_DAMPING_FACTOR):
  if damping is None:
    return default_block_damping(eigvals, damping_factor)
  return damping


def default_block_damping(eigvals, damping_factor=DEFAULT_DAMPING_FACTOR):
  """λ = damping_factor × mean eigenvalue of a block; 1 for an all-zero block.

  A block is all zero when the loss does not depend on its parameters (a leaf the
  model never reads); their gradients are zero too, and any λ > 0 maps them to 0
  where λ = 0 would give 0/0."""
  lam = damping_factor * jnp.mean(eigvals)
  return jnp.where(lam > 0, lam, jnp.ones_like(lam))


def kfac_matvec(state: KfacState, v: Params) -> Params:
  """(A ⊗ G) v block by block (A M G on each block matrix M); undamped."""
  leaves = check_vector(state.layout, v)
  out = list(leaves)
  for lay, blk in zip(state.layout, state.blocks):
    if lay.kind == "kronecker":
      from_block_matrix(lay, blk.a @ to_block_matrix(lay, leaves) @ blk.g, out)
    else:
      for i, d in zip(lay.leaf_indices, blk.diag):
        out[i] = d * leaves[i]
  return jax.tree.unflatten(jax.tree.structure(v), out)


def kfac_inverse_vp(state: KfacState, v: Params, damping: float | None = None, *,
                    damping_factor: float = DEFAULT_DAMPING_FACTOR) -> Params:
  """(A ⊗ G + λ I)⁻¹ v block by block, through the eigenbases of A and G.

  On each Kronecker block with matrix M: M̃ = Q_Aᵀ M Q_G, M̃_ij ← M̃_ij / (s_A,i s_G,j + λ),
  result Q_A M̃ Q_Gᵀ. Diagonal blocks divide by (diag + λ).

  Args:
    state: from ``fit_kfac``.
    v: a params-shaped vector (one, no batch axis; ``jax.vmap`` for many).
    damping: λ ≥ 0 for every block; ``None`` uses, per block, 0.1 × the mean
      eigenvalue of that block's curvature (mean(s_A)·mean(s_G), or the mean of
      the diagonal), so no tuning is needed across layers of different scale.
    damping_factor: the 0.1 of the default (used only when ``damping`` is None).

  Returns:
    (A ⊗ G + λ I)⁻¹ v, shaped like ``v``.
  """
  check_damping(damping)
  leaves = check_vector(state.layout, v)
  out = list(leaves)
  for lay, blk in zip(state.layout, state.blocks):
    if lay.kind == "kronecker":
      eig = blk.a_eigvals[:, None] * blk.g_eigvals[None, :]
      m = blk.a_eigvecs.T @ to_block_matrix(lay, leaves) @ blk.g_eigvecs
      m = m / (eig + _block_damping(damping, eig, damping_factor))
      from_block_matrix(lay, blk.a_eigvecs @ m @ blk.g_eigvecs.T, out)
    else:
      lam = _block_damping(damping, jnp.concatenate([d.ravel() for d in blk.diag]),
                           damping_factor)
      for i, d in zip(lay.leaf_indices, blk.diag):
        out[i] = leaves[i] / (d + lam)
  return jax.tree.unflatten(jax.tree.structure(v), out)


def kfac_eigenvalues(state: KfacState) -> tuple[jax.Array, ...]:
  """The eigenvalues of each block, s_A ⊗ s_G (flattened) or the diagonal."""
  return tuple(
      (blk.a_eigvals[:, None] * blk.g_eigvals[None, :]).ravel() if lay.kind == "kronecker"
      else jnp.concatenate([d.ravel() for d in blk.diag])
      for lay, blk in zip(state.layout, state.blocks))


def num_parameters(state) -> int:
  """P, the number of parameters a curvature state covers."""
  return int(sum(np.prod(s, dtype=int) for lay in state.layout for s in lay.leaf_shapes))
