"""One process of tests/distributed_test.py: jattr's sums and maps on a mesh that
spans 2 processes × 2 CPU devices, through jax.distributed (CPU collectives: gloo).

    python distributed_worker.py <port> <process_id> <out.npz>
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_enable_x64", True)


def main(port: str, pid: str, out: str) -> None:
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(pid),
                             initialization_timeout=60)
  import numpy as np  # pylint: disable=import-outside-toplevel

  from jattr import devices  # pylint: disable=import-outside-toplevel
  from distributed_problem import compute  # pylint: disable=import-outside-toplevel

  mesh = devices.data_mesh()  # every process's devices: 4
  assert mesh.devices.size == 4 and jax.process_count() == 2
  np.savez(out, **compute(mesh))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
