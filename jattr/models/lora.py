"""LoRA: a low-rank adapter on any params pytree (Hu et al., 2021).

Each targeted leaf W (a kernel of ndim ≥ 2) is read as the matrix
W̄ = W.reshape(-1, d_out) [d_in, d_out], d_out = W.shape[-1] — a dense kernel
[d_in, d_out] as it is, a conv kernel HWIO [kh, kw, c_in, c_out] as
[kh·kw·c_in, c_out] (the im2col matrix of the convolution) — and replaced by

    W' = W + (α / r) · (A B).reshape(W.shape),   A [d_in, r],  B [r, d_out].

A is drawn N(0, 1/d_in) and B is 0, so the adapted model equals the base model at
initialisation, and the first gradient step moves B only (∂L/∂A = (α/r) ∂L/∂W̄ Bᵀ = 0).
α/r is the usual LoRA scale: α fixed, the update's size does not depend on r.

The adapted model is a pure function of ``{"base": params, "lora": adapter}``:

    adapter = lora_init(key, params, rank)             # {path: {"a": A, "b": B}}
    apply = lora_apply_fn(apply_fn, alpha=...)
    apply({"base": params, "lora": adapter}, x_t, t)   # = apply_fn(W', x_t, t)

The adapter is a flat dict keyed by the target's ``jattr.wrt`` path
(``"down/0/conv/kernel"``), so the path of an adapter leaf reads
``"lora/down/0/conv/kernel/a"``; orbax checkpoints round-trip such keys
(tests/lora_test.py). Training or attributing the adapter alone, the base held fixed,
is ``jattr.wrt.restrict(apply, {"base": params, "lora": adapter}, LORA)``; the base
then enters the computation as a constant.

The merged kernel is computed exactly as ``w + scale * (a @ b).reshape(w.shape)``:
an add of the base leaf and a scaled reshape of a ``dot_general`` of the two adapter
leaves, the pattern a curvature layer registry can recognise in the jaxpr. For a 2-D
kernel the reshape is to the same shape, and jax emits no ``reshape`` for it: the
jaxpr is ``add(w, mul(scale, dot_general(a, b)))``. With the base frozen by
``restrict``, ``w`` is a constant of the jaxpr rather than an input.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jattr.types import ApplyFn, Params
from jattr.wrt import Selector, describe, param_paths, select

LORA = "^lora/"
"""The ``jattr.wrt`` selector of the adapter leaves of ``{"base": ..., "lora": ...}``."""
LORA_BASE = "^base/"
"""The selector of the base leaves."""


def lora_targets(params: Params, targets: Selector = None) -> list[str]:
  """The paths of the leaves an adapter covers.

  ``targets=None`` selects every leaf with ndim ≥ 2 (dense and conv kernels, and
  any other matrix-shaped leaf); a ``jattr.wrt`` selector (regex, predicate, mask)
  selects among those: ``"^mix"`` is the kernel of layer ``mix``, not its bias (a
  bias or a norm scale has no matrix to adapt).

  Raises:
    ValueError: no leaf of ndim ≥ 2 is selected (or ``jattr.wrt.select``'s errors).
  """
  paths = param_paths(params)
  leaves = jax.tree.leaves(params)
  chosen = (True,) * len(paths) if targets is None else select(params, targets)
  out = [p for p, x, c in zip(paths, leaves, chosen) if c and np.ndim(x) >= 2]
  if not out:
    raise ValueError(f"targets={describe(targets)!r} selects no leaf of ndim >= 2 "
                     f"(paths look like {paths[:4]})")
  return out


def lora_init(key: jax.Array, params: Params, rank: int, targets: Selector = None
              ) -> dict[str, dict[str, jax.Array]]:
  """A fresh adapter: ``{path: {"a": A [d_in, r], "b": B [r, d_out]}}`` per target.

  A ~ N(0, 1/d_in) (one key per target, ``fold_in(key, i)`` for the i-th target in
  leaf order), B = 0, in the target's dtype; d_out = W.shape[-1], d_in = W.size / d_out.
  Pure: jit- and vmap-able over ``key`` (a stacked adapter for many members).

  Args:
    key: PRNG key.
    params: the base parameters (arrays or ``ShapeDtypeStruct``s; only shapes are read).
    rank: r ≥ 1 (r ≥ min(d_in, d_out) is allowed: a full-rank update).
    targets: which leaves (``lora_targets``); default every leaf with ndim ≥ 2.
  """
  if int(rank) < 1:
    raise ValueError(f"rank must be >= 1, got {rank}")
  shapes = dict(zip(param_paths(params), jax.tree.leaves(params)))
  adapter = {}
  for i, path in enumerate(lora_targets(params, targets)):
    w = shapes[path]
    d_out = int(w.shape[-1])
    d_in = int(np.prod(w.shape)) // d_out
    a = jax.random.normal(jax.random.fold_in(key, i), (d_in, int(rank)), w.dtype)
    adapter[path] = {"a": a * float(1.0 / np.sqrt(d_in)),
                     "b": jnp.zeros((int(rank), d_out), w.dtype)}
  return adapter


def lora_scale(rank: int, alpha: float | None) -> float:
  """α / r; ``alpha=None`` means α = r (scale 1)."""
  return 1.0 if alpha is None else float(alpha) / int(rank)


def lora_merge(params: Params, *, alpha: float | None = None) -> Params:
  """The base params with every adapted leaf replaced by W + (α/r)·(A B).reshape(W.shape).

  Args:
    params: ``{"base": params, "lora": adapter}``.
    alpha: α (None: α = r, scale 1).

  Returns:
    A pytree with the structure of ``params["base"]``.

  Raises:
    ValueError: an adapter key that is no path of the base, or an A, B whose shapes
      do not fit the leaf.
  """
  base, adapter = params["base"], params["lora"]
  flat, treedef = jax.tree_util.tree_flatten_with_path(base)
  paths = param_paths(base)
  unknown = sorted(set(adapter) - set(paths))
  if unknown:
    raise ValueError(f"the adapter has keys {unknown[:4]} that are no paths of the base "
                     f"params (paths look like {paths[:3]})")
  leaves = [_adapted(w, adapter[p], alpha, p) if p in adapter else w
            for p, (_, w) in zip(paths, flat)]
  return jax.tree.unflatten(treedef, leaves)


def _adapted(w, ab, alpha, path):
  a, b = ab["a"], ab["b"]
  d_out = w.shape[-1]
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or b.shape[1] != d_out \
      or a.shape[0] * d_out != w.size:
    raise ValueError(f"adapter {path!r}: A {a.shape} and B {b.shape} do not fit the leaf of "
                     f"shape {w.shape} (need A [{w.size // d_out}, r], B [r, {d_out}])")
  scale = lora_scale(a.shape[1], alpha)
  return w + scale * (a @ b).reshape(w.shape)


def lora_apply_fn(apply_fn: Callable, *, alpha: float | None = None) -> Callable:
  """``apply(params, x_t, t, ...) = apply_fn(lora_merge(params, alpha=alpha), x_t, t, ...)``.

  ``params`` is ``{"base": params, "lora": adapter}``. The returned function is as
  pure as ``apply_fn`` (jit, grad, vmap over a stacked leading axis of either part);
  extra arguments (a ``layer`` of a layered apply function) pass through.
  """

  def apply(params: Params, x_t, t, *args, **kwargs):
    return apply_fn(lora_merge(params, alpha=alpha), x_t, t, *args, **kwargs)

  return apply


def lora_model(apply_fn: ApplyFn, params: Params, key: jax.Array, rank: int,
               targets: Selector = None, *, alpha: float | None = None
               ) -> tuple[Callable, Params]:
  """``(apply, {"base": params, "lora": lora_init(key, params, rank, targets)})``."""
  return (lora_apply_fn(apply_fn, alpha=alpha),
          {"base": params, "lora": lora_init(key, params, rank, targets)})


def lora_num_params(params: Params, rank: int, targets: Selector = None) -> int:
  """Σ over targets of r·(d_in + d_out): the adapter's size."""
  shapes = dict(zip(param_paths(params), jax.tree.leaves(params)))
  total = 0
  for path in lora_targets(params, targets):
    shape = shapes[path].shape
    total += int(rank) * (int(np.prod(shape)) // int(shape[-1]) + int(shape[-1]))
  return total
