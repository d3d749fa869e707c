"""K-FAC for the diffusion training loss, built on kfac-jax.

For a dense layer s = W a (W: d_out × d_in; a bias is an extra input fixed at 1),
the rows of the GGN (``jattr.curvature.ggn``) restricted to W are outer products,
γ = vec(g aᵀ) with g = ∂(uᵀf)/∂s the back-propagated output cotangent, so the W
block of G is

    G_W = E[(a aᵀ) ⊗ (g gᵀ)] ≈ E[a aᵀ] ⊗ E[g gᵀ] = A ⊗ G,

the expectation running over the N·K (example, draw) pairs and, inside each
pair, over the D output coordinates (``"ggn_exact"``, g summed over them) or
random output vectors (the sampled modes). The approximation treats activations
and output gradients as independent; it is exact when either side is constant
(one example-draw; or a last linear layer, whose g is the same for every example).

**Weight sharing** (conv, a dense layer applied at R positions of a sequence or
image, attention): the per-example row is a sum over positions,
γ = vec(Σ_r g_r a_rᵀ). Two Kronecker approximations (Eschenhagen et al. 2023):

* ``"expand"`` (positions as extra examples):
  A = E_n[(1/R) Σ_r a_r a_rᵀ],  G = E_n[Σ_r g_r g_rᵀ]. Exact for a linear layer
  whose R outputs are separate terms of the loss (a per-pixel layer under the
  per-pixel MSE). This is what kfac-jax computes (``Conv2DTwoKroneckerFactored``
  scales by the number of locations, ``RepeatedDenseKroneckerFactored`` by 1/R);
  for convolutions ``fit_kfac`` registers ``Conv2DExpand``, the same factors with
  A from explicit patches (18× faster than kfac-jax's on XLA:CPU for the digits UNet).
* ``"reduce"`` (positions pooled first):
  A = E_n[ā āᵀ] with ā = (1/R) Σ_r a_r,  G = E_n[g̃ g̃ᵀ] with g̃ = Σ_r g_r. Exact
  when the R outputs are pooled before the loss; cheaper (one outer product per
  example instead of R). kfac-jax has no such block: ``fit_kfac`` registers the
  two below (``RepeatedDenseReduce``, ``Conv2DReduce``).

Layers are found by kfac-jax's graph matcher (``auto_register_tags``): dense,
repeated dense and 2-D convolutions (``lax.conv_general_dilated`` only: use
``conv_impl="xla"`` for jattr's UNet, whose CPU default im2col convolutions are not
recognised) get Kronecker blocks; scale-and-shift parameters (normalisation layers)
and anything unmatched ("generic") get diagonal blocks. The loss is registered on the network output with
``kfac_jax.register_squared_error_loss(f, y, weight=1/D)``, i.e. kfac-jax's
``weight · Σ_pixels (y − f)² / batch_size`` convention with the 1/D of jattr's
mean over pixels in ``weight``; its output Hessian is then 2·weight·I = (2/D)·I,
the H_out of ``ggn.py``, and the curvature is the GGN G of the training loss.

The factors are an exact average over all N·K pairs, not a moving average: every
batch is folded in with ``ema_old=1, ema_new=batch_size`` so kfac-jax's
``WeightedMovingAverage`` becomes a running mean weighted by pair counts.

State convention: ``fit_kfac`` (expensive, once) returns a ``KfacState`` holding
per block the factors, already multiplied by kfac-jax's block scale, and their
eigendecompositions A = Q_A diag(s_A) Q_Aᵀ, G = Q_G diag(s_G) Q_Gᵀ (reused by
EK-FAC); ``kfac_inverse_vp`` (cheap, per vector) applies (A ⊗ G + λ I)⁻¹.
Kronecker blocks act on a parameter block laid out as a matrix M [d_in(+1), d_out]
(kfac-jax's layout: kernels flattened to [·, d_out], the bias as a last row), as
(A ⊗ G) M = A M G.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np

from jattr import host_memory
from jattr.curvature.kfac_blocks import Conv2DExpand, Conv2DReduce, RepeatedDenseReduce
from jattr.curvature.ggn import (DEFAULT_ESTIMATION_MODE, EstimationMode,
                                 accumulate_sqrt_grads, check_damping, check_estimation_mode,
                                 check_examples, example_draw_pairs)
from jattr.diffusion.draws import Draws
from jattr.diffusion.losses import target
from jattr.diffusion.schedules import Schedule, q_sample
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.types import ApplyFn, Parameterization, Params

WEIGHT_SHARING = ("expand", "reduce")
DEFAULT_DAMPING_FACTOR = 0.1
"""Default damping λ = 0.1 × the mean eigenvalue of each block's curvature."""


