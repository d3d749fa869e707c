"""One writer at a time: an advisory lock on a directory jattr writes into.

``DirectoryLock(path)`` holds ``fcntl.flock(LOCK_EX | LOCK_NB)`` on
``<path>/.jattr.lock`` and writes the holder's PID into it. A second process that
tries to take the same lock gets ``InUseError`` at once, naming the directory and
the PID that holds it; nothing waits and nothing is written. The kernel drops a
flock when its process exits, however it exits (``kill -9`` included), so a lock
left by a killed process is stale only as a file: the next writer takes it without
help. Locks are per process and re-entrant within it (a function that holds a
directory's lock may call another that takes it again).

Run directories, feature stores, curvature files and the LDS cache take one while
they write. Readers take none.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import threading

LOCK_FILE = ".jattr.lock"

_held: dict[str, int] = {}  # directory -> depth, this process's locks (re-entrancy)
_fds: dict[str, int] = {}
_mutex = threading.Lock()


class InUseError(RuntimeError):
  """Another process is writing the directory."""


def _holder(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 64).decode(errors="replace").strip()
  return text or "unknown"


class DirectoryLock:
  """``with DirectoryLock(path, what="feature store"): ...`` (see the module docstring).

  Args:
    path: the directory (created if missing).
    what: what the directory is, for the error message.
  """

  def __init__(self, path: str | os.PathLike, what: str = "directory"):
    self.path = pathlib.Path(path).absolute()
    self.what = what

  def acquire(self) -> "DirectoryLock":
    key = str(self.path)
    with _mutex:
      if key in _held:
        _held[key] += 1
        return self
      self.path.mkdir(parents=True, exist_ok=True)
      fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          raise InUseError(f"{self.what} {self.path} is in use by PID {holder}; wait for that "
                           f"process to finish (or stop it) and run again") from None
        raise
      os.ftruncate(fd, 0)
      os.write(fd, f"{os.getpid()}\n".encode())
      _held[key], _fds[key] = 1, fd
    return self

  def release(self) -> None:
    key = str(self.path)
    with _mutex:
      if key not in _held:
        return
      _held[key] -= 1
      if _held[key]:
        return
      del _held[key]
      fd = _fds.pop(key)
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  def __enter__(self) -> "DirectoryLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
