"""Orbax checkpoints for training state, with JSON metadata beside each step.

A checkpoint directory holds numbered steps (``<dir>/<step>/``), each with the state
pytree (``state``) and a JSON document (``meta``) describing what produced it. The
metadata is how a resumed job proves it is continuing the *same* job: the caller
compares it with its own before restoring.

``Checkpointer(directory)`` is the object ``jattr.train.train`` and ``train_many``
take (the ``jattr.train.Checkpointer`` protocol); the functions below are the same
operations on a path.

Errors are one readable exception each. A checkpoint that cannot be read (a file
truncated, altered or deleted; a model of another shape) raises ``ValueError`` naming
the checkpoint directory and the first line of the cause, not orbax's or
tensorstore's dump of the whole TensorStore spec. A save that fails for lack of space
or permission raises ``OSError`` (``ENOSPC`` / ``EACCES``) naming the directory. The
log records orbax's writer threads emit about the same failure are held back
(attached to the exception as notes, for ``--debug``), and so are the unraisable
reports its threads and abandoned coroutines send afterwards ("Event loop is
closed", "Exception ignored in: <coroutine …>"). The earlier steps stay as they
were: orbax writes a step to a temporary directory and renames it only when
complete.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import sys
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

_ORBAX_LOGGERS = ("absl", "orbax")
_MAX_CAUSE = 300


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
  with _held_logs() as held:
    try:
      with _manager(directory, max_to_keep) as mngr:
        mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()
    except Exception as e:
      held.failed = True
      _quiet_orbax_aftermath()
      error = _save_error(directory, step, e)
      for record in held.records:
        error.add_note(f"{record.levelname}:{record.name}: {record.getMessage()}")
      if error is e:
        raise
      raise error from e


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
  try:
    with _manager(directory, None) as mngr:
      out = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  except Exception as e:
    _quiet_orbax_aftermath()
    raise _restore_error(directory, step, e) from e
  return out["state"], dict(out["meta"]), step


def read_meta(directory: str | os.PathLike, step: int | None = None) -> dict:
  """The JSON metadata of a step (default: the latest), without the arrays."""
  step = latest_step(directory) if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {os.fspath(directory)!r}")
  try:
    with _manager(directory, None) as mngr:
      return dict(mngr.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"])
  except Exception as e:
    _quiet_orbax_aftermath()
    raise _restore_error(directory, step, e) from e


def _causes(e: BaseException) -> list[BaseException]:
  """``e`` and what caused it, outermost first."""
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    chain.append(e)
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return chain


def _first_line(e: BaseException) -> str:
  """The most specific readable line of an exception chain (no TensorStore spec dump)."""
  for cause in reversed(_causes(e)):
    text = str(cause).strip().split("\n", 1)[0]
    text = text.split(" See full TensorStore details", 1)[0].strip()
    if text:
      name = type(cause).__name__
      line = text if name in ("Exception", "ValueError") else f"{name}: {text}"
      return line if len(line) <= _MAX_CAUSE else line[:_MAX_CAUSE - 1] + "…"
  return type(e).__name__


def _restore_error(directory, step, e: Exception) -> ValueError:
  return ValueError(f"checkpoint {os.fspath(directory)} (step {step}) cannot be read: it is "
                    f"damaged, incomplete or of another model configuration ({_first_line(e)}); "
                    f"restore it from a copy, or delete the directory and train again")


_DISK_FULL = ("No space left on device", "os_error_code='28'", "[Errno 28]")
_NO_WRITE = ("Permission denied", "Read-only file system", "os_error_code='13'",
             "os_error_code='30'", "[Errno 13]", "[Errno 30]")


def _save_error(directory, step, e: Exception) -> Exception:
  """The OSError a failed save means (disk full, no permission), else ``e`` itself."""
  codes = {getattr(c, "errno", None) for c in _causes(e)}
  text = " ".join(str(c) for c in _causes(e))
  where = os.fspath(directory)
  if errno.ENOSPC in codes or any(s in text for s in _DISK_FULL):
    return OSError(errno.ENOSPC, f"no space left on device while saving checkpoint step {step} "
                                 f"(the earlier steps are intact)", where)
  if codes & {errno.EACCES, errno.EROFS, errno.EPERM} or any(s in text for s in _NO_WRITE):
    return PermissionError(errno.EACCES, f"cannot write checkpoint step {step} (read-only or "
                                         f"no permission)", where)
  return e


class _Held(logging.Filter):
  """Holds the records of orbax's loggers while a save runs."""

  def __init__(self):
    super().__init__()
    self.records: list[logging.LogRecord] = []
    self.failed = False

  def filter(self, record: logging.LogRecord) -> bool:
    self.records.append(record)
    return False


@contextlib.contextmanager
def _held_logs() -> Iterator[_Held]:
  """Orbax's log records during a save: passed on if it succeeds, held back (for the
  exception's notes) if it fails, where they only repeat the failure from every
  writer thread."""
  held = _Held()
  loggers = [logging.getLogger(n) for n in _ORBAX_LOGGERS]
  for logger in loggers:
    logger.addFilter(held)
  try:
    yield held
  finally:
    for logger in loggers:
      logger.removeFilter(held)
    if not held.failed:
      for record in held.records:
        logging.getLogger(record.name).handle(record)


def _from_orbax(unraisable) -> bool:
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _quiet_orbax_aftermath() -> None:
  """After a failed save or restore, orbax's writer threads and its abandoned read
  coroutines go on reporting the same failure, as unraisable exceptions ("Event loop
  is closed" RuntimeErrors on its closed event loop; "Exception ignored in:
  <coroutine …>" when the garbage collector finalizes them), seconds later and
  hundreds of times. Those two kinds (only those) are dropped from then on; the
  exception raised says what failed."""
  previous = sys.unraisablehook
  if getattr(previous, "jattr_quiet_orbax", False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    if _from_orbax(unraisable):
      return
    previous(unraisable)

  hook.jattr_quiet_orbax = True
  sys.unraisablehook = hook


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
