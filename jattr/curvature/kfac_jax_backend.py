"""fit_kfac's ``backend="kfac_jax"``: the K-FAC factors from kfac-jax's graph matcher.

The cross-check of jattr's native K-FAC (``jattr.curvature.kfac``), for the stack
where kfac-jax 0.0.8 runs (jax 0.9.1: ``pip install 'jattr[kfac]'``). Layers are found
by kfac-jax's graph matcher (``auto_register_tags``): dense, repeated dense and 2-D
convolutions (``lax.conv_general_dilated`` only: use ``conv_impl="xla"`` for jattr's
UNet, whose CPU default im2col convolutions it does not recognise) get Kronecker
blocks; scale-and-shift parameters and anything unmatched ("generic") get diagonal
blocks. The loss is registered on the network output with
``kfac_jax.register_squared_error_loss(f, y, weight=1/D)``, i.e. kfac-jax's
``weight · Σ_pixels (y − f)² / batch_size`` convention with the 1/D of jattr's
mean over pixels in ``weight``; its output Hessian is then 2·weight·I = (2/D)·I,
the H_out of ``ggn.py``, and the curvature is the GGN G of the training loss.

The factors are an exact average over all N·K pairs, not a moving average: every
batch is folded in with ``ema_old=1, ema_new=batch_size`` so kfac-jax's
``WeightedMovingAverage`` becomes a running mean weighted by pair counts. Each
block's factors are multiplied by kfac-jax's block scale, so they are the native
fit's A and G (``tests/kfac_test.py`` checks it).
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import kfac_jax

from jattr import host_memory
from jattr.curvature.ggn import accumulate_sqrt_grads, example_draw_pairs
from jattr.curvature.kfac import BlockLayout, DiagBlock, KfacState, kron_block
from jattr.curvature.kfac_blocks import Conv2DExpand, Conv2DReduce, RepeatedDenseReduce
from jattr.diffusion import conditioning
from jattr.diffusion.losses import target
from jattr.diffusion.schedules import Schedule, q_sample
from jattr.progress import resolve as resolve_progress
from jattr.types import ApplyFn, Parameterization, Params
from jattr.wrt import param_paths


def _kfac_loss_fn(apply_fn: ApplyFn, schedule: Schedule, parameterization: Parameterization,
                  dim: int):

  def loss_fn(params, batch):
    x0, t, eps = batch
    x0, cond = conditioning.split(x0)
    out = conditioning.apply_model(apply_fn, params, q_sample(schedule, x0, t, eps), t, cond)
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
  paths = param_paths(params)
  layout = []
  for block, indices in zip(estimator.blocks, estimator.jaxpr.layer_indices):
    shapes = tuple(tuple(leaves[i].shape) for i in indices)
    name = paths[indices[0]] if indices else block.name
    if isinstance(block, kfac_jax.KroneckerFactored):
      specs = tuple(block.parameters_specs)
      if (len(block.array_shape) != 2 or block.parameters_concat_axis != 0
          or not all(_is_reshape_spec(s) for s in specs)):
        raise NotImplementedError(
            f"kfac-jax block {block.name} has a layout jattr does not handle: "
            f"specs={specs}, concat axis={block.parameters_concat_axis}, "
            f"array shape={block.array_shape}")
      d_out = block.array_shape[1]
      ops = tuple((("reshape", (math.prod(s) // d_out, d_out)),) for s in shapes)
      layout.append(BlockLayout(name, "kronecker", tuple(indices), shapes, ops,
                                tuple(block.array_shape)))
    elif isinstance(block, kfac_jax.Diagonal):
      layout.append(BlockLayout(name, "diagonal", tuple(indices), shapes, (), ()))
    else:
      raise NotImplementedError(f"kfac-jax block type {type(block).__name__} is not supported")
  return tuple(layout)



def fit(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws, *, weight_sharing,
        estimation_mode, key, num_samples, batch_size, parameterization, generic_diagonal,
        progress) -> KfacState:
  """``fit_kfac`` through kfac-jax (arguments checked by the caller)."""
  if estimation_mode == "fisher_empirical":
    # kfac-jax divides the per-example cotangents by √batch before its blocks
    # average over the batch: its G factor is the empirical Fisher / batch_size.
    raise ValueError(
        "estimation_mode='fisher_empirical' is not supported by backend='kfac_jax': kfac-jax "
        "0.0.8 scales that G factor by 1/batch_size. The native backend supports it.")
  images = conditioning.images(x0)
  n = images.shape[0]
  batch = n if batch_size is None else int(batch_size)  # checked by fit_kfac, as is key
  dim = math.prod(images.shape[1:])
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
    size = pairs[1].shape[0]
    return estimator.update_curvature_matrix_estimate(
        state, ema_old=1.0, ema_new=float(size), identity_weight=0.0, batch_size=size,
        rng=rng, func_args=(p, pairs))

  rows = lambda start: jax.tree.map(lambda a: a[start:start + batch], x0)  # noqa: E731
  first = example_draw_pairs(rows(0), draws)
  state = estimator.init(key, (params, first), exact_powers_to_cache=None,
                         approx_powers_to_cache=None)
  step = jax.jit(step)
  report = resolve_progress(progress)
  for c, start in enumerate(range(0, n, batch)):
    pairs = first if start == 0 else example_draw_pairs(rows(start), draws)
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
    leaf_indices = tuple(i for j in generic for i in layout[j].leaf_indices)
    diag = accumulate_sqrt_grads(
        lambda rows, _: tuple(jnp.sum(jnp.square(r), axis=0) for r in rows), None, apply_fn,
        params, schedule, x0, draws, estimation_mode=estimation_mode,
        key=jax.random.fold_in(key, 2**31 - 1), num_samples=num_samples, batch_size=batch_size,
        parameterization=parameterization, leaf_indices=leaf_indices, progress=progress,
        desc="kfac generic diagonal")
    by_leaf = dict(zip(leaf_indices, diag))
    for j in generic:
      blocks[j] = DiagBlock(tuple(by_leaf[i] for i in layout[j].leaf_indices))
  return KfacState(tuple(blocks), layout)
