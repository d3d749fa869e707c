"""Dense against sparse projection: featurization time against one batched gradient.

The digits UNet (``digits_config()``, random init) on digits images; f = the
diffusion loss over K fixed draws (uniform timesteps, T = 1000); k = 4096. Timed,
per example:

  - (b) one batched gradient ∇_θ Σ_i f(θ; x_i) over N examples (a training step's
    cost: the reference);
  - per-example gradients alone (``per_example_flat_grads``, one chunk of C);
  - ``featurize`` on one chunk of C with the dense Rademacher P (regenerated from its
    seed: 2·P·k flops per example) and with the sparse P (``kind="sparse"``, s
    non-zeros per row: P·s adds per example) for each s of ``--nonzeros``;
  - ``project`` alone on a [C, P] array, dense and sparse.

Every configuration is compiled on its first call (compile time from
``jax.monitoring``, reported apart), then ``--reps`` rounds in which every
configuration runs once (interleaved), wall and process CPU time (all threads);
medians. The target: featurization at K = 1 within 2x one batched gradient.

    .venv/bin/python benchmarks/projection.py                 # K = 1,10, C = 128, s = 1,2,4,8
    .venv/bin/python benchmarks/projection.py --report-only benchmarks/results/projection.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattr.data import load_digits
from jattr.diffusion import fixed_draws, measurements, schedules
from jattr.features import ProjectionConfig, featurize, project
from jattr.grads import per_example_flat_grads
from jattr.models import digits_config, make_apply_fn, make_init_fn

from _bench import CompileClock, env_record, interleaved, ints, log, write_results

ROOT = pathlib.Path(__file__).resolve().parents[1]
T = 1000


def calls(args, apply_fn, params, x, g):
  """name -> (zero-argument call, examples it covers)."""
  out = {}
  configs = {"dense": ProjectionConfig(args.dim, "rademacher", seed=0)}
  for s in args.nonzeros:
    configs[f"sparse s={s}"] = ProjectionConfig(args.dim, "sparse", seed=0, nonzeros=s)
  for name, cfg in configs.items():
    out[("project", name)] = ((lambda c: lambda: project(c, g))(cfg), args.chunk)
  for num_draws in args.draws:
    draws = fixed_draws(jax.random.key(0), num_draws, tuple(x.shape[1:]), T)
    fn = measurements.measurement_fn("loss", apply_fn, schedules.linear(T), draws)
    batched = jax.jit(jax.grad(lambda p, xs, fn=fn: jnp.sum(jax.vmap(fn, (None, 0))(p, xs))))
    out[(f"K={num_draws}", "batched gradient (b)")] = (
        (lambda b: lambda: b(params, x[:args.n]))(batched), args.n)
    xc = x[:args.chunk]
    out[(f"K={num_draws}", "per-example grads only")] = (
        (lambda f: lambda: per_example_flat_grads(f, params, xc))(fn), args.chunk)
    for name, cfg in configs.items():
      out[(f"K={num_draws}", f"featurize, {name}")] = (
          (lambda f, c: lambda: featurize(f, params, xc, c))(fn, cfg), args.chunk)
  return out


def report(res: dict) -> str:
  env, a = res["env"], res["env"]["args"]
  lines = [f"{env['date']}, {env['cpus']} CPUs ({env['backend']}), load average "
           f"{env['load_before']} before / {env['load_after']} after, jax {env['jax']}; "
           f"digits UNet ({res['num_params']:,} parameters), k = {a['dim']}, chunk "
           f"C = {a['chunk']}, batched gradient over N = {a['n']}; {a['reps']} interleaved "
           "reps (medians).", "",
           "| K | computation | examples | wall s | CPU s | wall / (b) per example "
           "| CPU / (b) per example | compile s |", "|---|---|---|---|---|---|---|---|"]
  rows = res["rows"]
  for r in rows:
    ref = next((b for b in rows if b["group"] == r["group"]
                and b["name"] == "batched gradient (b)"), None)
    ratio = cpu_ratio = ""
    if ref is not None:
      ratio = f"{(r['wall_s'] / r['examples']) / (ref['wall_s'] / ref['examples']):.2f}x"
      cpu_ratio = f"{(r['cpu_s'] / r['examples']) / (ref['cpu_s'] / ref['examples']):.2f}x"
    group = "-" if r["group"] == "project" else r["group"].split("=")[1]
    name = f"project alone, {r['name']}" if r["group"] == "project" else r["name"]
    lines.append(f"| {group} | {name} | {r['examples']} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} "
                 f"| {ratio} | {cpu_ratio} | {r['compile_s']:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", type=int, default=256, help="examples of the batched gradient")
  p.add_argument("--chunk", type=int, default=128, help="examples per featurize call")
  p.add_argument("--draws", type=ints, default=[1, 10], help="K values")
  p.add_argument("--dim", type=int, default=4096, help="k")
  p.add_argument("--nonzeros", type=ints, default=[1, 2, 4, 8], help="s of the sparse P")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--report-only", metavar="JSON")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "projection.json"))
  args = p.parse_args(argv)
  if args.report_only:
    print(report(json.loads(pathlib.Path(args.report_only).read_text())))
    return 0
  res = {"env": env_record(args)}
  t0 = time.perf_counter()
  cfg = digits_config()
  apply_fn, params = make_apply_fn(cfg), make_init_fn(cfg)(jax.random.key(0))
  num_params = sum(int(v.size) for v in jax.tree_util.tree_leaves(params))
  x = jnp.asarray(load_digits().x[:max(args.n, args.chunk)])
  g = jnp.asarray(np.random.default_rng(1).standard_normal((args.chunk, num_params), np.float32))
  log(f"digits UNet: {num_params:,} params; K {args.draws}; s {args.nonzeros}")
  table = calls(args, apply_fn, params, x, g)
  timed = interleaved({k: c for k, (c, _) in table.items()}, args.reps, CompileClock(),
                      jax.block_until_ready)
  res["num_params"] = num_params
  res["rows"] = [{"group": k[0], "name": k[1], "examples": table[k][1], **v}
                 for k, v in timed.items()]
  res["env"]["load_after"] = [round(v, 2) for v in os.getloadavg()]
  write_results(res, args.out, report, t0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
