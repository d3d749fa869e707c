"""Seeded subsets, class filters, train/val/test splits and resizing of a ``Dataset``.

Attribution experiments retrain on many subsets and compare scores against specific
training examples, so every random choice here takes an explicit integer ``seed``
(``np.random.default_rng(seed)``) and every function that draws also returns the
indices it drew, sorted, into the dataset it was given. All functions return new
arrays; none aliases its input.
"""

from __future__ import annotations

import operator
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattr.data.dataset import Dataset


def _as_int(value, arg: str) -> int:
  try:
    return operator.index(value)
  except TypeError:
    raise TypeError(f"{arg} must be an integer, got {value!r} "
                    f"({type(value).__name__})") from None


def _check_count(n, available: int, arg: str, of: str) -> int:
  n = _as_int(n, arg)
  if n < 0:
    raise ValueError(f"{arg} must be >= 0, got {n}")
  if n > available:
    raise ValueError(f"{arg}={n} is larger than {of} ({available} examples)")
  return n


def _rng(seed) -> np.random.Generator:
  # default_rng(None) would draw fresh OS entropy: a subset nobody can reproduce.
  return np.random.default_rng(_as_int(seed, "seed"))


def take(ds: Dataset, indices) -> Dataset:
  """Selects examples by index.

  Args:
    ds: the dataset, N examples.
    indices: integer indices into ``ds``, shape [M], each in [0, N); repeats allowed.

  Returns:
    A ``Dataset`` with ``x`` [M, H, W, C] and ``y`` [M], in the order of ``indices``.
  """
  idx = np.asarray(indices)
  if idx.size == 0:
    idx = idx.astype(np.int64)
  if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"indices must be a 1-D integer array, got shape {idx.shape} "
                     f"dtype {idx.dtype}")
  if idx.size and (idx.min() < 0 or idx.max() >= len(ds)):
    raise ValueError(f"indices must lie in [0, {len(ds)}) for {ds.name!r} with {len(ds)} "
                     f"examples, got values in [{idx.min()}, {idx.max()}]")
  return Dataset(x=ds.x[idx], y=ds.y[idx], name=ds.name)


def first_n(ds: Dataset, n: int) -> Dataset:
  """The first ``n`` examples, in file order (deterministic, no seed).

  The CIFAR-2 and Olivetti files are sorted by label, so a prefix of them holds one
  class (or a few people); use ``random_subset`` or ``per_class`` for a mixed subset.

  Args:
    ds: the dataset, N examples.
    n: how many to keep, 0 <= n <= N.

  Returns:
    A ``Dataset`` with ``x`` [n, H, W, C] and ``y`` [n].
  """
  n = _check_count(n, len(ds), "n", f"the dataset {ds.name!r}")
  return take(ds, np.arange(n))


def random_subset(ds: Dataset, n: int, seed: int) -> tuple[Dataset, np.ndarray]:
  """``n`` examples drawn uniformly without replacement.

  Args:
    ds: the dataset, N examples.
    n: how many to draw, 0 <= n <= N.
    seed: integer seed for ``np.random.default_rng``; the same seed gives the same
      indices.

  Returns:
    ``(subset, indices)``: ``indices`` int64 [n], sorted, into ``ds``; ``subset`` is
    ``take(ds, indices)``.
  """
  n = _check_count(n, len(ds), "n", f"the dataset {ds.name!r}")
  indices = np.sort(_rng(seed).choice(len(ds), size=n, replace=False)).astype(np.int64)
  return take(ds, indices), indices


def per_class(ds: Dataset, n_per_class: int, seed: int,
              classes: Sequence[int] | None = None) -> tuple[Dataset, np.ndarray]:
  """A class-balanced subset: ``n_per_class`` examples of each class.

  Classes are visited in ascending order with one generator, so the draw depends on
  the set of classes, not the order they are listed in.

  Args:
    ds: the dataset, N examples.
    n_per_class: examples to draw, without replacement, from each class.
    seed: integer seed for ``np.random.default_rng``.
    classes: the labels to draw from; ``None`` means every label present in ``ds``.

  Returns:
    ``(subset, indices)``: ``indices`` int64 [n_per_class * num_classes], sorted, into
    ``ds``; ``subset`` is ``take(ds, indices)`` (labels unchanged).
  """
  n_per_class = _as_int(n_per_class, "n_per_class")
  if n_per_class < 0:
    raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
  chosen_classes = _check_classes(ds, classes)
  rng = _rng(seed)
  picks = []
  for c in chosen_classes:
    members = np.flatnonzero(ds.y == c)
    if n_per_class > len(members):
      raise ValueError(f"n_per_class={n_per_class} is larger than class {c} of "
                       f"{ds.name!r} ({len(members)} examples)")
    picks.append(rng.choice(members, size=n_per_class, replace=False))
  indices = np.sort(np.concatenate(picks) if picks else np.zeros(0)).astype(np.int64)
  return take(ds, indices), indices


