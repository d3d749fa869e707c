"""What training needs from a checkpoint store: a small protocol, implemented in io.

``train`` and ``train_many`` save their state after every segment and resume from
the newest saved step; they do so through any object with these three methods.
``jattr.io.checkpoint.Checkpointer`` implements it with orbax on a directory; a
test can pass an in-memory one. The metadata saved with each step holds the job's
description, which a resumed job must match (``check_same_job``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol


class Checkpointer(Protocol):
  """Saves and restores training states by step number."""

  def latest_step(self) -> int | None:
    """The newest complete step, or None when nothing is saved."""

  def restore(self, target: Any) -> tuple[Any, dict]:
    """``(state, meta)`` of the newest step, in the structure of ``target``."""

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` and JSON-able ``meta`` as ``step``; returns once it is durable."""


def config_dict(config) -> dict:
  """A dataclass config as JSON-able values (tuples as lists), for job descriptions."""
  return {k: (list(v) if isinstance(v, tuple) else v)
          for k, v in dataclasses.asdict(config).items()}


def check_same_job(checkpointer: Checkpointer, saved: dict | None, job: dict) -> None:
  """Raises ValueError unless a checkpoint's saved job description equals ``job``."""
  if saved != job:
    where = getattr(checkpointer, "directory", checkpointer)
    raise ValueError(
        f"checkpoint in {str(where)!r} was written by a different job; "
        f"saved: {saved}, now: {job}. Use another directory or delete it.")
