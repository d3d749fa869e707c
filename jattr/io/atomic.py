"""Atomic writes: a file appears complete or not at all.

Every file jattr writes goes through here: the bytes go to a temporary file beside
the target (same directory, so the rename stays on one file system), are flushed
and fsynced, and the temporary file is renamed over the target (``os.replace``,
atomic on POSIX). A process killed at any point leaves either the old file or the
new one, never a mix, and a failed write removes its temporary file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
from typing import Any, Callable, Iterator

import numpy as np


@contextlib.contextmanager
def _temporary_beside(path: pathlib.Path, suffix: str = "") -> Iterator[pathlib.Path]:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_bytes(path: str | os.PathLike, write: Callable[[Any], None]) -> pathlib.Path:
  """Writes a file atomically; ``write(f)`` fills the open binary file ``f``."""
  path = pathlib.Path(path)
  with _temporary_beside(path) as tmp:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
  return path


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  return write_bytes(path, lambda f: f.write(text.encode()))


def _json_default(o, what: str = "the document"):
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"{what} must be JSON-able; found a {type(o).__name__}: {o!r}")


def to_json_types(doc: Any, what: str = "the document") -> Any:
  """``doc`` as plain JSON types: tuples become lists, numpy scalars and arrays
  numbers and lists, dict keys sorted. Raises TypeError naming ``what`` otherwise."""
  return json.loads(json.dumps(doc, sort_keys=True, default=lambda o: _json_default(o, what)))


def write_json(path: str | os.PathLike, doc: Any, *, indent: int = 1,
               sort_keys: bool = True) -> pathlib.Path:
  """Writes ``doc`` as JSON atomically (numpy scalars and arrays become numbers/lists)."""
  return write_text(path, json.dumps(doc, indent=indent, sort_keys=sort_keys,
                                     default=_json_default))


def write_npz(path: str | os.PathLike, *, compressed: bool = False, **arrays) -> pathlib.Path:
  """Writes arrays to an ``.npz`` atomically (``np.savez``, or ``savez_compressed``)."""
  save = np.savez_compressed if compressed else np.savez

  def write(f):
    buf = io.BytesIO()
    save(buf, **arrays)
    f.write(buf.getbuffer())

  return write_bytes(path, write)


def write_npy(path: str | os.PathLike, array) -> pathlib.Path:
  """Writes one array to an ``.npy`` atomically."""
  return write_bytes(path, lambda f: np.save(f, np.asarray(array)))
