"""Two processes on localhost (jax.distributed, CPU collectives) give the numbers of
one: the features are gathered, the dense GGN's and K-FAC's partial sums are
all-reduced across the processes' 4 devices."""

import socket
import subprocess
import sys
import pathlib

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.devices
HERE = pathlib.Path(__file__).resolve().parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  from distributed_problem import compute  # pylint: disable=import-outside-toplevel
  with jax.enable_x64(True):
    ref = compute(None)
  port = _free_port()
  outs = [tmp_path / f"p{p}.npz" for p in range(2)]
  procs = [subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), str(port),
                             str(p), str(outs[p])], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for p in range(2)]
  logs = []
  for proc in procs:
    try:
      logs.append(proc.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("a worker did not finish in 240 s")
  for proc, log in zip(procs, logs):
    assert proc.returncode == 0, log[-3000:]
  for out in outs:
    got = np.load(out)
    np.testing.assert_allclose(got["features"], ref["features"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["ggn"], ref["ggn"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["kfac_matvec"], ref["kfac_matvec"], rtol=1e-10, atol=1e-12)