class BlockLayout(NamedTuple):
  """Static description of one curvature block (hashable; not saved as data).

  Attributes:
    name: kfac-jax's name of the layer tag.
    kind: ``"kronecker"`` (factors A, G) or ``"diagonal"`` (one diagonal per leaf).
    leaf_indices: indices into ``jax.tree.leaves(params)`` of the block's
      parameters, in the layer's order (kernel, then bias).
    leaf_shapes: their shapes.
    specs: for Kronecker blocks, kfac-jax's rearrange strings (e.g.
      ``"abcd -> (abc)d"``, ``"a -> 1a"``): each leaf is reshaped to
      [·, d_out] and the pieces are stacked row-wise in leaf order.
    matrix_shape: for Kronecker blocks, (d_in(+1), d_out); ``()`` otherwise.
  """

  name: str
  kind: str
  leaf_indices: tuple[int, ...]
  leaf_shapes: tuple[tuple[int, ...], ...]
  specs: tuple[str, ...]
  matrix_shape: tuple[int, ...]


class KronBlock(NamedTuple):
  """A Kronecker block A ⊗ G and its eigendecompositions.

  Attributes:
    a: input factor A, [d_in(+1), d_in(+1)].
    g: output factor G (kfac-jax's block scale folded in), [d_out, d_out].
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
    blocks: one ``KronBlock`` or ``DiagBlock`` per layer, in kfac-jax's order.
    layout: one ``BlockLayout`` per block (static pytree metadata: saving the
      state saves only the arrays; restoring needs a state of the same model as
      the target structure, e.g. ``fit_kfac`` on one example).
  """

  blocks: tuple
  layout: tuple = dataclasses.field(metadata=dict(static=True))


def _kfac_loss_fn(apply_fn: ApplyFn, schedule: Schedule, parameterization: Parameterization,
                  dim: int):

  def loss_fn(params, batch):
    x0, t, eps = batch
    out = apply_fn(params, q_sample(schedule, x0, t, eps), t)
    y = target(schedule, x0, t, eps, parameterization)
    b = out.shape[0]
    kfac_jax.register_squared_error_loss(out.reshape(b, -1), y.reshape(b, -1), weight=1.0 / dim)
    return jnp.mean(jnp.square(out - y))

  return loss_fn


def _is_reshape_spec(spec: str) -> bool:
  in_str, out_str = (s.replace(" ", "") for s in spec.split("->"))
  return [c for c in out_str if c.isalpha()] == list(in_str)


def _layout(estimator: kfac_jax.BlockDiagonalCurvature, params: Params) -> tuple:
  leaves = jax.tree.leaves(params)
  layout = []
  for block, indices in zip(estimator.blocks, estimator.jaxpr.layer_indices):
    shapes = tuple(tuple(leaves[i].shape) for i in indices)
    if isinstance(block, kfac_jax.KroneckerFactored):
      specs = tuple(block.parameters_specs)
      if (len(block.array_shape) != 2 or block.parameters_concat_axis != 0
          or not all(_is_reshape_spec(s) for s in specs)):
        raise NotImplementedError(
            f"kfac-jax block {block.name} has a layout jattr does not handle: "
            f"specs={specs}, concat axis={block.parameters_concat_axis}, "
            f"array shape={block.array_shape}")
      layout.append(BlockLayout(block.name, "kronecker", tuple(indices), shapes, specs,
                                tuple(block.array_shape)))
    elif isinstance(block, kfac_jax.Diagonal):
      layout.append(BlockLayout(block.name, "diagonal", tuple(indices), shapes, (), ()))
    else:
      raise NotImplementedError(f"kfac-jax block type {type(block).__name__} is not supported")
  return tuple(layout)


def _psd_eigh(m):
  m = 0.5 * (m + m.T)
  s, q = jnp.linalg.eigh(m)
  return jnp.maximum(s, 0.0), q


def kron_block(a, g) -> KronBlock:
  """A ``KronBlock`` from two symmetric PSD factors (eigendecomposes both)."""
  sa, qa = _psd_eigh(a)
  sg, qg = _psd_eigh(g)
  return KronBlock(a, g, sa, qa, sg, qg)


