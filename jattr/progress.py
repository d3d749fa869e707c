"""Progress of long library calls: one small protocol, no terminal code.

Every long call (training, featurization, curvature fits, influence, the LDS cache
build) takes ``progress``: None (silent) or a callable

    progress(desc, done, total, **metrics) -> None

called after each unit of work with the stage's name, the units done so far, the
stage's total and optional scalar metrics (e.g. ``loss``). A call with
``done == total`` ends the stage. The CLI passes a tqdm implementation
(``jattr.cli.progress.TqdmProgress``); a notebook or a logger can pass its own. The
core imports no terminal library.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
  """``progress(desc, done, total, **metrics)``: see the module docstring."""

  def __call__(self, desc: str, done: int, total: int, **metrics: float) -> None: ...


def silent(desc: str, done: int, total: int, **metrics: float) -> None:
  """The no-op ``Progress``."""
  del desc, done, total, metrics


def resolve(progress: Progress | None) -> Progress:
  """``progress`` itself, or ``silent`` for None (or False).

  Raises:
    TypeError: for anything else that is not callable (e.g. ``True``: pass a
      callback, such as ``jattr.cli.progress.TqdmProgress()``).
  """
  if progress is None or progress is False:
    return silent
  if not callable(progress):
    raise TypeError(f"progress must be None or a callable progress(desc, done, total, "
                    f"**metrics), got {progress!r}")
  return progress
