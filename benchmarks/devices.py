"""Throughput on 1, 2, 4 and 8 devices, as ratios to 1 device, in one run.

The same three stages on a ``jattr.devices.data_mesh(D)`` for each D:

- ``featurize``: TRAK features (``jattr.features.featurize``; f = the loss
  measurement over K = ``--draws`` draws, a sparse projection to k = ``--dim``) of
  ``--n`` digits on the digits UNet (``digits_config()``, 185k parameters),
  ``--chunk`` examples per device per chunk;
- ``kfac``: a K-FAC fit (``fit_kfac``, expand, ``ggn_curvature_prop``) of the same
  examples, ``--chunk`` examples per device per chunk;
- ``train_many``: ``--members`` members, ``--steps`` steps each, batch 64, the
  ``"map"`` strategy on every device (members split over the devices), as members per
  hour at ``--train-steps`` steps per member.

With no GPU at hand the devices are XLA's forced host devices
(``--xla_force_host_platform_device_count=8``, set by this script). They share the
machine's cores: on 2 cores a ratio above ~2× is not possible, and each forced
device runs its programs with fewer threads than one device has alone. A ratio
here measures whether the split adds overhead or keeps the cores busier. It does
not forecast how the work scales on 8 GPUs; docs/devices.md says what does.

For each D the programs are compiled and run once first (the compile time and the
first call are recorded). Then ``--reps`` rounds run every D once each, in turn, so
that a change in load hits them alike. The medians of wall and process CPU time
are reported, with the ratio to D = 1 of the per-round wall times, also a median.

    python benchmarks/devices.py                    # ~10 min on 2 shared cores
    python benchmarks/devices.py --counts 1,2 --reps 2 --n 64 --members 4   # quick
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench import CompileClock, env_record, ints, log, write_results  # noqa: E402

from jattr import devices  # noqa: E402
from jattr.curvature import kfac  # noqa: E402
from jattr.data import load_digits  # noqa: E402
from jattr.diffusion import draws as draws_lib  # noqa: E402
from jattr.diffusion import measurements, schedules  # noqa: E402
from jattr.features.projection import ProjectionConfig, featurize  # noqa: E402
from jattr.models import digits_config, make_apply_fn, make_init_fn  # noqa: E402
from jattr.train import TrainConfig, train_many  # noqa: E402


def stages(args):
  """name -> fn(mesh) -> a result to block on."""
  images = np.asarray(load_digits().x[:args.n], np.float32)
  init, apply_fn = make_init_fn(digits_config()), make_apply_fn(digits_config())
  params = init(jax.random.key(0))
  schedule = schedules.linear(1000)
  draws = draws_lib.fixed_draws(jax.random.key(1), args.draws, images.shape[1:], 1000)
  fn = measurements.measurement_fn("loss", apply_fn, schedule, draws)
  pc = ProjectionConfig(dim=args.dim, kind="sparse", seed=0, nonzeros=4)
  cfg = TrainConfig(num_steps=args.steps, batch_size=64, learning_rate=1e-4, warmup_steps=1,
                    segment_steps=args.steps)
  masks = np.random.default_rng(0).random((args.members, images.shape[0])) < 0.5

  return {
      "featurize": lambda mesh: featurize(fn, params, images, pc, chunk_size=args.chunk,
                                          mesh=mesh),
      "kfac": lambda mesh: _fit_kfac(apply_fn, params, schedule, images, draws, args, mesh),
      "train_many": lambda mesh: train_many(apply_fn, init, schedule, images, masks,
                                            np.arange(args.members), cfg, strategy="map",
                                            mesh=mesh).losses,
  }


def _fit_kfac(apply_fn, params, schedule, images, draws, args, mesh):
  with devices.use_mesh(mesh):
    state = kfac.fit_kfac(apply_fn, params, schedule, jnp.asarray(images), draws,
                          chunk_size=args.chunk, key=jax.random.key(2))
  return jax.tree.leaves(state)


def run(args) -> dict:
  clock = CompileClock()
  calls = stages(args)
  meshes = {d: devices.data_mesh(d) for d in args.counts}
  out = {"env": env_record(args), "stages": {}}
  for stage, call in calls.items():
    if stage not in args.stages:
      continue
    rows = {d: {"wall": [], "cpu": [], "compile_in_reps_s": []} for d in args.counts}
    for d, mesh in meshes.items():  # compile + first call
      before, t0 = clock.total, time.perf_counter()
      jax.block_until_ready(call(mesh))
      rows[d]["first_call_s"] = time.perf_counter() - t0
      rows[d]["compile_s"] = clock.total - before
      log(f"{stage} D={d}: first call {rows[d]['first_call_s']:.1f} s")
    ratios = {d: [] for d in args.counts}
    for r in range(args.reps):
      order = args.counts if r % 2 == 0 else args.counts[::-1]
      for d in order:
        before, t0, c0 = clock.total, time.perf_counter(), time.process_time()
        jax.block_until_ready(call(meshes[d]))
        rows[d]["wall"].append(time.perf_counter() - t0)
        rows[d]["cpu"].append(time.process_time() - c0)
        rows[d]["compile_in_reps_s"].append(clock.total - before)
      for d in args.counts:
        ratios[d].append(rows[d]["wall"][-1] and rows[args.counts[0]]["wall"][-1]
                         / rows[d]["wall"][-1])
      log(f"{stage}: rep {r + 1}/{args.reps}, load {os.getloadavg()[0]:.2f}")
    for d in args.counts:
      row = rows[d]
      row["wall_s"], row["cpu_s"] = statistics.median(row["wall"]), statistics.median(row["cpu"])
      row["speedup_vs_first"] = statistics.median(ratios[d])
      if stage == "train_many":
        row["members_per_hour"] = 3600 * args.members * args.steps / (row["wall_s"]
                                                                     * args.train_steps)
      else:
        row["examples_per_s"] = args.n / row["wall_s"]
    out["stages"][stage] = {str(d): rows[d] for d in args.counts}
  out["env"]["load_after"] = [round(v, 2) for v in os.getloadavg()]
  return out


def report(res) -> str:
  lines = ["| stage | devices | wall s | CPU s | throughput | speed-up vs 1 |",
           "|---|---|---|---|---|---|"]
  for stage, rows in res["stages"].items():
    for d, row in rows.items():
      thr = (f"{row['members_per_hour']:.1f} members/h" if "members_per_hour" in row
             else f"{row['examples_per_s']:.1f} examples/s")
      lines.append(f"| {stage} | {d} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | {thr} | "
                   f"{row['speedup_vs_first']:.2f}× |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--counts", type=ints, default=[1, 2, 4, 8])
  parser.add_argument("--stages", default="featurize,kfac,train_many")
  parser.add_argument("--n", type=int, default=256)
  parser.add_argument("--draws", type=int, default=4)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--chunk", type=int, default=16)
  parser.add_argument("--members", type=int, default=8)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--train-steps", type=int, default=4000)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", default="benchmarks/results/devices_cpu.json")
  args = parser.parse_args()
  args.stages = args.stages.split(",")
  t0 = time.perf_counter()
  write_results(run(args), args.out, report, t0)


if __name__ == "__main__":
  main()
