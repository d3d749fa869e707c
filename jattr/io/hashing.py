"""Content hashes: what a store or curvature file records to prove what it was made from.

``model_hash`` covers a whole params pytree (paths, dtypes, shapes, bytes);
``array_hash`` one array (indices into a dataset, or query images themselves);
``selection_mismatch`` compares two records of what a ``jattr.wrt`` selector chose
(``jattr.runs.selection_record``).

A file made with respect to a subset of the parameters (``wrt``) records
``model_hash`` of the WHOLE model, frozen leaves included (a feature of the
selected leaves depends on the frozen ones too), plus its ``selection_record``; a
file made with ``wrt=None`` records no selection, exactly as before selections
existed, so files without one read as ``wrt=None``.
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


def describe_selection(record: dict | None) -> str:
  """``wrt='lora' (4 leaves, 1,024 parameters)`` or ``wrt=None (all parameters)``."""
  if record is None:
    return "wrt=None (all parameters)"
  return (f"wrt={record.get('selector')!r} ({record.get('num_leaves')} leaves, "
          f"{record.get('num_parameters', 0):,} parameters)")


def selection_mismatch(stored: dict | None, given: dict | None) -> str | None:
  """Why two selection records differ (what changed), or None when they agree.

  A record is ``jattr.runs.selection_record``'s (``None``: ``wrt=None``, every
  leaf); ``frozen_sha256`` is compared only where both records hold one.

  Selectors that choose the same leaves agree (a regex and an equivalent mask); the
  message names the selections, or says that a frozen parameter changed.
  """
  if stored is None and given is None:
    return None
  if (stored is None) != (given is None) or (
      stored.get("selection_sha256") != given.get("selection_sha256")):
    return (f"a different selection: made with {describe_selection(stored)}, given "
            f"{describe_selection(given)}")
  if ("frozen_sha256" in stored and "frozen_sha256" in given
      and stored["frozen_sha256"] != given["frozen_sha256"]):
    return (f"a frozen parameter (one {describe_selection(given)} holds fixed) changed: "
            f"frozen_sha256 {str(stored.get('frozen_sha256'))[:12]}… recorded, "
            f"{str(given.get('frozen_sha256'))[:12]}… now")
  return None