def _check_classes(ds: Dataset, classes) -> np.ndarray:
  """Sorted unique requested classes, each of which must occur in ``ds.y``."""
  present = np.unique(ds.y)
  if classes is None:
    return present
  requested = np.unique(np.asarray(classes))
  if requested.size == 0 or not np.issubdtype(requested.dtype, np.integer):
    raise ValueError(f"classes must be a non-empty sequence of integer labels, got {classes!r}")
  missing = np.setdiff1d(requested, present)
  if missing.size:
    raise ValueError(f"classes {missing.tolist()} do not occur in {ds.name!r}; "
                     f"its labels are {present.tolist()}")
  return requested


def filter_classes(ds: Dataset, classes: Sequence[int]) -> Dataset:
  """Keeps the examples whose label is in ``classes``, in dataset order.

  Labels are kept as they are (not renumbered to 0..K-1): they still identify the
  class in the parent dataset. The kept indices are
  ``np.flatnonzero(np.isin(ds.y, classes))``.

  Args:
    ds: the dataset.
    classes: labels to keep; each must occur in ``ds``.

  Returns:
    A ``Dataset`` with the M matching examples, ``x`` [M, H, W, C], ``y`` [M].
  """
  requested = _check_classes(ds, classes)
  return take(ds, np.flatnonzero(np.isin(ds.y, requested)))


def resize(ds: Dataset, size: int | tuple[int, int]) -> Dataset:
  """Resizes every image with bilinear interpolation, antialiased when shrinking.

  ``jax.image.resize(..., method="linear", antialias=True)`` widens the triangle filter
  by the shrink factor, so every input pixel contributes (no aliasing from skipped
  pixels). Its weights are non-negative and sum to one, so outputs stay in [-1, 1];
  the final clip only removes float rounding.

  Args:
    ds: the dataset, ``x`` [N, H, W, C].
    size: the output side ``s`` (square, s x s) or ``(h, w)``.

  Returns:
    A ``Dataset`` with ``x`` float32 [N, h, w, C] in [-1, 1] and the same ``y``.
  """
  hw = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
  if len(hw) != 2:
    raise ValueError(f"size must be an int or a pair (h, w), got {size!r}")
  h, w = (_as_int(d, "size") for d in hw)
  if h < 1 or w < 1:
    raise ValueError(f"size must be positive, got {size!r}")
  n, _, _, c = ds.x.shape
  out = jax.image.resize(jnp.asarray(ds.x, jnp.float32), (n, h, w, c), method="linear",
                         antialias=True)
  x = np.clip(np.asarray(out, np.float32), -1.0, 1.0)
  return Dataset(x=x, y=ds.y.copy(), name=ds.name)


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
  """Disjoint random index sets, e.g. train/val/test splits of ``n`` examples.

  One permutation of ``range(n)`` is cut into consecutive pieces, so the pieces are
  disjoint; examples beyond ``sum(sizes)`` are left out.

  Args:
    n: the number of examples to split.
    sizes: the size of each piece, each >= 0, summing to at most ``n``.
    seed: integer seed for ``np.random.default_rng``.

  Returns:
    A list with one int64 array of shape [sizes[i]] per piece, each sorted.
  """
  n = _as_int(n, "n")
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  sizes = [_as_int(s, "sizes") for s in sizes]
  if any(s < 0 for s in sizes):
    raise ValueError(f"sizes must all be >= 0, got {sizes}")
  if sum(sizes) > n:
    raise ValueError(f"sizes {sizes} sum to {sum(sizes)}, larger than n={n}")
  perm = _rng(seed).permutation(n)
  bounds = np.cumsum([0] + sizes)
  return [np.sort(perm[a:b]).astype(np.int64) for a, b in zip(bounds[:-1], bounds[1:])]
