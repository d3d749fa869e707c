"""Chunked against unchunked per-example gradients and featurization.

jattr's documented, memory-bounded way to run is with chunks smaller than N. This
measures what chunking costs, on two models and digits images (8x8), f = the
diffusion loss over K fixed draws:

  - ``conv4``: a plain-JAX denoiser with native convolutions
    (``lax.conv_general_dilated``): 3x3 convs 1 -> W -> W -> W -> 1 with SiLU and a
    sinusoidal time embedding through a small MLP (a per-channel shift in each
    hidden layer);
  - ``unet``: jattr's digits UNet, ``make_apply_fn(digits_config())`` (im2col
    convolutions on CPU).

For each model, per-example gradients (``jattr.grads.per_example_flat_grads``) and
featurization (``jattr.features.featurize``, Rademacher projection to k) over N
examples, three ways:

  - unchunked: ``chunk_size=None``, one call on all N (the reference);
  - before, chunk C: the same function under ``jax.jit`` (the traced path: one
    program, ``lax.map`` over the chunks; what every eager call ran before the host
    loop);
  - after, chunk C: the eager call (a host loop over one compiled chunk program,
    ``jattr.grads.loop_chunks``);
  - one call of C, x N/C: the unchunked call on the first C examples, its time
    multiplied by N/C: what N/C chunks cost at the speed of one unchunked call of
    the chunk's size (featurize regenerates P once per call, so chunked
    featurization costs N/C regenerations where the unchunked call pays one).

Every configuration is compiled on its first call; its compile time is the sum of
jax's tracing, lowering and backend-compile durations during that call (from
``jax.monitoring``). Then ``--reps`` timed calls per configuration, interleaved
(rep 1 of every configuration, then rep 2, ...), each with wall and process CPU time
(all threads); the tables give medians. The targets: chunked per-example time
≤ 1.1x unchunked, chunked compile time ≤ 1.5x unchunked.

    .venv/bin/python benchmarks/chunking.py                      # N = 256, K = 10, C = 64,128
    .venv/bin/python benchmarks/chunking.py --quick              # N = 64, C = 16,32, k = 1024
    .venv/bin/python benchmarks/chunking.py --report-only benchmarks/results/chunking.json

Prints markdown tables and writes benchmarks/results/chunking.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jattr.data import load_digits
from jattr.diffusion import fixed_draws, measurements, schedules
from jattr.features import ProjectionConfig, featurize
from jattr.grads import per_example_flat_grads
from jattr.models import digits_config, make_apply_fn, make_init_fn

from _bench import CompileClock, ints, log, write_results  # the script's own folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
T = 1000


# ---------------------------------------------------------------------------------
# the 4-conv denoiser (plain JAX, native convolutions)
# ---------------------------------------------------------------------------------


def conv4_init(key: jax.Array, width: int = 32, emb: int = 32, hidden: int = 128) -> dict:
  """Parameters of ``conv4_apply``: 4 HWIO kernels and the time MLP."""
  keys = jax.random.split(key, 6)
  chans = [1, width, width, width, 1]
  params = {}
  for i in range(4):
    params[f"conv{i}"] = {
        "w": jax.random.normal(keys[i], (3, 3, chans[i], chans[i + 1])) / math.sqrt(9 * chans[i]),
        "b": jnp.zeros((chans[i + 1],))}
  params["time1"] = {"w": jax.random.normal(keys[4], (emb, hidden)) / math.sqrt(emb),
                     "b": jnp.zeros((hidden,))}
  params["time2"] = {"w": jax.random.normal(keys[5], (hidden, 3 * width)) / math.sqrt(hidden),
                     "b": jnp.zeros((3 * width,))}
  return params


def conv4_apply(params: dict, x: jax.Array, t: jax.Array) -> jax.Array:
  """``apply_fn(params, x_t [B, H, W, 1], t [B]) -> [B, H, W, 1]`` with lax.conv."""
  emb = params["time1"]["w"].shape[0]
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(emb // 2) / (emb // 2))
  angles = t.astype(x.dtype)[:, None] * freqs[None]
  e = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
  e = jax.nn.silu(e @ params["time1"]["w"] + params["time1"]["b"])
  shifts = (e @ params["time2"]["w"] + params["time2"]["b"]).reshape(x.shape[0], 3, -1)
  h = x
  for i in range(4):
    h = jax.lax.conv_general_dilated(h, params[f"conv{i}"]["w"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = h + params[f"conv{i}"]["b"]
    if i < 3:
      h = jax.nn.silu(h + shifts[:, i, None, None, :])
  return h


def model(name: str):
  if name == "conv4":
    return conv4_apply, conv4_init(jax.random.key(0))
  if name == "unet":
    cfg = digits_config()
    return make_apply_fn(cfg), make_init_fn(cfg)(jax.random.key(0))
  raise ValueError(f"unknown model {name!r}")


# ---------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------


def configurations(apply_fn, params, x, args):
  """name -> (model-free call, metadata): the functions that are timed."""
  draws = fixed_draws(jax.random.key(0), args.draws, tuple(x.shape[1:]), T)
  fn = measurements.measurement_fn("loss", apply_fn, schedules.linear(T), draws)
  proj = ProjectionConfig(dim=args.dim, kind="rademacher", seed=0)
  out = {}
  for what in args.what:
    if what == "grads":
      eager = lambda c: (lambda: per_example_flat_grads(fn, params, x, chunk_size=c))  # noqa: E731
      traced = lambda c: jax.jit(  # noqa: E731
          lambda p, xs: per_example_flat_grads(fn, p, xs, chunk_size=c))
    else:
      eager = lambda c: (lambda: featurize(fn, params, x, proj, chunk_size=c))  # noqa: E731
      traced = lambda c: jax.jit(  # noqa: E731
          lambda p, xs: featurize(fn, p, xs, proj, chunk_size=c))
    out[(what, "unchunked", None)] = eager(None)
    for c in args.chunks:
      jitted = traced(c)
      out[(what, "before", c)] = (lambda j: lambda: j(params, x))(jitted)
      out[(what, "after", c)] = eager(c)
      if what == "grads":
        single = (lambda xc: lambda: per_example_flat_grads(fn, params, xc))(x[:c])
      else:
        single = (lambda xc: lambda: featurize(fn, params, xc, proj))(x[:c])
      out[(what, "single", c)] = single
  return out


def run_model(name: str, args, clock: CompileClock) -> dict:
  apply_fn, params = model(name)
  num_params = sum(int(v.size) for v in jax.tree_util.tree_leaves(params))
  x = jnp.asarray(load_digits().x[:args.n])
  log(f"{name}: {num_params:,} params, N={args.n}, K={args.draws}, chunks {args.chunks}")
  configs = configurations(apply_fn, params, x, args)
  rows = {}
  for key, call in configs.items():
    before = clock.total
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - t0
    rows[key] = {"compile_s": clock.total - before, "first_call_s": first, "wall": [], "cpu": []}
    log(f"{name} {key}: first call {first:.1f} s (compile {rows[key]['compile_s']:.1f} s)")
  for r in range(args.reps):
    for key, call in configs.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(call())
      rows[key]["wall"].append(time.perf_counter() - t0)
      rows[key]["cpu"].append(time.process_time() - c0)
    log(f"{name}: rep {r + 1}/{args.reps} done, load {os.getloadavg()[0]:.2f}")
  for (_, path, c), row in rows.items():
    scale = args.n / c if path == "single" else 1.0  # N/C calls of C examples
    row["wall_s"] = scale * statistics.median(row["wall"])
    row["cpu_s"] = scale * statistics.median(row["cpu"])
  return {"num_params": num_params,
          "rows": [{"what": k[0], "path": k[1], "chunk": k[2], **v} for k, v in rows.items()]}


# ---------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------


def report(res: dict) -> str:
  env, a = res["env"], res["env"]["args"]
  lines = [f"{env['date']}, {env['cpus']} CPUs ({env['backend']}), load average "
           f"{env['load_before']} before / {env['load_after']} after, jax {env['jax']}; "
           f"N = {a['n']}, K = {a['draws']}, k = {a['dim']}, {a['reps']} interleaved reps "
           "(medians)."]
  for name, m in res["models"].items():
    lines += ["", f"**{name}** ({m['num_params']:,} parameters)", "",
              "| computation | path | chunk | wall s | CPU s | wall / unchunked "
              "| CPU / unchunked | wall / (one call of C) × N/C | compile s "
              "| compile / unchunked |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    ref = {r["what"]: r for r in m["rows"] if r["path"] == "unchunked"}
    single = {(r["what"], r["chunk"]): r for r in m["rows"] if r["path"] == "single"}
    order = {"unchunked": 0, "single": 1, "before": 2, "after": 3}
    for r in sorted(m["rows"], key=lambda r: (r["what"] != "grads", r["chunk"] or 0,
                                              order[r["path"]])):
      u = ref[r["what"]]
      what = {"grads": "per-example grads", "featurize": "featurize"}[r["what"]]
      path = {"single": "one call of C, × N/C"}.get(r["path"], r["path"])
      bold = "**" if r["path"] == "after" else ""
      vs_single = ""
      if r["path"] in ("before", "after"):
        vs_single = f"{r['wall_s'] / single[(r['what'], r['chunk'])]['wall_s']:.2f}x"
      lines.append(
          f"| {what} | {path} | {r['chunk'] or 'N'} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} "
          f"| {bold}{r['wall_s'] / u['wall_s']:.2f}x{bold} | {r['cpu_s'] / u['cpu_s']:.2f}x "
          f"| {vs_single} | {r['compile_s']:.1f} "
          f"| {bold}{r['compile_s'] / u['compile_s']:.2f}x{bold} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="conv4,unet", help="comma-separated: conv4, unet")
  p.add_argument("--what", default="grads,featurize", help="grads, featurize")
  p.add_argument("--n", type=int, default=256, help="examples N")
  p.add_argument("--draws", type=int, default=10, help="K fixed draws")
  p.add_argument("--chunks", type=ints, default=[64, 128], help="chunk sizes C < N")
  p.add_argument("--dim", type=int, default=4096, help="k of featurize")
  p.add_argument("--reps", type=int, default=3, help="timed calls per configuration")
  p.add_argument("--quick", action="store_true", help="N = 64, chunks 16,32, k = 1024, 2 reps")
  p.add_argument("--report-only", metavar="JSON", help="print the tables of a results file")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chunking.json"))
  args = p.parse_args(argv)
  if args.report_only:
    print(report(json.loads(pathlib.Path(args.report_only).read_text())))
    return 0
  if args.quick:
    args.n, args.chunks, args.dim, args.reps = 64, [16, 32], 1024, 2
  args.models, args.what = args.models.split(","), args.what.split(",")
  res = {"env": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "load_before": [round(v, 2) for v in os.getloadavg()],
                 "cpus": os.cpu_count(), "backend": jax.default_backend(),
                 "device": str(jax.devices()[0]), "jax": jax.__version__,
                 "machine": platform.machine(), "args": dict(vars(args))},
         "models": {}}
  t0 = time.perf_counter()
  clock = CompileClock()
  for name in args.models:
    res["models"][name] = run_model(name, args, clock)
  res["env"]["load_after"] = [round(v, 2) for v in os.getloadavg()]
  write_results(res, args.out, report, t0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
