"""The accelerator check behind ``benchmarks/device_check.sh``: one short run, JSON out.

On the 30M UNet (``cifar_30m_config()``, 32×32×3; ``--model`` to change it), with
random-init parameters and random images (the cost does not depend on their values):

1. ``featurize``: TRAK features (``jattr.features.featurize``; f = the loss
   measurement over K draws, a sparse projection to k = 4096) of ``--n`` images at
   K = 1 and K = 10, against ONE batched gradient of the summed loss of the same
   images (the cost floor: one backward pass over the batch). The ratio
   featurize / batched is the price of per-example gradients.
2. ``kfac``: a K-FAC fit (``fit_kfac``, expand, ``ggn_curvature_prop``) of ``--n``
   images at K = 1, its Kronecker-factor eigendecompositions included.
3. ``train_many``: members per hour of ``train_many`` at M = 8 and 32 with the
   ``"vmap"`` and ``"map"`` strategies (batch 128, ``--steps`` timed steps after one
   compiled warm-up segment, extrapolated to ``--train-steps`` steps per member).

On several devices, every stage also runs on ``jattr.devices.data_mesh()`` (all of
them), with the ratio to one device.

Every timing is the median of ``--reps`` calls after a first call. The first
call's time (compilation) is recorded beside it, with the device, the JAX version
and the peak device memory where the backend reports it.

    python benchmarks/device_check.py OUT_DIR            # full (GPU: ~5 min)
    python benchmarks/device_check.py OUT_DIR --smoke    # digits UNet, tiny: CPU check
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bench import env_record, log  # noqa: E402

from jattr import devices  # noqa: E402
from jattr.curvature import kfac  # noqa: E402
from jattr.diffusion import draws as draws_lib  # noqa: E402
from jattr.diffusion import measurements, schedules  # noqa: E402
from jattr.features.projection import ProjectionConfig, featurize  # noqa: E402
from jattr.models import config_by_name, make_apply_fn, make_init_fn  # noqa: E402
from jattr.train import TrainConfig, train_many  # noqa: E402

T = 1000


def timed(call, reps: int) -> dict:
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - t0
  walls = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    walls.append(time.perf_counter() - t0)
  return {"first_call_s": first, "wall_s": statistics.median(walls), "walls": walls}


def peak_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def run(args) -> dict:
  cfg = config_by_name(args.model)
  init, apply_fn = make_init_fn(cfg), make_apply_fn(cfg)
  params = init(jax.random.key(0))
  num_params = sum(int(x.size) for x in jax.tree.leaves(params))
  images = jax.random.uniform(jax.random.key(1), (args.n,) + tuple(cfg.image_shape),
                              minval=-1, maxval=1)
  schedule = schedules.linear(T)
  mesh = devices.data_mesh() if len(jax.devices()) > 1 else None
  out = {"env": env_record(args), "model": args.model, "num_params": num_params,
         "num_devices": len(jax.devices()), "featurize": {}, "train_many": {}}
  log(f"{args.model}: {num_params:,} parameters, {len(jax.devices())} device(s)")

  pc = ProjectionConfig(dim=args.dim, kind="sparse", seed=0, nonzeros=4)
  for k in args.draws:
    draws = draws_lib.fixed_draws(jax.random.key(2), k, cfg.image_shape, T)
    fn = measurements.measurement_fn("loss", apply_fn, schedule, draws)
    batched = jax.jit(jax.grad(lambda p, x: jnp.sum(jax.vmap(fn, (None, 0))(p, x))))
    row = {"batched_gradient": timed(lambda: batched(params, images), args.reps),
           "featurize": timed(lambda: featurize(fn, params, images, pc, chunk_size=args.chunk),
                              args.reps)}
    if mesh is not None:
      row["featurize_mesh"] = timed(lambda: featurize(fn, params, images, pc,
                                                      chunk_size=args.chunk, mesh=mesh),
                                    args.reps)
    row["featurize_over_batched"] = row["featurize"]["wall_s"] / row["batched_gradient"]["wall_s"]
    out["featurize"][f"K={k}"] = row
    log(f"K={k}: featurize {row['featurize']['wall_s']:.3f} s, one batched gradient "
        f"{row['batched_gradient']['wall_s']:.3f} s ({row['featurize_over_batched']:.1f}×)")

  draws = draws_lib.fixed_draws(jax.random.key(3), 1, cfg.image_shape, T)
  fit = lambda: jax.tree.leaves(kfac.fit_kfac(  # noqa: E731
      apply_fn, params, schedule, images, draws, chunk_size=args.chunk, key=jax.random.key(4)))
  out["kfac"] = timed(fit, max(1, args.reps // 2))
  log(f"K-FAC fit of {args.n}: {out['kfac']['wall_s']:.2f} s")

  cfg_t = TrainConfig(num_steps=args.steps, batch_size=128, learning_rate=1e-4, warmup_steps=1,
                      segment_steps=args.steps)
  data = jax.random.uniform(jax.random.key(5), (args.train_n,) + tuple(cfg.image_shape),
                            minval=-1, maxval=1)
  for m in args.members:
    masks = np.random.default_rng(m).random((m, args.train_n)) < 0.5
    for strategy in ("vmap", "map"):
      call = lambda: train_many(apply_fn, init, schedule, data, masks, np.arange(m),  # noqa: E731
                                cfg_t, strategy=strategy, mesh=mesh).losses
      try:
        r = timed(call, 1)
      except Exception as e:  # noqa: BLE001  (an out-of-memory M is a result too)
        out["train_many"][f"M={m},{strategy}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        log(f"train_many M={m} {strategy}: {type(e).__name__}")
        continue
      r["members_per_hour"] = 3600 * m * args.steps / (r["wall_s"] * args.train_steps)
      out["train_many"][f"M={m},{strategy}"] = r
      log(f"train_many M={m} {strategy}: {r['members_per_hour']:.1f} members/h at "
          f"{args.train_steps} steps")
  out["peak_device_bytes"] = peak_memory()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out_dir")
  parser.add_argument("--model", default="cifar_30m")
  parser.add_argument("--n", type=int, default=64)
  parser.add_argument("--chunk", type=int, default=16)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--draws", type=lambda s: [int(v) for v in s.split(",")], default=[1, 10])
  parser.add_argument("--members", type=lambda s: [int(v) for v in s.split(",")],
                      default=[8, 32])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--train-n", type=int, default=512)
  parser.add_argument("--train-steps", type=int, default=16000)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--smoke", action="store_true",
                      help="the digits UNet at toy sizes: checks the script on a CPU")
  args = parser.parse_args()
  if args.smoke:
    args.model, args.n, args.chunk, args.dim = "digits", 8, 4, 256
    args.draws, args.members, args.steps, args.train_n, args.reps = [1, 2], [2], 2, 32, 1
  t0 = time.perf_counter()
  res = run(args)
  res["env"]["total_s"] = time.perf_counter() - t0
  out = pathlib.Path(args.out_dir) / "device_check.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(res, indent=1, default=str))
  print(f"wrote {out} ({res['env']['total_s']:.0f} s)")


if __name__ == "__main__":
  main()