def fit_kfac(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws, *,
             weight_sharing: str = "expand",
             estimation_mode: EstimationMode = DEFAULT_ESTIMATION_MODE,
             key: jax.Array | None = None, num_samples: int = 1, batch_size: int | None = None,
             parameterization: Parameterization = "eps",
             generic_diagonal: str = "per_example",
             progress: Progress | None = None) -> KfacState:
  """Accumulates the K-FAC factors of G over all N examples × K draws.

  Args:
    apply_fn: ``apply_fn(params, x_t [B,H,W,C], t [B]) -> [B,H,W,C]``; its layers
      are found by kfac-jax's graph matcher.
    params: the parameters θ.
    schedule: the noise schedule.
    x0: training images [N, H, W, C].
    draws: the K fixed (t, ε) draws (the same draws as the training-side
      gradients of the influence scores).
    weight_sharing: ``"expand"`` or ``"reduce"`` for conv and repeated dense
      layers (see the module docstring).
    estimation_mode: kfac-jax's estimation mode. ``"ggn_curvature_prop"``
      (default: one Rademacher output vector per example-draw, unbiased; the
      factors average it over all N·K pairs), ``"ggn_exact"`` (exact; D backward
      passes per example-draw, unrolled in Python by kfac-jax: small outputs
      only) or ``"fisher_gradients"`` (sampled targets, unbiased).
      ``"fisher_empirical"`` raises: kfac-jax scales it by 1/batch_size.
    key: PRNG key of the sampled modes (``None``: a fixed key 0).
    num_samples: samples per example-draw for the sampled modes.
    batch_size: examples per kfac-jax update (each with all K draws); ``None``
      takes all N at once.
    parameterization: how the output is read (the registered target; the GGN
      does not depend on it).
    generic_diagonal: parameters kfac-jax matches to no layer ("generic" tags,
      e.g. an embedding table or a learned scalar) get its ``NaiveDiagonal``,
      which squares the *batch-summed* gradient: it includes cross-example
      terms, wrong under ``"ggn_exact"`` and noisy under the sampled modes.
      ``"per_example"`` (default) recomputes their diagonal from per-example GGN
      rows with respect to those leaves only (one more pass over the data, only
      if such parameters exist); ``"kfac_jax"`` keeps kfac-jax's value.
    progress: called after each kfac-jax update with examples done, stage
      ``"kfac"``, and after each batch of that extra pass, stage
      ``"kfac generic diagonal"`` (``jattr.progress``).

  Returns:
    A ``KfacState``.
  """
  check_examples(x0, draws)
  check_estimation_mode(estimation_mode)
  if estimation_mode == "fisher_empirical":
    # kfac-jax divides the per-example cotangents by √batch before its blocks
    # average over the batch: its G factor is the empirical Fisher / batch_size.
    raise ValueError(
        "estimation_mode='fisher_empirical' is not supported by fit_kfac: kfac-jax 0.0.8 "
        "scales that G factor by 1/batch_size. Use a GGN mode here; fit_ekfac and "
        "fit_diagonal support 'fisher_empirical' from per-example gradients.")
  if weight_sharing not in WEIGHT_SHARING:
    raise ValueError(f"weight_sharing must be one of {WEIGHT_SHARING}, got {weight_sharing!r}")
  if generic_diagonal not in ("per_example", "kfac_jax"):
    raise ValueError("generic_diagonal must be 'per_example' or 'kfac_jax', got "
                     f"{generic_diagonal!r}")
  n = x0.shape[0]
  batch = n if batch_size is None else int(batch_size)
  if batch < 1:
    raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
  key = jax.random.PRNGKey(0) if key is None else key
  dim = math.prod(x0.shape[1:])
  # kfac-jax's graph matcher compares avals including weak_type: a weakly typed
  # leaf (e.g. jnp.full(shape, 0.3)) silently fails to match its layer pattern.
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), params)
  if weight_sharing == "expand":
    # kfac-jax's default repeated-dense block treats positions whose output
    # cotangent is exactly zero as padding and drops them, but still counts their
    # bias input; "ggn_exact" cotangents (one output coordinate at a time) are zero
    # at every other position, so the bias entry of A came out R times too large.
    # Diffusion outputs have no padded positions: masking is off.
    ctors = {"repeated_dense": functools.partial(kfac_jax.RepeatedDenseKroneckerFactored,
                                                 use_masking=False),
             "conv2d": Conv2DExpand}
  else:
    ctors = {"repeated_dense": RepeatedDenseReduce, "conv2d": Conv2DReduce}
  estimator = kfac_jax.BlockDiagonalCurvature(
      _kfac_loss_fn(apply_fn, schedule, parameterization, dim),
      default_estimation_mode=estimation_mode, layer_tag_to_block_ctor=ctors,
      num_samples=int(num_samples))

  def step(state, p, pairs, rng):
    size = pairs[0].shape[0]
    return estimator.update_curvature_matrix_estimate(
        state, ema_old=1.0, ema_new=float(size), identity_weight=0.0, batch_size=size,
        rng=rng, func_args=(p, pairs))

  first = example_draw_pairs(x0[:batch], draws)
  state = estimator.init(key, (params, first), exact_powers_to_cache=None,
                         approx_powers_to_cache=None)
  step = jax.jit(step)
  report = resolve_progress(progress)
  for c, start in enumerate(range(0, n, batch)):
    pairs = first if start == 0 else example_draw_pairs(x0[start:start + batch], draws)
    state = step(state, params, pairs, jax.random.fold_in(key, c))
    # Wait for each update, then hand its freed buffers back to the OS: glibc
    # otherwise keeps them in its arenas, and the peak RSS of a fit on a
    # 30M-parameter UNet grew with the number of updates (jattr/host_memory.py).
    jax.block_until_ready(state)
    host_memory.release_free_memory()
    report("kfac", min(start + batch, n), n)

  blocks = []
  for block, bstate in zip(estimator.blocks, state.blocks_states):
    scale = block.scale(bstate, False)
    if isinstance(block, kfac_jax.KroneckerFactored):
      blocks.append(kron_block(bstate.factors[0].value, scale * bstate.factors[1].value))
    else:
      blocks.append(DiagBlock(tuple(scale * f.value for f in bstate.diagonal_factors)))
  layout = _layout(estimator, params)

  generic = [j for j, block in enumerate(estimator.blocks)
             if type(block) is kfac_jax.NaiveDiagonal]  # pylint: disable=unidiomatic-typecheck
  unmatched = [(layout[j].name, s) for j in generic for s in layout[j].leaf_shapes if len(s) > 1]
  if unmatched:
    warnings.warn(
        f"{len(unmatched)} weight matrices/kernels matched no kfac-jax layer pattern and get "
        f"only a diagonal block, e.g. {unmatched[:3]}. Convolutions written as patches x "
        "matrix (jattr's UNet with conv_impl='im2col', the CPU default) are not recognised: "
        "build apply_fn with conv_impl='xla' for fit_kfac (the parameters are the same).",
        stacklevel=2)
  if generic and generic_diagonal == "per_example":
    wrt = tuple(i for j in generic for i in layout[j].leaf_indices)
    diag = accumulate_sqrt_grads(
        lambda rows, _: tuple(jnp.sum(jnp.square(r), axis=0) for r in rows), None, apply_fn,
        params, schedule, x0, draws, estimation_mode=estimation_mode,
        key=jax.random.fold_in(key, 2**31 - 1), num_samples=num_samples, batch_size=batch_size,
        parameterization=parameterization, wrt=wrt, progress=progress,
        desc="kfac generic diagonal")
    by_leaf = dict(zip(wrt, diag))
    for j in generic:
      blocks[j] = DiagBlock(tuple(by_leaf[i] for i in layout[j].leaf_indices))
  return KfacState(tuple(blocks), layout)


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


