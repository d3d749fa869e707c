"""Conditional models: the condition travels with each example.

A conditional model is called as

    apply_fn(params, x_t [B, H, W, C], t [B], cond) -> [B, H, W, C]

where ``cond`` is any pytree whose leaves have a leading batch axis B: integer class
labels [B], embedding vectors [B, E], token embeddings [B, L, E], or a dict of them.
A training example is then the pair ``(x0, cond)``; a batch of N examples is the
pair of x0 [N, H, W, C] and cond with leading axis N. An unconditional model keeps
the three-argument form ``apply_fn(params, x_t, t)`` and its examples are the image
array alone (or ``(x0, None)``).

Every jattr function that takes examples accepts either form, because the examples
are only ever sliced, vmapped and chunked along their leading axis (pytree
operations), and the model is only ever called through ``apply_model``, which drops
a ``None`` condition. When one example is noised under K draws (a measurement), its
condition is repeated K times (``repeat_cond``): the model sees the batch of the K
noised images, each with the example's condition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattr.types import ApplyFn, Params


def split(examples):
  """``(x0, cond)`` of examples given as an image array (cond None) or a pair."""
  if isinstance(examples, (tuple, list)):
    if len(examples) != 2:
      raise ValueError("conditional examples must be the pair (x0, cond), got a "
                       f"{type(examples).__name__} of length {len(examples)}")
    return examples[0], examples[1]
  return examples, None


def join(x0, cond):
  """The examples of images ``x0`` with condition ``cond`` (x0 alone for None)."""
  return x0 if cond is None else (x0, cond)


def images(examples):
  """The image array x0 of examples (either form)."""
  return split(examples)[0]


def with_images(examples, x0):
  """``examples`` with its images replaced by ``x0`` (the condition kept)."""
  return join(x0, split(examples)[1])


def asarray(examples, dtype=None):
  """Examples as device arrays, the images cast to ``dtype`` if given (the condition
  keeps its dtypes: labels stay integers)."""
  x0, cond = split(examples)
  return join(jnp.asarray(x0, dtype), None if cond is None else jax.tree_util.tree_map(
      jnp.asarray, cond))


def rows(examples, start: int, stop: int):
  """Examples ``start:stop`` (images and condition sliced alike)."""
  return jax.tree_util.tree_map(lambda a: a[start:stop], examples)


def count(examples) -> int:
  """The number of examples N (the leading axis of the images)."""
  return int(jnp.shape(images(examples))[0])


def repeat_cond(cond, k: int):
  """One example's condition (leaves without batch axis) repeated for K draws: every
  leaf gets a leading axis of K."""
  if cond is None:
    return None
  return jax.tree_util.tree_map(lambda c: jnp.broadcast_to(c, (k,) + jnp.shape(c)), cond)


def repeat_each(cond, k: int):
  """A batch condition (leading axis N) repeated K times per example, example-major:
  row i K + k is example i's condition."""
  if cond is None:
    return None
  return jax.tree_util.tree_map(lambda c: jnp.repeat(c, k, axis=0), cond)


def check_cond(cond, n: int, name: str = "cond") -> None:
  """Every leaf of a batch condition must have the leading axis N of its images."""
  if cond is None:
    return
  leaves = jax.tree_util.tree_leaves(cond)
  if not leaves:
    raise ValueError(f"{name} must be None or a pytree of arrays, got an empty pytree")
  for leaf in leaves:
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != n:
      raise ValueError(f"every leaf of {name} needs the leading axis N = {n} of x0 (one "
                       f"condition per example), got a leaf of shape {jnp.shape(leaf)}")


def output_shape_error(out_shape, x_shape) -> ValueError:
  return ValueError(
      f"apply_fn must return one prediction of x_t's shape {tuple(x_shape)} per input "
      f"(the ε, x₀ or v of the parameterization), got an output of shape "
      f"{tuple(out_shape)}; reshape the network output to [B, H, W, C]")


def apply_model(apply_fn: ApplyFn, params: Params, x_t, t, cond=None):
  """``apply_fn(params, x_t, t)`` or, for a condition, ``apply_fn(params, x_t, t, cond)``.

  Checks that the output has x_t's shape (shapes are static, so this fires on the
  first call, traced or not).
  """
  if cond is None:
    out = apply_fn(params, x_t, t)
  else:
    out = apply_fn(params, x_t, t, cond)
  if jnp.shape(out) != jnp.shape(x_t):
    raise output_shape_error(jnp.shape(out), jnp.shape(x_t))
  return out
