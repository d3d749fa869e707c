"""Orbax checkpoints for training state, with JSON metadata beside each step.

A checkpoint directory holds numbered steps (``<dir>/<step>/``), each with the state
pytree (``state``) and a JSON document (``meta``) describing what produced it. The
metadata is how a resumed job proves it is continuing the *same* job: the caller
compares it with its own before restoring.

``Checkpointer(directory)`` is the object ``jattr.train.train`` and ``train_many``
take (the ``jattr.train.Checkpointer`` protocol); the functions below are the same
operations on a path.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def _manager(directory: str | os.PathLike, max_to_keep: int | None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                               item_names=("state", "meta"))


def save(directory: str | os.PathLike, step: int, state: Any, meta: dict,
         *, max_to_keep: int | None = 2) -> None:
  """Saves ``state`` (any pytree of arrays) and ``meta`` (JSON-able) as ``step``.

  Blocks until the write is complete, so a process killed right after this call
  can always resume from ``step``.
  """
  with _manager(directory, max_to_keep) as mngr:
    mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest complete step in ``directory``, or None if there is none."""
  if not os.path.isdir(directory):
    return None
  with _manager(directory, None) as mngr:
    return mngr.latest_step()


def restore(directory: str | os.PathLike, target: Any, step: int | None = None
            ) -> tuple[Any, dict, int]:
  """Restores a step (default: the latest) into the structure of ``target``.

  Args:
    directory: the checkpoint directory.
    target: a pytree with the same structure, shapes and dtypes as the saved state
      (concrete arrays or ``jax.ShapeDtypeStruct``s).
    step: which step; None for the latest.

  Returns:
    ``(state, meta, step)``.

  Raises:
    FileNotFoundError: if the directory holds no checkpoint.
  """
  step = latest_step(directory) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {os.fspath(directory)!r}")
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
  with _manager(directory, None) as mngr:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     meta=ocp.args.JsonRestore()))
  return out["state"], dict(out["meta"]), step


def read_meta(directory: str | os.PathLike, step: int | None = None) -> dict:
  """The JSON metadata of a step (default: the latest), without the arrays."""
  step = latest_step(directory) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {os.fspath(directory)!r}")
  with _manager(directory, None) as mngr:
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


class Checkpointer:
  """Orbax checkpoints in one directory: ``jattr.train.Checkpointer`` for training.

  Attributes:
    directory: where the steps live (created on the first save).
    max_to_keep: steps kept; older ones are deleted after a save.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2):
    self.directory = pathlib.Path(directory)
    self.max_to_keep = max_to_keep

  def latest_step(self) -> int | None:
    return latest_step(self.directory)

  def restore(self, target: Any) -> tuple[Any, dict]:
    state, meta, _ = restore(self.directory, target)
    return state, meta

  def save(self, step: int, state: Any, meta: dict) -> None:
    save(self.directory, step, state, meta, max_to_keep=self.max_to_keep)

  def __repr__(self) -> str:
    return f"Checkpointer({str(self.directory)!r})"
