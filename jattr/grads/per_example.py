"""Per-example gradients, chunked so that memory is bounded by the chunk size.

For a scalar kernel f(θ; z) written for ONE example z,

    g_i = ∇_θ f(θ; z_i),     i = 1..N,

computed as ``vmap(grad(f))`` over chunks of ``chunk_size`` examples, the chunks run
one after the other with ``jax.lax.map``: peak memory holds one chunk's gradients
(chunk_size × P) plus the stacked outputs, never N × (activations of the model).
The last chunk is padded by repeating the last example (a real input, so the kernel
never sees an all-zero example that could make a norm's gradient NaN) and the
padded rows are dropped.
"""

from __future__ import annotations

from typing import Any, Callable

import functools

import jax
import jax.numpy as jnp

from jattr.types import Params

ExampleFn = Callable[[Params, Any], jax.Array]
"""``fn(params, example) -> scalar``, for ONE example."""


def num_examples(examples) -> int:
  leaves = jax.tree_util.tree_leaves(examples)
  if not leaves:
    raise ValueError("examples must contain at least one array, got an empty pytree")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError("every leaf of examples must have the same leading axis N, got "
                     f"leading sizes {sorted(str(s) for s in sizes)}")
  return sizes.pop()


def to_chunks(examples, chunk_size: int):
  """Splits ``examples`` into equal chunks, padding the last with its final example.

  The one pad-and-chunk helper of jattr: ``map_chunks`` maps over its chunks, and
  reductions over examples (``ggn_matvec``) scan over them with ``mask``.

  Args:
    examples: pytree of arrays with a shared leading axis N.
    chunk_size: C ≥ 1.

  Returns:
    ``(chunks, mask)``: every leaf reshaped to [⌈N/C⌉, C, ...] (rows past N repeat
    example N − 1), and ``mask`` [⌈N/C⌉, C] bool, False on the padding.
  """
  n = num_examples(examples)
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
  c = int(chunk_size)
  num_chunks = -(-n // c)
  pad = num_chunks * c - n

  def split(x):
    if pad:
      x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
    return x.reshape((num_chunks, c) + x.shape[1:])

  mask = (jnp.arange(num_chunks * c) < n).reshape(num_chunks, c)
  return jax.tree_util.tree_map(split, examples), mask


def map_chunks(batch_fn: Callable[[Any], Any], examples, *, chunk_size: int | None = None):
  """Applies a batched function to ``examples`` chunk by chunk.

  Args:
    batch_fn: maps a chunk of examples (leading axis C) to a pytree of outputs with
      leading axis C, row c depending only on example c (e.g. a ``vmap``).
    examples: pytree of arrays with a shared leading axis N.
    chunk_size: C; ``None`` (or C ≥ N) runs ``batch_fn`` on all N at once.

  Returns:
    ``batch_fn``'s outputs for all N examples, leading axis N.
  """
  n = num_examples(examples)
  if chunk_size is None or chunk_size >= n:
    return batch_fn(examples)
  chunks, _ = to_chunks(examples, chunk_size)
  out = jax.lax.map(batch_fn, chunks)
  c = int(chunk_size)
  return jax.tree_util.tree_map(lambda y: y.reshape((y.shape[0] * c,) + y.shape[2:])[:n], out)


@functools.partial(jax.jit, static_argnames=("fn", "chunk_size"))
def per_example_grads(fn: ExampleFn, params: Params, examples, *,
                      chunk_size: int | None = None) -> Params:
  """Gradient of ``fn`` for every example, g_i = ∇_θ fn(θ; z_i).

  Args:
    fn: ``fn(params, example) -> scalar``, written for ONE example.
    params: the parameters θ (any pytree).
    examples: pytree with leading axis N (usually an array [N, ...]).
    chunk_size: examples per ``vmap`` chunk; ``None`` vmaps over all N at once.

  Returns:
    A pytree like ``params`` whose leaves have a leading axis N.
  """
  batch_grad = jax.vmap(jax.grad(fn), in_axes=(None, 0))
  return map_chunks(lambda ex: batch_grad(params, ex), examples, chunk_size=chunk_size)


def flatten_per_example(grads: Params) -> jax.Array:
  """Stacks per-example gradient pytrees into a matrix G [N, P].

  Row i is ``jax.flatten_util.ravel_pytree(g_i)[0]``: the leaves in
  ``jax.tree_util.tree_leaves`` order, each raveled row-major (C order), then
  concatenated; leaves are promoted to their common dtype.

  Args:
    grads: pytree whose leaves have a leading axis N.

  Returns:
    G, shape [N, P] with P = total number of parameters.
  """
  leaves = jax.tree_util.tree_leaves(grads)
  if not leaves:
    raise ValueError("grads must contain at least one array, got an empty pytree")
  n = leaves[0].shape[0]
  dtype = jnp.result_type(*leaves)
  return jnp.concatenate([jnp.reshape(x, (n, -1)).astype(dtype) for x in leaves], axis=1)


@functools.partial(jax.jit, static_argnames=("fn", "chunk_size"))
def per_example_flat_grads(fn: ExampleFn, params: Params, examples, *,
                           chunk_size: int | None = None) -> jax.Array:
  """``flatten_per_example(per_example_grads(...))``, flattened chunk by chunk.

  Args and order as in ``per_example_grads`` and ``flatten_per_example``.

  Returns:
    G, shape [N, P].
  """
  batch_grad = jax.vmap(jax.grad(fn), in_axes=(None, 0))
  return map_chunks(lambda ex: flatten_per_example(batch_grad(params, ex)), examples,
                    chunk_size=chunk_size)
