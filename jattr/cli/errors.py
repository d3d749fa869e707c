"""How a failed command ends: one line on stderr and exit status 2.

``jattr CMD: error: MESSAGE``, where MESSAGE names the flag, key or path, the value
and what is expected (bad inputs), or the path and the cause (operational errors: a
read-only directory, a full disk, a damaged checkpoint, a directory in use). The
traceback is printed only with ``jattr --debug`` or ``JATTR_DEBUG=1``. Anything else
(a TypeError, a KeyError…) is a bug in jattr and keeps its traceback.
"""

from __future__ import annotations

import errno
import os

from jattr.io.lock import InUseError

DEBUG_ENV = "JATTR_DEBUG"
EXPECTED = (ValueError, OSError, InUseError)
"""The exceptions a command reports as one line (bad input, or the machine said no)."""
MAX_MESSAGE = 1200

_HINTS = {
    errno.EACCES: "choose a writable location (or fix its permissions)",
    errno.EPERM: "choose a writable location (or fix its permissions)",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENOSPC: "free some space (or choose another location) and run the command again; "
                  "finished work is kept",
    errno.EDQUOT: "the disk quota is exceeded; free some space and run the command again",
}


def debug_enabled(flag: bool = False) -> bool:
  """``--debug`` given, or ``$JATTR_DEBUG`` set to anything but ``""``/``0``/``false``."""
  return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
  """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
  text = " ".join(str(text).split())
  if len(text) > limit:
    text = text[:limit - 40].rstrip() + "… (the rest with --debug)"
  return text


def message(e: BaseException) -> str:
  """The one-line message of an expected error."""
  if isinstance(e, OSError) and e.errno is not None and e.strerror:
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    text = f"{where}: {e.strerror}" if where else e.strerror
    hint = _HINTS.get(e.errno)
    return one_line(f"{text}; {hint}" if hint else text)
  return one_line(str(e) or type(e).__name__)
