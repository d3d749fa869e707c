"""Many processes, one feature store: a jax.distributed job killed and resumed.

Real local processes (tests/multihost_worker.py, run with ``sys.executable``) join a
``jax.distributed`` job on localhost (CPU collectives: gloo) and featurize a tiny
MLP into one store; one is killed with SIGKILL between chunks, the job is run again,
and the store must equal the single-process result bit for bit (same machine, same
compiled chunk shape: every row is computed by the same program; tolerance 0). Every
subprocess has a timeout, so nothing can hang. Marked ``devices``: run by
``pytest -m devices``.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import multihost_worker as worker
from jattr.io.feature_store import FeatureStore, StoreValidationError, process_chunks
from jattr.io.lock import InUseError
from jattr.runs import stores

pytestmark = pytest.mark.devices

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
TIMEOUT = 120
"""Seconds any one worker may take before the test gives up on it (and kills it)."""
CHUNKS = -(-worker.N // worker.CHUNK_ROWS)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device per process is all a worker needs
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
  return env


def _launch(tmp, store, run, *, sleep=(0.0, 0.0), wait=30.0, port=True):
  """Both processes of one job; returns the Popen objects."""
  port = _free_port() if port else None
  procs = []
  for p in range(2):
    argv = [sys.executable, str(WORKER), str(store), str(p), "2", str(tmp / f"{run}-{p}.json"),
            "--sleep", str(sleep[p]), "--wait", str(wait)]
    if port is not None:
      argv += ["--port", str(port)]
    with open(tmp / f"{run}-{p}.log", "w") as log:  # the child keeps its own copy
      procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env()))
  return procs


def _finish(tmp, run, procs):
  """Waits for the job's processes; returns their results."""
  try:
    for proc in procs:
      proc.wait(timeout=TIMEOUT)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  out = []
  for p in range(len(procs)):
    path = tmp / f"{run}-{p}.json"
    log = (tmp / f"{run}-{p}.log").read_text()
    assert path.exists(), f"process {p} of run {run} wrote no result; its log:\n{log[-3000:]}"
    out.append(json.loads(path.read_text()))
  return out


def _reference(path):
  """The single-process store of the same problem (this process, process_count=1)."""
  fn, params, x, proj, config = worker.problem()
  store = FeatureStore.open(path, config, worker.N, worker.K, worker.CHUNK_ROWS)
  return stores.store_featurize(fn, params, x, proj, store, process_index=0, process_count=1)


def test_killed_process_is_resumed_and_the_store_equals_one_process(tmp_path):
  store_dir = tmp_path / "store"
  group1 = set(process_chunks(CHUNKS, 1, 2))
  # Run 1: process 1 sleeps after each chunk it writes; it is killed (SIGKILL) as soon
  # as its first chunk is recorded, while process 0 finishes its own and waits.
  procs = _launch(tmp_path, store_dir, "run1", sleep=(0.0, 4.0), wait=3.0)
  try:
    deadline = time.monotonic() + TIMEOUT
    while not any((store_dir / "done" / f"{i}.json").exists() for i in group1):
      assert procs[1].poll() is None, (tmp_path / "run1-1.log").read_text()[-3000:]
      assert time.monotonic() < deadline, "process 1 recorded no chunk in time"
      time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=TIMEOUT)
  finally:
    for proc in procs[1:]:
      if proc.poll() is None:
        proc.kill()
  procs[0].wait(timeout=TIMEOUT)
  (first,) = _finish(tmp_path, "run1", procs[:1])
  # The survivor did not hang: it waited 3 s without news, then named what is missing.
  assert first["chunks_written"] == len(process_chunks(CHUNKS, 0, 2))
  assert not first["complete"] and "StoreValidationError" in first["error"], first
  assert "process 1 of 2: chunks" in first["error"] and "did not finish" in first["error"]

  missing = FeatureStore.load(store_dir).missing_chunks()
  assert missing and set(missing) < group1  # its first chunk survived the kill
  with pytest.raises(StoreValidationError, match="process 1 of 2: chunks") as e:
    stores.validate_store(store_dir)
  assert e.value.missing == {1: missing}

  # Run 2: the same job again computes only the chunks the killed process lost.
  results = _finish(tmp_path, "run2", _launch(tmp_path, store_dir, "run2"))
  assert [r["error"] for r in results] == [None, None], results
  assert [r["chunks_written"] for r in results] == [0, len(missing)]
  assert all(r["complete"] for r in results)

  store = stores.validate_store(store_dir)  # every chunk's data checked too
  sidecar = json.loads((store_dir / "store.json").read_text())
  assert sidecar["complete_chunks"] == list(range(CHUNKS))
  assert len(sidecar["chunk_sha256"]) == CHUNKS
  assert not (store_dir / "done").exists()  # folded: a plain single-writer store
  record = json.loads((store_dir / "processes" / "1" / "process.json").read_text())
  assert record["status"] == "finished" and record["computed"] == missing
  np.testing.assert_array_equal(store.read(), _reference(tmp_path / "ref").read())


def test_validate_names_a_process_that_never_ran_and_each_can_run_alone(tmp_path):
  fn, params, x, proj, config = worker.problem()
  path = tmp_path / "s"

  def run(p, count=3):
    store = FeatureStore.open(path, config, worker.N, worker.K, worker.CHUNK_ROWS)
    return stores.store_featurize(fn, params, x, proj, store, process_index=p,
                                  process_count=count)

  # Process 0 of 3 alone (no jax.distributed): its chunks, then it returns (wait 0).
  assert run(0).missing_chunks() == [2, 3, 4, 5]
  with pytest.raises(StoreValidationError) as e:
    stores.validate_store(path)
  assert e.value.missing == {1: [2, 3], 2: [4, 5]}
  assert "process 1 of 3: chunks 2-3 (4 rows) missing; it never ran" in str(e.value)
  assert "process 2 of 3: chunks 4-5 (4 rows) missing; it never ran" in str(e.value)

  # The same index twice at once is refused; another index writes beside it.
  hold = ("import sys, time\nfrom jattr.io.lock import DirectoryLock\n"
          "DirectoryLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(60)\n")
  holder = subprocess.Popen([sys.executable, "-c", hold, str(path / "processes" / "2")],
                            stdout=subprocess.PIPE, text=True, env=_env())
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(InUseError, match="process 2 of feature store"):
      run(2)
    assert run(1).missing_chunks() == [4, 5]  # the last group's lock is held: still open
  finally:
    holder.kill()
    holder.wait(timeout=TIMEOUT)
  store = run(2)  # the last to finish folds the records
  assert store.complete and not (path / "done").exists()
  np.testing.assert_array_equal(stores.validate_store(path).read(),
                                _reference(tmp_path / "ref").read())


def test_validate_names_records_that_disagree(tmp_path):
  fn, params, x, proj, config = worker.problem()
  store = FeatureStore.open(tmp_path / "s", config, worker.N, worker.K, worker.CHUNK_ROWS)
  stores.store_featurize(fn, params, x, proj, store, process_index=0, process_count=2)
  other = dict(json.loads((tmp_path / "s" / "processes" / "0" / "process.json").read_text()))
  other.update(params_sha256="0" * 64, process_index=1)
  store.write_process_record(1, {k: v for k, v in other.items()
                                 if k not in ("format", "version", "process_index")})
  with pytest.raises(StoreValidationError, match="different parameters") as e:
    stores.validate_store(tmp_path / "s")
  assert e.value.missing == {1: [3, 4, 5]} and len(e.value.problems) == 1

