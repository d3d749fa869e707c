"""Fitted curvature on disk: orbax arrays plus a JSON sidecar naming the model they fit.

A curvature (``jattr.curvature``: K-FAC, EK-FAC, the GGN diagonal, the dense GGN
matrix, the sketched GGN or the low-rank GGN) is fitted once and used for many
influence queries. Layout of ``<dir>/``::

    state/           an orbax checkpoint of the state's arrays, as a nested dict
                     (``blocks/<j>/a``, ``blocks/<j>/g_eigvecs``, ``diag/…``, ``eigvals``/``eigvecs``)
    curvature.json   the sidecar: format, version, the K-FAC block layout or the
                     sketch's projection (static structure the arrays do not carry)
                     and ``meta``

``meta`` is the caller's JSON-able description plus ``kind`` and ``num_parameters``,
which ``save_curvature`` fills in. It must contain ``model_hash``, the sha256 of the
parameters the curvature was fitted at (``jattr.io.hashing.model_hash``):
``load_curvature`` recomputes it from the parameters it is given and refuses a
mismatch, so a curvature is never applied to another model. The standard keys the
``jattr fit-curvature`` workflow writes (damping default, weight sharing, measurement,
draws, dataset, N) are listed in ``jattr.runs.curvature_meta``.

Selections. A curvature fitted with respect to a subset of the parameters
(``jattr.wrt``) records ``meta["wrt"]`` (``jattr.runs.selection_record``: the
selector, the hash of the selected paths, the hash of the frozen leaves), and
``model_hash`` is still that of the whole model, frozen leaves included.
``load_curvature`` refuses a different selection (or a changed frozen leaf) with a
message naming it. A file without ``meta["wrt"]`` (every file made before
selections, and every ``wrt=None`` fit) was fitted w.r.t. all parameters.

Round trip. Every array of the state is saved (the eigendecompositions too, so a
loaded state is bit-identical to the fitted one, never recomputed) and the layout is
rebuilt with the same tuples, so ``jax.tree.structure`` of the loaded state equals
the fitted one's and jitted functions of it do not recompile.

One writer at a time: ``save_curvature`` holds the directory's
``jattr.io.lock.DirectoryLock``. Crash safety: the sidecar is written last (temporary file, then ``os.replace``),
so a directory with a sidecar always holds complete arrays; a directory without one
is reported as incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jattr.curvature.dense import DenseState
from jattr.curvature.diagonal import DiagonalState
from jattr.curvature.ekfac import EkfacBlock, EkfacState
from jattr.curvature.inverse_vp import CURVATURE_KINDS, curvature_kind
from jattr.curvature.kfac import BlockLayout, DiagBlock, KfacState, KronBlock
from jattr.curvature.low_rank import LowRankState
from jattr.curvature.sketch import SketchState
from jattr.features.projection import ProjectionConfig
from jattr.io import atomic
from jattr.io.hashing import model_hash as hash_params
from jattr.io.hashing import selection_mismatch
from jattr.io.lock import DirectoryLock

FORMAT = "jattr.curvature"
VERSION = 1
SIDECAR = "curvature.json"
STATE = "state"


def _num_parameters(state: Any, kind: str) -> int:
  if kind in ("kfac", "ekfac"):
    return int(sum(np.prod(s, dtype=np.int64) for lay in state.layout for s in lay.leaf_shapes))
  if kind == "diagonal":
    return int(sum(np.size(x) for x in jax.tree.leaves(state.diag)))
  return state.num_parameters


def _key(j: int) -> str:
  return f"{j:05d}"  # zero-padded: orbax sorts dict keys as strings


def _to_tree(state: Any, kind: str) -> dict:
  """The state's arrays as a nested dict with string keys (what orbax stores)."""
  if kind in ("kfac", "ekfac"):
    blocks = {}
    for j, blk in enumerate(state.blocks):
      if isinstance(blk, DiagBlock):
        blocks[_key(j)] = {"diag": {_key(i): d for i, d in enumerate(blk.diag)}}
      else:
        blocks[_key(j)] = dict(blk._asdict())
    return {"blocks": blocks}
  if kind == "diagonal":
    return {"diag": state.diag}
  if kind == "low_rank":
    return dict(state._asdict())
  return {"eigvals": state.eigvals, "eigvecs": state.eigvecs}


def _layout_to_json(layout: tuple) -> list:
  return [lay._asdict() for lay in layout]


