"""Giving freed host memory back to the operating system between batches.

Long CPU loops (``fit_kfac``, ``accumulate_sqrt_grads``, ``dense_ggn``) free every
batch's buffers once the batch is done, yet without this module the peak resident
memory of a K-FAC / EK-FAC fit on a 30M-parameter UNet grew with the number of
batches: 4.1 GiB after 2 K-FAC updates, 5.4 GiB after 16, 6.1 GiB after 32
(docs/benchmarks.md#curvature). The growth is memory the allocator holds, not live
data: glibc's malloc keeps freed chunks for reuse, and with several arenas (XLA:CPU
allocates from a pool of threads; glibc allows 8 arenas per core) it kept taking
new pages instead. The peak stayed flat at about 4 GiB with one arena
(``MALLOC_ARENA_MAX=1``), with synchronous dispatch, or with this module's call
after every batch; ``MALLOC_ARENA_MAX=2`` still grew (+1.5 GiB from 2 to 16 updates).

``release_free_memory`` asks glibc to return the free pages of every arena to the
OS (``malloc_trim(0)``). It frees nothing that is in use and is a no-op where
glibc's ``malloc_trim`` does not exist (macOS, musl, Windows). The environment
variable, the other fix, must be set before the process starts, so a library cannot
choose it for its user.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    fn = libc.malloc_trim
  except (OSError, AttributeError):
    return None
  fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
  return fn


def release_free_memory() -> bool:
  """Returns the allocator's free pages to the OS; True if glibc released any.

  Call it after a batch's results are ready (``jax.block_until_ready``), so that
  the batch's buffers are already free.
  """
  fn = _malloc_trim()
  return bool(fn(0)) if fn is not None else False
