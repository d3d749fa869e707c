"""One process of a many-process featurization, for tests/multihost_test.py.

    python tests/multihost_worker.py STORE PROCESS_ID NUM_PROCESSES RESULT.json
        [--port PORT] [--sleep S] [--wait W]

With ``--port`` it joins a ``jax.distributed`` job on ``localhost:PORT`` (CPU
collectives: gloo) and takes its process index and count from JAX; without, it
passes them to ``store_featurize`` explicitly. It featurizes the tiny problem of
``problem()`` into the store STORE, sleeping S seconds after each chunk it writes
(so that a test can kill it between chunks), and writes RESULT.json: the chunks its
progress callback saw written, whether the store is complete, and the error raised,
if any. Not collected by pytest (the name does not end in ``_test.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

N, D, K, CHUNK_ROWS = 12, 5, 4, 2
"""Rows, input size, projected dimension and rows per store chunk of ``problem()``."""


def problem():
  """``(fn, params, x, proj, config)``: a tiny MLP's scalar output per example."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from jattr.features import ProjectionConfig  # pylint: disable=import-outside-toplevel
  from jattr.io.feature_store import projection_spec  # pylint: disable=import-outside-toplevel
  from jattr.io.hashing import model_hash  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.standard_normal((D, 8)) / 2, jnp.float32),
            "b1": jnp.zeros(8, jnp.float32),
            "w2": jnp.asarray(rng.standard_normal(8) / 3, jnp.float32)}

  def fn(p, x):
    return jnp.sum(jnp.tanh(x @ p["w1"] + p["b1"]) * p["w2"]) ** 2

  x = rng.standard_normal((N, D)).astype(np.float32)
  proj = ProjectionConfig(dim=K, seed=7, block_size=32)
  config = {"model": {"params_sha256": model_hash(params)}, "projection": projection_spec(proj),
            "dataset": {"name": "toy", "num": N}}
  return fn, params, x, proj, config


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("store")
  ap.add_argument("process_id", type=int)
  ap.add_argument("num_processes", type=int)
  ap.add_argument("result")
  ap.add_argument("--port", type=int)
  ap.add_argument("--sleep", type=float, default=0.0)
  ap.add_argument("--wait", type=float, default=30.0)
  args = ap.parse_args(argv)

  import jax  # pylint: disable=import-outside-toplevel

  if args.port is not None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)
    assert jax.process_index() == args.process_id
    explicit = {}
  else:
    explicit = {"process_index": args.process_id, "process_count": args.num_processes}

  from jattr.io.feature_store import FeatureStore  # pylint: disable=import-outside-toplevel
  from jattr.runs import stores  # pylint: disable=import-outside-toplevel

  fn, params, x, proj, config = problem()
  store = FeatureStore.open(args.store, config, N, K, CHUNK_ROWS)
  written = []

  def progress(desc, done, total, **metrics):
    del desc, total, metrics
    written.append(done)  # rows of this process's group done: one call per chunk written
    print(f"chunk written ({done} rows)", flush=True)
    time.sleep(args.sleep)

  result = {"process_id": args.process_id}
  try:
    store = stores.store_featurize(fn, params, x, proj, store, progress=progress,
                                   wait_s=args.wait, **explicit)
    result.update(complete=store.complete, error=None)
  except Exception as e:  # pylint: disable=broad-except
    result.update(complete=False, error=f"{type(e).__name__}: {e}")
  result["chunks_written"] = len(written)
  tmp = args.result + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f)
  os.replace(tmp, args.result)
  print("result written", flush=True)
  sys.stdout.flush()
  if args.port is not None and result["complete"]:
    jax.distributed.shutdown()  # every peer is alive and done: a clean shutdown
  # Otherwise skip JAX's exit-time shutdown barrier, which would wait for a dead peer.
  os._exit(0 if result["error"] is None else 3)


if __name__ == "__main__":
  sys.exit(main())