def _layout_from_json(doc: list) -> tuple:
  def tup(x):
    return tuple(tup(v) for v in x) if isinstance(x, list) else x

  return tuple(BlockLayout(**{k: tup(v) for k, v in d.items()}) for d in doc)


def _from_tree(tree: dict, kind: str, layout: tuple | None, params: Any,
               projection: dict | None = None, num_parameters: int | None = None):
  """Inverse of ``_to_tree``: the typed state from the restored nested dict."""
  if kind in ("kfac", "ekfac"):
    block_cls = KronBlock if kind == "kfac" else EkfacBlock
    blocks = []
    for j, lay in enumerate(layout):
      b = tree["blocks"][_key(j)]
      if lay.kind == "diagonal":
        blocks.append(DiagBlock(tuple(b["diag"][_key(i)] for i in range(len(lay.leaf_indices)))))
      else:
        blocks.append(block_cls(**{f: b[f] for f in block_cls._fields}))
    return (KfacState if kind == "kfac" else EkfacState)(tuple(blocks), layout)
  if kind == "diagonal":
    diag = tree["diag"]
    if params is not None and jax.tree.structure(params) != jax.tree.structure(diag):
      # Same leaves in the same order, another container type (e.g. a NamedTuple of
      # params comes back from orbax as a dict): take the caller's structure.
      leaves = jax.tree.leaves(diag)
      if [np.shape(x) for x in jax.tree.leaves(params)] != [np.shape(x) for x in leaves]:
        raise ValueError("the stored diagonal does not have the shapes of params: "
                         f"{[np.shape(x) for x in leaves][:5]} vs "
                         f"{[np.shape(x) for x in jax.tree.leaves(params)][:5]} (first 5)")
      diag = jax.tree.unflatten(jax.tree.structure(params), leaves)
    return DiagonalState(diag)
  if kind == "low_rank":
    return LowRankState(**{f: tree[f] for f in ("eigvals", "eigvecs", "rest", "trace")})
  if kind == "sketch":
    return SketchState(tree["eigvals"], tree["eigvecs"], ProjectionConfig(**projection),
                       int(num_parameters))
  return DenseState(tree["eigvals"], tree["eigvecs"])


def curvature_exists(path: str | os.PathLike) -> bool:
  """Whether ``path`` holds a saved curvature (complete or not)."""
  p = pathlib.Path(path)
  return (p / SIDECAR).exists() or (p / STATE).exists()


def save_curvature(path: str | os.PathLike, state: Any, meta: dict, *,
                   overwrite: bool = False) -> pathlib.Path:
  """Saves a fitted curvature and its description to the directory ``path``.

  Args:
    path: the directory (created; may exist, but must not hold a curvature unless
      ``overwrite``).
    state: a ``KfacState``, ``EkfacState``, ``DiagonalState``, ``DenseState`` or
      ``SketchState``.
    meta: a JSON-able dict describing the fit. Must contain ``model_hash`` (64 hex
      characters); ``kind`` and ``num_parameters`` are filled in (a ``kind`` that
      disagrees with the state raises).
    overwrite: replace a curvature already in ``path``.

  Returns:
    The directory.

  Raises:
    FileExistsError: if ``path`` holds a curvature and ``overwrite`` is False.
    ValueError: if ``meta`` has no valid ``model_hash`` or a wrong ``kind``.
  """
  kind = curvature_kind(state)
  if not isinstance(meta, dict):
    raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
  h = meta.get("model_hash")
  if not (isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)):
    raise ValueError("meta['model_hash'] must be the 64-character sha256 hex digest of the "
                     "params (jattr.io.hashing.model_hash), got "
                     f"{h!r}")
  if meta.get("kind", kind) != kind:
    raise ValueError(f"meta['kind'] is {meta['kind']!r} but the state is a {kind!r} curvature")
  meta = atomic.to_json_types(
      {**meta, "kind": kind, "num_parameters": _num_parameters(state, kind)}, "meta")
  p = pathlib.Path(path).absolute()
  with DirectoryLock(p, "curvature directory"):  # one writer at a time
    return _save(p, state, kind, meta, overwrite)


def _save(p: pathlib.Path, state: Any, kind: str, meta: dict, overwrite: bool) -> pathlib.Path:
  if curvature_exists(p):
    if not overwrite:
      raise FileExistsError(f"{p} already holds a curvature; choose another directory or "
                            "pass overwrite=True (--overwrite)")
    (p / SIDECAR).unlink(missing_ok=True)
    shutil.rmtree(p / STATE, ignore_errors=True)
  p.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(p / STATE, _to_tree(state, kind))
    ckpt.wait_until_finished()
  sidecar = {"format": FORMAT, "version": VERSION, "meta": meta,
             "layout": _layout_to_json(state.layout) if kind in ("kfac", "ekfac") else None}
  if kind == "sketch":  # P is regenerated from its config: only the config is stored
    sidecar["projection"] = dataclasses.asdict(state.projection)
  atomic.write_json(p / SIDECAR, sidecar)
  return p


