"""Featurization throughput against a batched gradient, and its peak memory.

Throughput (the default digits UNet, random-init parameters, digits images,
f = square_norm over K fixed draws, Rademacher projection to k):

  (a) ``jattr.features.featurize``: per-example gradients of f, each projected,
      φ_i = Pᵀ ∇_θ f(θ; x_i), C examples' gradients at a time, P regenerated from
      its seed once per chunk (timed on one chunk of C examples; N examples cost
      N/C chunks);
  (b) one batched gradient ∇_θ Σ_i f(θ; x_i) over N examples (what one training
      step costs), the target: (a) within 2x of (b) per example;
  (c) the naive baseline: vmap(grad) over the N examples, then G @ P with a dense
      Gaussian P [params, k] materialised once (its generation time is reported
      apart).

Then where (a)'s time goes at the best chunk size: per-example gradients alone,
the projection alone (``jattr.features.project``: regenerate P + matmul), the
matmul alone (the same block loop with one fixed block), and generating P alone
(every block from ``block_matrix``, summed so that none is optimised away; for
"rademacher" 32 signs per threefry word), which should be close to the
difference of the two before.

Memory: peak RSS (VmHWM from /proc/self/status) of ``store_featurize`` into a
fresh store, one subprocess per N, with ``cifar_30m_config()`` at 32x32 on CPU.

    python benchmarks/featurize.py --skip-memory   # throughput: 6 min wall on 2 cores at load 5.5
    python benchmarks/featurize.py --skip-throughput --mem-n 8,16,64 --mem-dim 4096 \
        --out benchmarks/results/featurize_memory.json  # memory at k = 4096: 29 min at load 6
    python benchmarks/featurize.py --quick    # scaled down

Prints markdown tables and writes benchmarks/results/featurize.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattr.diffusion import fixed_draws, measurements, schedules
from jattr.features import ProjectionConfig, featurize, project
from jattr.features.projection import block_matrix
from jattr.grads import flatten_per_example, per_example_flat_grads
from jattr.models import config_by_name, make_apply_fn, make_init_fn

from _bench import PeakSampler, ints, status_kb, write_results  # the script's own folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
T = 1000


def timed(fn, *args, repeats: int = 1) -> dict:
  """Seconds of ``jax.jit(fn)(*args)``, compile excluded: best of ``repeats`` runs.

  Returns:
    ``{"seconds": wall, "cpu_s": process CPU time (all threads) of that run,
    "compile_s": wall}``. On a shared machine the CPU time is the steadier
    measure of work; the wall time is what a user waits.
  """
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  best = None
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    run = (time.perf_counter() - t0, time.process_time() - c0)
    best = run if best is None or run[0] < best[0] else best
  return {"seconds": best[0], "cpu_s": best[1], "compile_s": compile_s}


def model(name: str):
  cfg = config_by_name(name)
  params = make_init_fn(cfg)(jax.random.key(0))
  num = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
  return cfg, make_apply_fn(cfg), params, num


def measurement(apply_fn, image_shape, num_draws):
  draws = fixed_draws(jax.random.key(0), num_draws, image_shape, T)
  return measurements.measurement_fn("square_norm", apply_fn, schedules.linear(T), draws)


def log(msg):
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------
# throughput
# ---------------------------------------------------------------------------------


def throughput(args) -> dict:
  from jattr.data import load_digits

  cfg, apply_fn, params, num_params = model("digits")
  x_all = load_digits().x
  n = args.n
  xs = jnp.asarray(x_all[:max([n] + args.chunks)])
  proj = ProjectionConfig(dim=args.dim, kind="rademacher", seed=0)
  log(f"digits UNet: {num_params:,} params, N={n}, k={args.dim}, chunks {args.chunks}")
  out = {"model": "digits", "num_params": num_params, "n": n, "dim": args.dim, "per_draws": {}}

  for num_draws in args.draws:
    fn = measurement(apply_fn, cfg.image_shape, num_draws)
    rows = {}

    def batched(p, x):
      return jax.grad(lambda q: jnp.sum(jax.vmap(fn, (None, 0))(q, x)))(p)

    rows["batched"] = {**timed(batched, params, xs[:n], repeats=3), "examples": n}
    log(f"K={num_draws} batched summed gradient over {n}: {rows['batched']['seconds']:.3f} s")
    chunks = args.chunks if num_draws == args.draws[0] else [out["best_chunk"]]
    for chunk in chunks:
      r = timed(lambda p, x: featurize(fn, p, x, proj, chunk_size=chunk), params, xs[:chunk])
      rows[f"featurize_c{chunk}"] = {**r, "examples": chunk}
      log(f"K={num_draws} featurize one chunk of {chunk}: {r['seconds']:.2f} s")
    if num_draws == args.draws[0]:
      out["best_chunk"] = max(args.chunks,
                              key=lambda cc: cc / rows[f"featurize_c{cc}"]["cpu_s"])
    best = out["best_chunk"]

    r = timed(lambda p, x: per_example_flat_grads(fn, p, x), params, xs[:best], repeats=2)
    rows["grads_only"] = {**r, "examples": best}
    log(f"K={num_draws} per-example grads of {best} (no projection): {r['seconds']:.2f} s")

    if args.naive:
      t0 = time.perf_counter()
      dense = (np.random.default_rng(0).standard_normal((num_params, args.dim), np.float32)
               / np.float32(np.sqrt(args.dim)))
      gen_s = time.perf_counter() - t0
      p_bytes = dense.nbytes
      dense = jax.device_put(dense)

      def naive(p, x, m):
        return flatten_per_example(jax.vmap(jax.grad(fn), (None, 0))(p, x)) @ m

      r = timed(naive, params, xs[:n], dense)
      rows["naive"] = {**r, "examples": n, "p_generation_s": gen_s, "p_bytes": p_bytes}
      del dense
      log(f"K={num_draws} naive vmap(grad) + dense G @ P over {n}: {r['seconds']:.2f} s "
          f"(P generated in {gen_s:.1f} s)")
    out["per_draws"][num_draws] = rows

  # The projection's parts, at the best chunk (independent of K).
  best = out["best_chunk"]
  g = jnp.asarray(np.random.default_rng(1).standard_normal((best, num_params), np.float32))
  parts = {"project": timed(lambda g: project(proj, g), g)}
  log(f"project alone ({best} x {num_params:,} -> {args.dim}): "
      f"{parts['project']['seconds']:.2f} s")
  bs = proj.block_size
  num_full, tail = divmod(num_params, bs)
  block = block_matrix(proj, 0)

  def matmul_only(g, block):
    def body(b, acc):
      return acc + jax.lax.dynamic_slice_in_dim(g, b * bs, bs, axis=1) @ block
    acc = jax.lax.fori_loop(0, num_full, body, jnp.zeros((g.shape[0], proj.dim), g.dtype))
    return acc + g[:, num_full * bs:] @ block[:tail]

  parts["matmul"] = timed(matmul_only, g, block, repeats=2)
  parts["regenerate_p"] = {k: parts["project"][k] - parts["matmul"][k]
                           for k in ("seconds", "cpu_s")}
  log(f"matmul alone: {parts['matmul']['seconds']:.2f} s -> P regeneration ~ "
      f"{parts['regenerate_p']['seconds']:.2f} s")

  def generate_only(acc):
    # Every block of P as `project` regenerates it, without the matmul.
    return jax.lax.fori_loop(0, num_full + 1, lambda b, a: a + block_matrix(proj, b), acc)

  parts["generate_p"] = timed(generate_only, jnp.zeros((bs, proj.dim), jnp.float32), repeats=2)
  log(f"generating all of P alone: {parts['generate_p']['seconds']:.2f} s")
  out["projection_parts"] = parts
  out["flops"] = {"projection_per_example": 2.0 * num_params * args.dim}
  return out


# ---------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------


def memory_worker(args) -> None:
  """One N in a fresh process: prints a JSON line with the peak RSS.

  Besides the final VmHWM, a thread samples VmHWM every second during the run, so
  one process also shows whether the peak still rises after the first chunks: the
  report gives VmHWM at 25/50/75/100% of the run's time.
  """
  from jattr.runs import store_featurize
  from jattr.io.feature_store import FeatureStore

  n = args.mem_worker
  cfg, apply_fn, params, num_params = model(args.mem_model)
  fn = measurement(apply_fn, cfg.image_shape, args.mem_draws)
  x = np.random.default_rng(0).uniform(-1, 1, (n, *cfg.image_shape)).astype(np.float32)
  proj = ProjectionConfig(dim=args.mem_dim, kind="rademacher", seed=0)
  jax.block_until_ready(params)
  hwm_init = status_kb("VmHWM")
  with tempfile.TemporaryDirectory() as d:
    store = FeatureStore.open(pathlib.Path(d) / "s", {"n": n}, n, proj.dim, args.mem_chunk)
    sampler = PeakSampler()
    t0 = time.perf_counter()
    sampler.start()
    store_featurize(fn, params, x, proj, store, chunk_size=args.mem_chunk)
    seconds = time.perf_counter() - t0
    sampler.stop()
    assert store.complete and np.all(np.isfinite(store.read()))
  print(json.dumps({"n": n, "chunks": store.num_chunks, "num_params": num_params,
                    "vmhwm_after_init_kb": hwm_init, "vmhwm_kb": status_kb("VmHWM"),
                    "vmrss_end_kb": status_kb("VmRSS"), "seconds": seconds,
                    "vmhwm_quartiles_kb": [sampler.peak_until(q * seconds, hwm_init)
                                           for q in (0.25, 0.5, 0.75, 1.0)]}))


def memory(args) -> list[dict]:
  rows = []
  for n in args.mem_n:
    cmd = [sys.executable, __file__, "--mem-worker", str(n), "--mem-model", args.mem_model,
           "--mem-chunk", str(args.mem_chunk), "--mem-dim", str(args.mem_dim),
           "--mem-draws", str(args.mem_draws)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
      raise RuntimeError(f"memory worker N={n} failed:\n{res.stderr[-3000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.perf_counter() - t0
    rows.append(row)
    log(f"memory N={n}: VmHWM {row['vmhwm_kb'] / 1024:.0f} MiB in {row['wall_s']:.0f} s")
  return rows


# ---------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------


def report(res: dict) -> str:
  lines = []
  env = res["env"]
  lines.append(f"{env['date']}, {env['cpus']} CPUs ({env['backend']}), load average "
               f"{env['load_before']} before / {env['load_after']} after, jax {env['jax']}")
  tp = res.get("throughput")
  if tp:
    lines += ["", f"Throughput: digits UNet ({tp['num_params']:,} params), f = square_norm, "
              f"k = {tp['dim']} (Rademacher), batched and naive over N = {tp['n']}.", "",
              "| K | method | examples timed | wall s | examples/s | wall vs (b) per example "
              "| CPU s | CPU vs (b) per example |",
              "|---|---|---|---|---|---|---|---|"]
    for num_draws, rows in tp["per_draws"].items():
      b = rows["batched"]
      for key, r in rows.items():
        name = {"batched": "batched summed gradient (b)",
                "grads_only": "per-example grads only, no projection",
                "naive": "naive: vmap(grad), then G @ P (P materialised)"}.get(
                    key, f"featurize (a), chunk {key.split('_c')[-1]}")
        per, per_cpu = r["seconds"] / r["examples"], r["cpu_s"] / r["examples"]
        lines.append(
            f"| {num_draws} | {name} | {r['examples']} | {r['seconds']:.3f} | {1 / per:.1f} | "
            f"{per / (b['seconds'] / b['examples']):.1f}x | {r['cpu_s']:.2f} | "
            f"{per_cpu / (b['cpu_s'] / b['examples']):.1f}x |")
      if "naive" in rows:
        lines.append(f"| {num_draws} | (naive: generating the dense P once, numpy) | | "
                     f"{rows['naive']['p_generation_s']:.1f} | | | | |")
    parts = tp["projection_parts"]
    best = tp["best_chunk"]
    lines += ["", f"Where the projection's time goes (one chunk of {best}, "
              f"{tp['num_params']:,} → {tp['dim']}):", "",
              "| part | wall s | CPU s | wall per example |", "|---|---|---|---|"]
    for key, label in (("project", "project (regenerate P + matmul)"),
                       ("matmul", "matmul only (one fixed block reused)"),
                       ("regenerate_p", "regenerate P (difference)"),
                       ("generate_p", "generate P alone (all blocks, no matmul)"),
                       ("packed_sign_what_if", "what-if: P's signs from packed bits")):
      if key in parts:
        r = parts[key]
        lines.append(f"| {label} | {r['seconds']:.2f} | {r['cpu_s']:.2f} | "
                     f"{r['seconds'] / best * 1e3:.1f} ms |")
  mem = res.get("memory")
  if mem:
    m = res["memory_setup"]
    lines += ["", f"Peak memory: store_featurize, {m['model']} ({mem[0]['num_params']:,} params) "
              f"at 32x32, chunk {m['chunk']}, K = {m['draws']}, k = {m['dim']}, one fresh "
              f"process per N.", "",
              "| N | chunks | VmHWM after init (MiB) | VmHWM at 25 / 50 / 75 % of the run (MiB) "
              "| VmHWM at end (MiB) | seconds |",
              "|---|---|---|---|---|---|"]
    for r in mem:
      q = " / ".join(f"{v / 1024:.0f}" for v in r.get("vmhwm_quartiles_kb", [])[:3])
      lines.append(f"| {r['n']} | {r['chunks']} | {r['vmhwm_after_init_kb'] / 1024:.0f} | {q} | "
                   f"{r['vmhwm_kb'] / 1024:.0f} | {r['seconds']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", type=int, default=256, help="examples of the batched/naive runs")
  p.add_argument("--chunks", type=ints, default=[128, 512], help="featurize chunk sizes")
  p.add_argument("--draws", type=ints, default=[10, 1], help="K values (first: all chunks)")
  p.add_argument("--dim", type=int, default=4096, help="k")
  p.add_argument("--no-naive", dest="naive", action="store_false")
  p.add_argument("--mem-n", type=ints, default=[8, 16, 32], help="N of the memory runs")
  p.add_argument("--mem-model", default="cifar_30m")
  p.add_argument("--mem-chunk", type=int, default=8)
  p.add_argument("--mem-dim", type=int, default=8, help="k of the memory runs")
  p.add_argument("--mem-draws", type=int, default=1)
  p.add_argument("--skip-throughput", action="store_true")
  p.add_argument("--skip-memory", action="store_true")
  p.add_argument("--quick", action="store_true",
                 help="scaled down: N=64, chunks 32,64, k=1024, memory N=4,8 of 'cifar', chunk 4")
  p.add_argument("--report-only", metavar="JSON", help="print the tables of a results file")
  p.add_argument("--mem-worker", type=int, help=argparse.SUPPRESS)
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "featurize.json"))
  args = p.parse_args(argv)
  if args.mem_worker is not None:
    memory_worker(args)
    return 0
  if args.report_only:
    print(report(json.loads(pathlib.Path(args.report_only).read_text())))
    return 0
  if args.quick:
    args.n, args.chunks, args.dim = 64, [32, 64], 1024
    args.mem_n, args.mem_model, args.mem_chunk = [4, 8], "cifar", 4

  res = {"env": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "load_before": [round(v, 2) for v in os.getloadavg()],
                 "cpus": os.cpu_count(), "backend": jax.default_backend(),
                 "device": str(jax.devices()[0]), "jax": jax.__version__,
                 "machine": platform.machine(), "args": {k: v for k, v in vars(args).items()}}}
  t0 = time.perf_counter()
  if not args.skip_throughput:
    res["throughput"] = throughput(args)
  if not args.skip_memory:
    res["memory_setup"] = {"model": args.mem_model, "chunk": args.mem_chunk,
                           "draws": args.mem_draws, "dim": args.mem_dim}
    res["memory"] = memory(args)
  res["env"]["load_after"] = [round(v, 2) for v in os.getloadavg()]
  write_results(res, args.out, report, t0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
