"""Content hashes: what a store or curvature file records to prove what it was made from.

``model_hash`` covers a whole params pytree (paths, dtypes, shapes, bytes);
``array_hash`` one array (indices into a dataset, or query images themselves).
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np


def model_hash(params) -> str:
  """sha256 of a params pytree: every leaf's path, dtype, shape and bytes, in tree order.

  Equal for equal parameters whatever device they live on; any change to one value,
  shape, dtype or the tree's structure changes it.

  Returns:
    The hex digest (64 characters).
  """
  h = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if not leaves:
    raise ValueError("params must contain at least one array, got an empty pytree")
  h.update(str(treedef).encode())
  for path, leaf in leaves:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def array_hash(x) -> str:
  """sha256 of an array's dtype, shape and bytes (for indices or query images)."""
  a = np.ascontiguousarray(np.asarray(x))
  h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
  h.update(a.tobytes())
  return h.hexdigest()