def _read_sidecar(path: str | os.PathLike) -> dict:
  p = pathlib.Path(path)
  if not (p / SIDECAR).exists():
    if (p / STATE).exists():
      raise FileNotFoundError(f"{p} holds curvature arrays but no {SIDECAR}: the save was "
                              "interrupted; fit the curvature again")
    raise FileNotFoundError(f"no curvature in {p} ({p / SIDECAR} not found); make one with "
                            "`jattr fit-curvature --out DIR`")
  with open(p / SIDECAR) as f:
    doc = json.load(f)
  if doc.get("format") != FORMAT or doc.get("version") != VERSION:
    raise ValueError(f"{p / SIDECAR} is not a {FORMAT} v{VERSION} sidecar (format "
                     f"{doc.get('format')!r}, version {doc.get('version')!r})")
  return doc


def read_curvature_meta(path: str | os.PathLike) -> dict:
  """The ``meta`` of a saved curvature, without reading its arrays or checking a model."""
  return _read_sidecar(path)["meta"]


def load_curvature(path: str | os.PathLike, params: Any = None, *, model_hash: str | None = None,
                   kind: str | None = None, selection: dict | None = None,
                   selected: Any = None) -> tuple[Any, dict]:
  """Loads a curvature saved by ``save_curvature``, checking it belongs to the model.

  Args:
    path: the directory.
    params: the parameters it will be used with; their sha256
      (``jattr.io.hashing.model_hash``) must equal the stored ``model_hash``. For a
      diagonal state they also give the pytree structure of the result.
    model_hash: the expected hash, instead of (or besides) ``params``.
    kind: if given, the kind the caller expects (``CURVATURE_KINDS``).
    selection: the selection record of the ``wrt`` the curvature will be used with
      (``jattr.runs.selection_record``; ``None``: all parameters); it must agree
      with the stored ``meta["wrt"]`` (absent: all parameters).
    selected: the selected leaves (``jattr.wrt.split(params, wrt)``): the pytree
      structure of a diagonal state fitted with a selection (default: ``params``).

  Returns:
    ``(state, meta)``: the state exactly as saved (bit-identical arrays, the same
    pytree structure) and the stored ``meta``.

  Raises:
    FileNotFoundError: no (complete) curvature in ``path``.
    ValueError: neither ``params`` nor ``model_hash`` given, a hash mismatch (the
      curvature was fitted to another model; a changed frozen leaf is named as such),
      a different selection, or another ``kind``.
  """
  if params is None and model_hash is None:
    raise ValueError("load_curvature needs params or model_hash to check that the curvature "
                     "was fitted to this model (read_curvature_meta reads it unchecked)")
  if kind is not None and kind not in CURVATURE_KINDS:
    raise ValueError(f"kind must be one of {CURVATURE_KINDS} or None, got {kind!r}")
  doc = _read_sidecar(path)
  meta = doc["meta"]
  stored = meta.get("model_hash")
  expected = []
  if model_hash is not None:
    expected.append(("model_hash", model_hash))
  if params is not None:
    expected.append(("params", hash_params(params)))
  why = selection_mismatch(meta.get("wrt"), selection)
  for what, h in expected:
    if h != stored:
      hint = f" ({why})" if why and why.startswith("a frozen") else ""
      raise ValueError(
          f"curvature {path} was fitted to a different model{hint}: its params sha256 is "
          f"{str(stored)[:16]}…, the {what} given hash to {str(h)[:16]}…; fit the curvature "
          "for this model (jattr fit-curvature)")
  if why:
    raise ValueError(f"curvature {path} was fitted with {why}; fit the curvature with the "
                     "selection it is used with (jattr fit-curvature --wrt)")
  if kind is not None and meta["kind"] != kind:
    raise ValueError(f"curvature {path} is a {meta['kind']!r} curvature, expected {kind!r}")
  layout = _layout_from_json(doc["layout"]) if doc["layout"] is not None else None
  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.restore(pathlib.Path(path).absolute() / STATE)
  return _from_tree(tree, meta["kind"], layout, params if selected is None else selected,
                    doc.get("projection"), meta.get("num_parameters")), meta
