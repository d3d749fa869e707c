"""Curvature fit time (K-FAC expand / reduce, EK-FAC) against TRAK featurization, and peak memory.

Time (the digits UNet, ``digits_config()``, 185k parameters, random-init parameters:
the cost does not depend on their values; the first ``--digits-n`` sklearn digits;
K = ``--digits-draws`` fixed draws):

  - ``kfac_expand``, ``kfac_reduce``: ``jattr.curvature.fit_kfac`` on the UNet with
    ``conv_impl="xla"`` (kfac-jax recognises only native convolutions), the default
    ``"ggn_curvature_prop"`` estimator, ``--batch`` examples (× K draws) per update;
  - ``kfac_expand_kfacjax``: ``kfac_expand`` with kfac-jax's own conv block in place
    of jattr's ``Conv2DExpand`` (same factors; the input factor from convolutions
    over the inputs instead of explicit patches), to show what the swap saves;
  - ``ekfac``: K-FAC (``--ekfac-basis``, default expand), then ``fit_ekfac``'s
    per-example pass (the run's default convs: im2col on CPU, as ``jattr
    fit-curvature`` does), ``--grad-batch`` examples per pass; both parts are timed;
  - ``trak``: for comparison, ``jattr.features.featurize`` of the same examples
    with f = ``measurement_fn("loss", ...)`` over the same K draws and a Rademacher
    projection to k = ``--dim``, ``--trak-chunk`` examples at a time: what one
    would pay instead of a curvature fit to score with TRAK;
  - ``sketch``: ``jattr.curvature.fit_sketched_ggn``, the GGN in the span of a sparse
    projection to k = ``--dim`` (``--sketch-nonzeros`` non-zeros per row), the default
    ``"ggn_curvature_prop"`` rows (S = ``--sketch-samples`` per pair), ``--grad-batch``
    examples per pass and ``--sketch-chunk`` rows per projected chunk, its k × k
    eigendecomposition included.

Every figure is the wall time of ONE call in a fresh process, compilation and
kfac-jax's graph matching included (they are part of what a user waits for), with
the process's CPU time beside it (on a shared machine wall time also counts other
jobs' use of the cores; CPU time does not, but it too rose 2-6x at load 5 here).

Memory: peak RSS (VmHWM from /proc/self/status) of a K-FAC fit of
``cifar_30m_config()`` (~30M parameters) at 32×32 on CPU, K = ``--mem-draws``,
``--mem-batch`` examples per update, random images, one fresh process per
(method, N). Each K-FAC update folds one batch into running sums, so the peak must
not grow with N. The same holds for ``sketch`` (``--mem-methods sketch``, S =
``--mem-sketch-samples``, ``--mem-grad-batch`` examples per pass, ``--mem-sketch-chunk``
rows per chunk, at most the pass's batch × K × S rows: chunk × P floats of rows plus
G_k, k × k, whatever N). An EK-FAC process runs K-FAC (``--ekfac-basis``) first, and
VmHWM is read after init, after that K-FAC stage and at the end, so one EK-FAC
process also gives the K-FAC row. The time of a fit is a fixed part (compilation,
kfac-jax's graph matching, and at this size the eigendecompositions of the
Kronecker factors, e.g. 5761 × 5761 for a 3×3 conv over 640 channels) plus a part
linear in N; a least-squares line over the N values separates them.
``--mem-warmup`` first fits one batch in the same process (its programs then come
from a process-local persistent compilation cache), which removes compilation
from the timed fit but not the eigendecompositions, so it doubles the fixed cost.
``--mem-allocators`` compares host-allocator settings in one run, interleaved per
N: ``trim`` (the library's default, ``jattr.host_memory.release_free_memory``
after every batch), ``no_trim`` (freed buffers stay in glibc's arenas: the peak
grew with the number of updates) and ``arena=M`` (``no_trim`` with
``MALLOC_ARENA_MAX=M``). ``--mem-sync-dispatch`` sets
``jax_cpu_enable_async_dispatch=False`` (each computation runs before the call returns).

    python benchmarks/curvature.py --skip-memory   # digits N = 32, 128: ~7 min near idle
    python benchmarks/curvature.py                 # + cifar_30m EK-FAC (and its K-FAC expand
                                                   #   stage) at N = 4, 16, 32, 64: ~10 min
                                                   #   more near idle, 4-10x that at load 5
    python benchmarks/curvature.py --full          # the full protocol: all 1797 digits,
                                                   # cifar_30m N = 64, 128, 256 (hours on CPU)

Prints markdown tables and writes benchmarks/results/curvature_cpu.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _bench import PeakSampler, ints, status_kb, write_results  # noqa: E402

METHODS = ("kfac_expand", "kfac_expand_kfacjax", "kfac_reduce", "ekfac", "trak", "sketch")
T = 1000


def log(msg: str) -> None:
  print(f"[curvature {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _strs(s: str) -> list[str]:
  out = [v for v in s.split(",") if v]
  bad = sorted(set(out) - set(METHODS))
  if bad:
    raise argparse.ArgumentTypeError(f"unknown methods {bad}; expected some of {METHODS}")
  return out


def _allocators(s: str) -> list[str]:
  out = [a.strip() for a in s.split(",") if a.strip()]
  bad = [a for a in out if a not in ("trim", "no_trim")
         and not (a.startswith("arena=") and a[6:].isdigit() and int(a[6:]) > 0)]
  if bad or not out:
    raise argparse.ArgumentTypeError(f"unknown allocator settings {bad}; expected trim, "
                                     "no_trim or arena=M")
  return out


def _uptime() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


# ---------------------------------------------------------------------------------
# one configuration, in a fresh process
# ---------------------------------------------------------------------------------


def worker(spec: dict) -> dict:
  """Runs one (model, method, N, K) configuration; returns timings and peak RSS."""
  import shutil
  import tempfile

  import jax

  if spec.get("sync_dispatch"):
    # Each jitted call returns only when its computation is done, so a Python loop
    # of calls cannot queue computations ahead of the one running.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  allocator = spec.get("allocator", "trim")
  if allocator != "trim":
    # The library returns freed heap pages to the OS after every batch
    # (jattr.host_memory); "no_trim" and "arena=N" turn that off to measure it.
    from jattr import host_memory

    host_memory.release_free_memory = lambda: False
  cache_dir = None
  if spec.get("warmup"):
    # The fits jit closures created per call; a persistent cache local to this
    # process lets the timed call reuse what the warm-up compiled.
    cache_dir = tempfile.mkdtemp(prefix="jattr_curvature_bench_")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

  from jattr.diffusion import fixed_draws, schedules
  from jattr.models import config_by_name, make_apply_fn, make_init_fn, num_params

  cfg = config_by_name(spec["model"])
  apply_fn = make_apply_fn(cfg)  # the backend's default convs (im2col on CPU)
  xla_apply = make_apply_fn(dataclasses.replace(cfg, conv_impl="xla"))
  params = make_init_fn(cfg)(jax.random.key(0))
  n, k = spec["n"], spec["draws"]
  if spec["model"] == "digits":
    from jattr.data import load_digits

    x = np.asarray(load_digits().x[:n], np.float32)
    if len(x) < n:
      raise ValueError(f"digits has {len(x)} images, asked for n = {n}")
  else:
    x = np.random.default_rng(0).uniform(-1, 1, (n, *cfg.image_shape)).astype(np.float32)
  x = jax.numpy.asarray(x)
  draws = fixed_draws(jax.random.key(1), k, cfg.image_shape, T)
  schedule = schedules.linear(T)
  jax.block_until_ready((params, x))
  out = {**spec, "num_params": num_params(params), "vmhwm_init_kb": status_kb("VmHWM")}
  # VmHWM every second, to see whether the peak still rises during a fit.
  sampler = PeakSampler().start()
  t_start = sampler.t0
  stages = out["stages"] = []

  def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    res = jax.block_until_ready(fn())
    stages.append((t0 - t_start, time.perf_counter() - t_start))
    return res, time.perf_counter() - t0, time.process_time() - c0

  if spec.get("warmup"):
    # One batch (one K-FAC update; for EK-FAC also its passes; for TRAK one chunk).
    w = min({"trak": spec["trak_chunk"], "sketch": spec.get("grad_batch")}.get(
        spec["method"], spec["batch"]), n)
    warm = _fit(spec, x[:w], params, apply_fn, xla_apply, schedule, draws, timed)
    out["warmup_n"] = w
    out["warmup_s"], out["warmup_cpu_s"] = warm["seconds"], warm["cpu_s"]
    out["vmhwm_warmup_kb"] = status_kb("VmHWM")
  out.update(_fit(spec, x, params, apply_fn, xla_apply, schedule, draws, timed))
  out["vmhwm_kb"] = status_kb("VmHWM")
  sampler.stop()
  # The timed stages' [start, end] (seconds since init) and VmHWM at 25/50/75/100 %
  # of each stage's time.
  out["vmhwm_stage_quartiles_kb"] = [
      [sampler.peak_until(a + q * (b - a), out["vmhwm_init_kb"]) for q in (0.25, 0.5, 0.75, 1.0)]
      for a, b in stages]
  if cache_dir:
    shutil.rmtree(cache_dir, ignore_errors=True)
  return out


def _fit(spec, x, params, apply_fn, xla_apply, schedule, draws, timed) -> dict:
  """One fit (or TRAK featurization) of x; returns its timings."""
  import jax

  from jattr.curvature import fit_ekfac, fit_kfac, fit_sketched_ggn
  from jattr.diffusion.measurements import measurement_fn
  from jattr.features import ProjectionConfig, featurize

  n, out, method = x.shape[0], {}, spec["method"]
  if method == "kfac_expand_kfacjax":
    # For comparison: kfac-jax's own expand conv block, whose input factor comes
    # from convolutions over the inputs (patches_moments) instead of the explicit
    # patches of jattr's Conv2DExpand (same result; much slower on XLA:CPU).
    import kfac_jax

    from jattr.curvature import kfac

    kfac.Conv2DExpand = kfac_jax.Conv2DTwoKroneckerFactored
  if method in ("kfac_expand", "kfac_expand_kfacjax", "kfac_reduce", "ekfac"):
    ws = spec["ekfac_basis"] if method == "ekfac" else (
        "reduce" if method == "kfac_reduce" else "expand")
    state, out["kfac_s"], out["kfac_cpu_s"] = timed(lambda: fit_kfac(
        xla_apply, params, schedule, x, draws, weight_sharing=ws, batch_size=spec["batch"]))
    kinds = [lay.kind for lay in state.layout]
    out["blocks"] = {"kronecker": kinds.count("kronecker"), "diagonal": kinds.count("diagonal")}
    out["seconds"], out["cpu_s"] = out["kfac_s"], out["kfac_cpu_s"]
    if method == "ekfac":
      out["vmhwm_kfac_kb"] = status_kb("VmHWM")
      _, out["ekfac_s"], out["ekfac_cpu_s"] = timed(lambda: fit_ekfac(
          apply_fn, params, schedule, x, draws, state, batch_size=spec["grad_batch"]))
      out["seconds"] += out["ekfac_s"]
      out["cpu_s"] += out["ekfac_cpu_s"]
  elif method == "trak":
    fn = measurement_fn("loss", apply_fn, schedule, draws)
    proj = ProjectionConfig(dim=spec["dim"], kind="rademacher", seed=0)
    phi, out["seconds"], out["cpu_s"] = timed(
        lambda: featurize(fn, params, x, proj, chunk_size=spec["trak_chunk"]))
    assert phi.shape == (n, spec["dim"]) and bool(jax.numpy.all(jax.numpy.isfinite(phi)))
  elif method == "sketch":
    proj = ProjectionConfig(dim=spec["dim"], kind="sparse", seed=0,
                            nonzeros=spec["sketch_nonzeros"])
    state, out["seconds"], out["cpu_s"] = timed(lambda: fit_sketched_ggn(
        apply_fn, params, schedule, x, draws, proj, estimation_mode="ggn_curvature_prop",
        num_samples=spec["sketch_samples"], batch_size=spec["grad_batch"],
        chunk_size=spec["sketch_chunk"]))
    assert state.eigvals.shape == (spec["dim"],) and bool(np.all(np.isfinite(state.eigvals)))
  else:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  return out


def run_config(spec: dict, timeout: float) -> dict:
  cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
  env = dict(os.environ)
  if spec.get("allocator", "trim").startswith("arena="):
    # glibc reads it when the process starts: at most this many malloc arenas.
    env["MALLOC_ARENA_MAX"] = spec["allocator"].split("=", 1)[1]
  t0 = time.perf_counter()
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout,
                         env=env)
  except subprocess.TimeoutExpired:
    log(f"{spec['model']} {spec['method']} N={spec['n']} {_alloc(spec)}: timed out after {timeout:.0f} s")
    return {**spec, "error": f"timed out after {timeout:.0f} s"}
  if res.returncode:
    log(f"{spec['model']} {spec['method']} N={spec['n']} failed:\n{res.stderr[-2000:]}")
    return {**spec, "error": res.stderr[-2000:]}
  row = json.loads(res.stdout.strip().splitlines()[-1])
  row["process_wall_s"] = time.perf_counter() - t0
  parts = "".join(f", {k} {row[k]:.1f} s" for k in ("warmup_s", "kfac_s", "ekfac_s") if k in row)
  log(f"{spec['model']} {spec['method']} N={spec['n']} K={spec['draws']} {_alloc(spec)}: "
      f"{row['seconds']:.1f} s (CPU {row['cpu_s']:.1f} s{parts}), "
      f"VmHWM {row['vmhwm_kb'] / 1024:.0f} MiB")
  return row


# ---------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------


def _ok(rows):
  return [r for r in rows if "error" not in r]


def _alloc(r: dict) -> str:
  """The host-allocator setting of a row (see ``--mem-allocators``)."""
  a = r.get("allocator", "trim")
  return {"trim": "[trim]", "no_trim": "[no trim]"}.get(
      a, f"[no trim, MALLOC_ARENA_MAX={a.split('=', 1)[-1]}]")


def _name(r: dict, s: dict) -> str:
  basis = s.get("ekfac_basis", "expand")
  alloc = f" {_alloc(r)}" if "allocator" in r and s.get("allocators", ["trim"]) != ["trim"] else ""
  return {"kfac_expand": f"K-FAC expand (batch {s['batch']})",
          "kfac_expand_kfacjax": f"K-FAC expand with kfac-jax's conv block (batch {s['batch']})",
          # rows of results files written before jattr's Conv2DExpand (2026-11-22):
          "kfac_expand_explicit": f"K-FAC expand, what-if: explicit patch moments (batch "
                                  f"{s['batch']})",
          "kfac_reduce": f"K-FAC reduce (batch {s['batch']})",
          "ekfac": f"EK-FAC = K-FAC {basis} + eigenvalue pass (batch {s['grad_batch']})",
          "trak": f"TRAK featurize, f = loss, k = {s['dim']} (chunk {s['trak_chunk']})",
          "sketch": f"sketched GGN, sparse k = {s['dim']} (s = {s.get('sketch_nonzeros')}), "
                    f"S = {s.get('sketch_samples')} (batch {s['grad_batch']}, chunk "
                    f"{s.get('sketch_chunk')})",
          }[r["method"]] + alloc


def report(res: dict) -> str:
  env = res["env"]
  lines = [f"{env['date']}, {env['cpus']} CPUs ({env['backend']}), jax {env['jax']}; "
           f"`uptime` before: {env['uptime_before']}; after: {env['uptime_after']}"]
  d = res.get("digits")
  if d:
    s = res["digits_setup"]
    ok = _ok(d)
    params = f"{ok[0]['num_params']:,}" if ok else "?"
    trak = {r["n"]: r for r in ok if r["method"] == "trak"}
    lines += ["", f"Fit time, digits UNet ({params} params), first N digits, K = {s['draws']} "
              "draws, one fresh process each, compilation and kfac-jax's graph matching "
              "included:", "",
              "| method | N | N·K pairs | wall s | CPU s | wall vs TRAK | blocks (Kronecker / "
              "diagonal) | VmHWM (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in d:
      if "error" in r:
        lines.append(f"| {_name(r, s)} | {r['n']} | | failed: "
                     f"{r['error'].strip().splitlines()[-1][:80]} | | | | |")
        continue
      blocks = (f"{r['blocks']['kronecker']} / {r['blocks']['diagonal']}" if "blocks" in r
                else "")
      ratio = (f"{r['seconds'] / trak[r['n']]['seconds']:.1f}x" if r["n"] in trak else "")
      lines.append(f"| {_name(r, s)} | {r['n']} | {r['n'] * r['draws']:,} | {r['seconds']:.1f} | "
                   f"{r['cpu_s']:.1f} | {ratio} | {blocks} | {r['vmhwm_kb'] / 1024:.0f} |")
      if r["method"] == "ekfac":
        lines.append(f"| … of which K-FAC {s.get('ekfac_basis', 'expand')} | | | "
                     f"{r['kfac_s']:.1f} | {r['kfac_cpu_s']:.1f} | | | |")
        lines.append(f"| … of which the eigenvalue pass | | | {r['ekfac_s']:.1f} | "
                     f"{r['ekfac_cpu_s']:.1f} | | | |")
    lines += _slope_lines(_slopes(d))
  m = res.get("memory")
  if m:
    s = res["memory_setup"]
    ok = _ok(m)
    params = f"{ok[0]['num_params']:,}" if ok else "?"
    warm = any("warmup_s" in r for r in ok)
    sync = ", synchronous dispatch" if s.get("sync_dispatch") else ""
    lines += ["", f"Peak memory, {s['model']} ({params} params) at 32×32 on CPU, random images, "
              f"K = {s['draws']}, batch {s['batch']} (EK-FAC pass: {s['grad_batch']}){sync}, "
              "one fresh process per row" + (
                  "; each first fits one batch (the warm-up: compilation, kfac-jax's graph "
                  "matching, one update), then the timed fit of all N reuses the compiled "
                  "programs:" if warm else ", compilation included:"), ""]
    if warm:
      lines += ["| method | N | warm-up wall s (1 batch) | warm-up CPU s | fit wall s | fit CPU s "
                "| VmHWM after init (MiB) | after warm-up (MiB) | at end (MiB) |",
                "|---|---|---|---|---|---|---|---|---|"]
    else:
      lines += ["| method | N | wall s | CPU s | VmHWM after init (MiB) | VmHWM at 25 / 50 / 75 % "
                "of the stage (MiB) | VmHWM at end (MiB) |",
                "|---|---|---|---|---|---|---|"]
    for r in m:
      if "error" in r:
        lines.append(f"| {_name(r, s)} | {r['n']} | failed: "
                     f"{r['error'].strip().splitlines()[-1][:80]} |" + " |" * (6 if warm else 4))
        continue
      if warm:
        lines.append(f"| {_name(r, s)} | {r['n']} | {r['warmup_s']:.1f} | {r['warmup_cpu_s']:.1f} "
                     f"| {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['vmhwm_init_kb'] / 1024:.0f} | "
                     f"{r['vmhwm_warmup_kb'] / 1024:.0f} | {r['vmhwm_kb'] / 1024:.0f} |")
      else:
        # Timed stages in order: [K-FAC, eigenvalue pass] for EK-FAC, [fit] otherwise.
        quart = [" / ".join(f"{v / 1024:.0f}" for v in stage[:3])
                 for stage in r.get("vmhwm_stage_quartiles_kb", [])]
        quart = ["", ""] + quart
        if "vmhwm_kfac_kb" in r:
          lines.append(f"| … its K-FAC {s.get('ekfac_basis', 'expand')} stage (batch "
                       f"{s['batch']}){' ' + _alloc(r) if len(s.get('allocators', [])) > 1 else ''} "
                       f"| {r['n']} | {r['kfac_s']:.1f} | {r['kfac_cpu_s']:.1f} | "
                       f"{r['vmhwm_init_kb'] / 1024:.0f} | {quart[-2]} | "
                       f"{r['vmhwm_kfac_kb'] / 1024:.0f} |")
        lines.append(f"| {_name(r, s)} | {r['n']} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['vmhwm_init_kb'] / 1024:.0f} | {quart[-1]} | "
                     f"{r['vmhwm_kb'] / 1024:.0f} |")
    lines += _slope_lines(_slopes(m))
  return "\n".join(lines)


def _slope_lines(slopes: dict) -> list[str]:
  lines = [""] if slopes else []
  for method, sl in slopes.items():
    lines.append(
        f"- {method}, least squares over N = {', '.join(map(str, sl['ns']))}: "
        f"{sl['ms_per_example']:.0f} ms wall ({sl['cpu_ms_per_example']:.0f} ms CPU) per example "
        f"+ {sl['intercept_s']:.1f} s fixed; peak RSS {sl['vmhwm_mib_per_example']:+.2f} MiB per "
        f"example (N {sl['ns'][0]} → {sl['ns'][-1]}: {sl['vmhwm_change_mib']:+.0f} MiB)")
  return lines


def _slopes(rows: list[dict]) -> dict:
  """Per method: least-squares lines of the timed seconds and of VmHWM against N."""
  out = {}
  stages = [{**r, "method": f"{r['method']}: its K-FAC stage", "seconds": r["kfac_s"],
             "cpu_s": r["kfac_cpu_s"], "vmhwm_kb": r["vmhwm_kfac_kb"]}
            for r in _ok(rows) if "vmhwm_kfac_kb" in r]
  rows = list(rows) + stages

  def key(r):  # one line per method and host-allocator setting
    return f"{r['method']} {_alloc(r)}" if "allocator" in r else r["method"]

  for method in dict.fromkeys(key(r) for r in _ok(rows)):
    rs = sorted((r for r in _ok(rows) if key(r) == method), key=lambda r: r["n"])
    if len(rs) >= 2 and rs[-1]["n"] > rs[0]["n"]:
      ns = np.array([r["n"] for r in rs], float)
      wall, intercept = np.polyfit(ns, [r["seconds"] for r in rs], 1)
      cpu, _ = np.polyfit(ns, [r["cpu_s"] for r in rs], 1)
      mem, _ = np.polyfit(ns, [r["vmhwm_kb"] / 1024 for r in rs], 1)
      out[method] = {"ns": [r["n"] for r in rs], "ms_per_example": 1e3 * wall,
                     "cpu_ms_per_example": 1e3 * cpu, "intercept_s": intercept,
                     "vmhwm_mib_per_example": mem,
                     "vmhwm_change_mib": (rs[-1]["vmhwm_kb"] - rs[0]["vmhwm_kb"]) / 1024}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--digits-n", type=ints, default=[32, 128],
                 help="digits examples, comma-separated (all: 1797)")
  p.add_argument("--digits-draws", type=int, default=10, help="K for digits")
  p.add_argument("--digits-methods", type=_strs, default=list(METHODS))
  p.add_argument("--batch", type=int, default=16, help="examples per K-FAC update (digits)")
  p.add_argument("--grad-batch", type=int, default=16,
                 help="examples per EK-FAC eigenvalue pass (digits)")
  p.add_argument("--ekfac-basis", choices=("expand", "reduce"), default="expand",
                 help="K-FAC whose eigenbasis EK-FAC refits (expand: the fit-curvature "
                      "default)")
  p.add_argument("--dim", type=int, default=4096, help="TRAK projection dimension k")
  p.add_argument("--trak-chunk", type=int, default=32, help="TRAK featurize chunk")
  p.add_argument("--sketch-samples", type=int, default=16,
                 help="S, sampled GGN rows per (example, draw) pair of the sketch (digits)")
  p.add_argument("--sketch-chunk", type=int, default=256,
                 help="rows per projected chunk of the sketch (digits)")
  p.add_argument("--sketch-nonzeros", type=int, default=4,
                 help="non-zeros per row of the sketch's sparse projection")
  p.add_argument("--mem-n", type=ints, default=[4, 16, 32, 64], help="N of the cifar_30m runs")
  p.add_argument("--mem-model", default="cifar_30m")
  p.add_argument("--mem-methods", type=_strs, default=["ekfac"],
                 help="ekfac also reports its K-FAC stage (the --ekfac-basis fit)")
  p.add_argument("--mem-draws", type=int, default=1)
  p.add_argument("--mem-batch", type=int, default=2)
  p.add_argument("--mem-grad-batch", type=int, default=1)
  p.add_argument("--mem-sketch-samples", type=int, default=1,
                 help="S of the sketch in the memory runs")
  p.add_argument("--mem-sketch-chunk", type=int, default=4,
                 help="rows per projected chunk of the sketch in the memory runs (chunk × P "
                      "floats: 4 × 30M × 4 B ≈ 0.5 GiB)")
  p.add_argument("--mem-sync-dispatch", action="store_true",
                 help="jax_cpu_enable_async_dispatch=False in the memory runs (a diagnostic)")
  p.add_argument("--mem-allocators", type=_allocators, default=["trim"],
                 help="host-allocator settings of the memory runs, interleaved per N: trim "
                      "(the library's default: freed heap pages go back to the OS after every "
                      "batch), no_trim (they stay in glibc's arenas), arena=M (no_trim with "
                      "MALLOC_ARENA_MAX=M)")
  p.add_argument("--mem-warmup", action="store_true",
                 help="fit one batch before the timed fit in each memory process (see above)")
  p.add_argument("--digits-warmup", action="store_true",
                 help="warm up the digits runs too (default: compilation included, what a "
                      "user waits for)")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
  p.add_argument("--skip-digits", action="store_true")
  p.add_argument("--skip-memory", action="store_true")
  p.add_argument("--full", action="store_true",
                 help="all 1797 digits, cifar_30m N = 64,128,256 with K-FAC expand/reduce and "
                      "EK-FAC (hours on 2 CPU cores)")
  p.add_argument("--report-only", metavar="JSON", help="print the tables of a results file")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curvature_cpu.json"))
  args = p.parse_args(argv)
  if args.worker is not None:
    print(json.dumps(worker(json.loads(args.worker))))
    return 0
  if args.report_only:
    print(report(json.loads(pathlib.Path(args.report_only).read_text())))
    return 0
  if args.full:
    args.digits_n, args.mem_n = [1797], [64, 128, 256]
    args.mem_methods = ["kfac_expand", "kfac_reduce", "ekfac"]
    args.ekfac_basis = "expand"
    args.timeout = max(args.timeout, 6 * 3600)

  import jax

  res = {"env": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "uptime_before": _uptime(), "cpus": os.cpu_count(),
                 "backend": jax.default_backend(), "device": str(jax.devices()[0]),
                 "jax": jax.__version__, "machine": platform.machine(),
                 "args": {k: v for k, v in vars(args).items()}}}
  t0 = time.perf_counter()
  if not args.skip_digits:
    setup = {"model": "digits", "draws": args.digits_draws,
             "batch": args.batch, "grad_batch": args.grad_batch, "dim": args.dim,
             "trak_chunk": args.trak_chunk, "ekfac_basis": args.ekfac_basis,
             "warmup": args.digits_warmup, "sketch_samples": args.sketch_samples,
             "sketch_chunk": args.sketch_chunk, "sketch_nonzeros": args.sketch_nonzeros}
    res["digits_setup"] = setup
    res["digits"] = [run_config({**setup, "method": m, "n": n}, args.timeout)
                     for m in args.digits_methods for n in args.digits_n]
    res["digits_slopes"] = _slopes(res["digits"])
  if not args.skip_memory:
    setup = {"model": args.mem_model, "draws": args.mem_draws, "batch": args.mem_batch,
             "grad_batch": args.mem_grad_batch, "dim": args.dim, "trak_chunk": args.mem_batch,
             "ekfac_basis": args.ekfac_basis, "warmup": args.mem_warmup,
             "sync_dispatch": args.mem_sync_dispatch, "allocators": args.mem_allocators,
             "sketch_samples": args.mem_sketch_samples, "sketch_chunk": args.mem_sketch_chunk,
             "sketch_nonzeros": args.sketch_nonzeros}
    res["memory_setup"] = setup
    res["memory"] = [run_config({**setup, "method": m, "n": n, "allocator": a}, args.timeout)
                     for m in args.mem_methods for n in args.mem_n
                     for a in args.mem_allocators]
    res["memory_slopes"] = _slopes(res["memory"])
  res["env"]["uptime_after"] = _uptime()
  write_results(res, args.out, report, t0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
