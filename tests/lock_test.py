"""One writer at a time: directory locks across processes, and stale locks."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from jattr.io.feature_store import FeatureStore
from jattr.io.lock import DirectoryLock, InUseError

HOLD = ("import sys, time\n"
        "from jattr.io.lock import DirectoryLock\n"
        "DirectoryLock(sys.argv[1], 'feature store').acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")


def _holder(path):
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_second_writer_is_refused_naming_the_pid_and_a_killed_holder_frees_it(tmp_path):
  proc = _holder(tmp_path / "d")
  try:
    with pytest.raises(InUseError, match=rf"feature store .*/d is in use by PID {proc.pid}"):
      DirectoryLock(tmp_path / "d", "feature store").acquire()
  finally:
    os.kill(proc.pid, signal.SIGKILL)  # a writer killed with -9 leaves its lock file
    proc.wait()
  assert (tmp_path / "d" / ".jattr.lock").exists()
  with DirectoryLock(tmp_path / "d"):  # stale: the kernel dropped the flock, so it is free
    assert (tmp_path / "d" / ".jattr.lock").read_text().strip() == str(os.getpid())


def test_lock_is_reentrant_within_a_process(tmp_path):
  with DirectoryLock(tmp_path / "d"):
    with DirectoryLock(tmp_path / "d"):
      pass
    # still held by the outer one: another process is refused
    out = subprocess.run([sys.executable, "-c",
                          "import sys\nfrom jattr.io.lock import DirectoryLock\n"
                          "try:\n DirectoryLock(sys.argv[1]).acquire()\n"
                          "except Exception as e: print(type(e).__name__)", str(tmp_path / "d")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "InUseError"


def test_store_featurize_refuses_a_store_being_written(tmp_path):
  from jattr.features.projection import ProjectionConfig
  from jattr.runs import store_featurize

  proj = ProjectionConfig(dim=4, seed=0)
  store = FeatureStore.open(tmp_path / "s", {"projection": {"dim": 4, "kind": "rademacher",
                                                             "seed": 0, "block_size": 1024}},
                            6, 4, 3)
  fn = lambda p, x: (p["w"] * x).sum()  # noqa: E731
  params = {"w": np.ones(5, np.float32)}
  proc = _holder(tmp_path / "s")
  try:
    with pytest.raises(InUseError, match="in use by PID"):
      store_featurize(fn, params, np.ones((6, 5), np.float32), proj, store)
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  assert store.refresh().missing_chunks() == [0, 1]  # nothing was written by the refused call
  store_featurize(fn, params, np.ones((6, 5), np.float32), proj, store)
  assert store.complete