def to_block_matrix(lay: BlockLayout, leaves: list):
  """The block's leaves stacked into kfac-jax's [d_in(+1), d_out] matrix.

  Leaves may carry leading batch axes (e.g. [R, *shape] rows); the result is then
  [R, d_in(+1), d_out]. ``leaves`` is the full ``jax.tree.leaves`` list.
  """
  d_out = lay.matrix_shape[1]
  parts = []
  for i, shape in zip(lay.leaf_indices, lay.leaf_shapes):
    x = leaves[i]
    batch = x.shape[:x.ndim - len(shape)]
    parts.append(x.reshape(batch + (-1, d_out)))
  return jnp.concatenate(parts, axis=-2)


def from_block_matrix(lay: BlockLayout, m, leaves: list) -> None:
  """Writes the block matrix ``m`` back into ``leaves`` (inverse of ``to_block_matrix``)."""
  start = 0
  for i, shape in zip(lay.leaf_indices, lay.leaf_shapes):
    rows = math.prod(shape) // lay.matrix_shape[1]
    leaves[i] = m[..., start:start + rows, :].reshape(m.shape[:-2] + shape)
    start += rows


def _block_damping(damping, eigvals, damping_factor=DEFAULT_DAMPING_FACTOR):
  if damping is None:
    return damping_factor * jnp.mean(eigvals)
  return damping


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
