"""release_free_memory gives freed heap pages back to the OS (glibc)."""

import ctypes.util
import sys

import numpy as np
import pytest

from jattr import host_memory


def _rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096 / 2**20


def _has_glibc_trim() -> bool:
  try:
    return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or None), "malloc_trim")
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_glibc_trim(),
                    reason="malloc_trim is glibc's (Linux); elsewhere the call is a no-op")
def test_freed_heap_holes_leave_resident_memory():
  # 64 KiB blocks sit below glibc's mmap threshold, so they come from the heap.
  # Freeing every other one leaves holes that free() cannot give back (live blocks
  # sit between them); only malloc_trim returns their pages.
  blocks = [np.ones(64 * 1024 // 8) for _ in range(3000)]  # ~190 MiB, touched
  keep = blocks[1::2]
  del blocks[::2]
  del blocks
  before = _rss_mib()
  assert host_memory.release_free_memory()
  after = _rss_mib()
  assert before - after > 40, (before, after)  # ~94 MiB of holes
  assert all(float(b[0]) == 1.0 for b in keep)  # live blocks untouched
