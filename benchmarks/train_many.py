"""Training throughput of ``train_many``'s strategies against separate runs.

The model is the digits UNet (``jattr.models.digits_config()``, 185k parameters)
trained with batch 64 on the 1797 sklearn digits; member m trains on a random half
of them with seed m. What is measured, each as the median over interleaved rounds:

- **strategies** (convs as the backend defaults them, im2col on CPU): for each M,
  the program ``train_many`` compiles for ``"vmap"``, ``"map"`` and ``"chunked"``,
  against the baseline of M separate runs, i.e. M calls of the jitted one-member
  segment that ``jattr.train.train`` runs (timed as one member's segment × M:
  the same program called M times).
- **conv**: the same with ``conv_impl="xla"`` (native convolutions) against
  ``"im2col"``, for the M in ``--conv-members``.
- **loop**: one member, one jitted step called from Python per step, against the
  same steps inside ``lax.scan`` (a training segment), each with native and
  im2col convs. This isolates the XLA:CPU problem that makes im2col the CPU
  default: native conv gradients are slow inside loop bodies.
- **auto**: the strategy ``train_many(strategy="auto")`` picks for M=8, checked
  against the fastest one measured here.

Every program is compiled ahead of time (``jit(...).lower(...).compile()``; the
compile time is reported separately and not counted in throughput), run once as a
warm-up, then timed for ``--repeats`` calls. A call runs ``--steps`` steps per
member, or fewer where M × steps would exceed ``--max-member-steps`` (so M=32 does
not dominate the run time). Within a value of M the variants take turns, one call
each per round (the order reversed every other round), so a change in machine load
hits them alike; a speedup is the median over rounds of the per-round ratio.

Each call is timed twice: wall clock, and the CPU time of this process (all XLA
threads). On a machine shared with other jobs the wall clock measures the load as
much as the program; CPU time barely depends on it, so its ratios are the stable
ones. On an idle machine wall time also rewards a program that keeps every core
busy, which CPU time does not show.

Throughput is reported per member-step (one optimizer step of one member): steps/s
per member (how fast each member's own step counter advances in that program) and
members/hour at ``--train-steps`` steps per member, both from the wall clock.

Usage:
  .venv/bin/python benchmarks/train_many.py --members 1,8,32 --steps 20 \\
      --strategies vmap,map,chunked --chunk 4

The default run took 24 min (15 CPU-min, a third of it compiling) on 2 CPU cores shared at load
average ~6; ``--members 1,8 --conv-strategies map --no-auto`` skips the slowest parts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jattr import diffusion
from jattr.data import load_digits
from jattr.models import digits_config, make_apply_fn, make_init_fn
from jattr.models.unet import resolve_conv_impl
# map_members is the member map train_many wraps around the segment: imported rather
# than copied so the benchmark times exactly the program train_many compiles.
from jattr.train import (TrainConfig, init_state, make_optimizer, make_segment_fn, make_step_fn,
                         make_subsets, map_members, member_keys, train_many)


@dataclasses.dataclass
class Variant:
  """One compiled program and its timings.

  Attributes:
    section: "strategies", "conv" or "loop".
    label: how the program runs (``separate``, ``vmap``, ``map``, ``chunked(4)``,
      ``python loop``, ``lax.scan``).
    conv: resolved conv implementation.
    members: M, the members one call trains.
    steps: optimizer steps per member in one timed call.
    run: runs one timed call (carrying the state forward), blocks until done and
      returns the losses of its last step.
    compile_s: wall seconds to trace, lower and compile (0 where the program was
      compiled for another M and reused).
    compile_cpu_s: the same in CPU seconds.
    warmup_loss: what the warm-up call returned.
    wall: wall seconds of each timed call.
    cpu: CPU seconds of this process during each timed call.
  """

  section: str
  label: str
  conv: str
  members: int
  steps: int
  run: Callable[[], jax.Array]
  compile_s: float = 0.0
  compile_cpu_s: float = 0.0
  warmup_loss: np.ndarray | None = None
  wall: list = dataclasses.field(default_factory=list)
  cpu: list = dataclasses.field(default_factory=list)

  @property
  def member_steps(self) -> int:
    return self.members * self.steps

  def per_member_step(self, clock: str = "wall", r: int | None = None) -> float:
    """Seconds per member-step on ``clock`` ("wall"/"cpu"): in round r, or the median."""
    times = getattr(self, clock)
    return (statistics.median(times) if r is None else times[r]) / self.member_steps


def _compiled(fn, args):
  """AOT-compiles ``jit(fn)`` for ``args``; returns (executable, wall s, CPU s)."""
  t0, c0 = time.perf_counter(), time.process_time()
  exe = jax.jit(fn).lower(*args).compile()
  return exe, time.perf_counter() - t0, time.process_time() - c0


def _carrying(exe, args, calls: int = 1):
  """A ``run()`` calling ``exe`` ``calls`` times, feeding the state back in.

  Calls are dispatched asynchronously and only the last is waited for, as a
  Python training loop would.
  """
  box = {"args": args}

  def run():
    a = box["args"]
    for _ in range(calls):
      state, loss = exe(*a)
      a = (state,) + tuple(a[1:])
    jax.block_until_ready((state, loss))
    box["args"] = a
    return loss[..., -1] if loss.ndim else loss
  return run


class Bench:
  """Builds the programs of one model/data setup, for either conv implementation."""

  def __init__(self, args):
    self.data = jnp.asarray(load_digits().x)
    self.n = int(self.data.shape[0])
    self.schedule = diffusion.linear(1000)
    self.config = TrainConfig(batch_size=args.batch_size)
    self.optimizer = make_optimizer(self.config)
    self.models = {}
    self._one_member = {}
    for impl in ("im2col", "xla"):
      cfg = dataclasses.replace(digits_config(), conv_impl=impl)
      self.models[impl] = (make_init_fn(cfg), make_apply_fn(cfg))

  def members(self, m: int, impl: str):
    """Initial stacked state, subset table and train keys of members 0..m-1."""
    init_fn, _ = self.models[impl]
    rng = np.random.default_rng(0)
    masks = np.stack([rng.permutation(self.n) < self.n // 2 for _ in range(m)])
    table = make_subsets(masks, self.n)
    keys = [member_keys(s) for s in range(m)]
    opt = self.optimizer
    state = jax.jit(jax.vmap(lambda k: init_state(init_fn(k), opt)))(
        jnp.stack([k[0] for k in keys]))
    return (state, jnp.asarray(table.indices), jnp.asarray(table.counts),
            jnp.stack([k[1] for k in keys]))

  def segment_fn(self, impl: str):
    return make_segment_fn(self.models[impl][1], self.schedule, self.config, self.optimizer)

  def one_member_args(self, impl: str):
    """(state, data, indices, count, train_key) of member 0, as ``train`` passes them."""
    state, idx, cnt, keys = self.members(1, impl)
    first = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
    return (first(state), self.data, idx[0], cnt[0], keys[0])

  def separate(self, section: str, impl: str, steps: int) -> Variant:
    """One member's jitted segment, as ``jattr.train.train`` compiles it.

    Compiled once per (impl, steps) and reused for every M, as M separate runs in
    one process would; later Variants report a compile time of 0.
    """
    args = self.one_member_args(impl)
    if (impl, steps) in self._one_member:
      exe, c, cc = self._one_member[impl, steps], 0.0, 0.0
    else:
      seg = self.segment_fn(impl)
      exe, c, cc = _compiled(lambda s, d, i, n, k: seg(s, d, i, n, k, steps), args)
      self._one_member[impl, steps] = exe
    return Variant(section, "separate", impl, 1, steps, _carrying(exe, args), c, cc)

  def many(self, section: str, impl: str, m: int, strategy: str, chunk: int | None,
           steps: int) -> Variant:
    """The program ``train_many`` compiles for this strategy (data closed over, as there)."""
    args = self.members(m, impl)
    seg, data = self.segment_fn(impl), self.data
    fn = lambda s, i, n, k: seg(s, data, i, n, k, steps)  # noqa: E731
    mapped = map_members(fn, strategy, chunk)
    exe, c, cc = _compiled(mapped, args)
    label = f"chunked({chunk})" if strategy == "chunked" else strategy
    return Variant(section, label, impl, m, steps, _carrying(exe, args), c, cc)

  def python_loop(self, impl: str, steps: int) -> Variant:
    """One jitted optimizer step (no loop inside), called ``steps`` times from Python.

    The step is ``make_step_fn``'s, the body of ``make_segment_fn``'s scan, so the only
    difference from the ``lax.scan`` variant is where the loop lives.
    """
    _, apply_fn = self.models[impl]
    step = make_step_fn(apply_fn, self.schedule, self.config, self.optimizer)

    args = self.one_member_args(impl)
    exe, c, cc = _compiled(step, args)
    return Variant("loop", "python loop", impl, 1, steps, _carrying(exe, args, calls=steps),
                   c, cc)


def _load() -> str:
  return "/".join(f"{x:.2f}" for x in os.getloadavg())


def time_group(variants: list[Variant], repeats: int, log) -> None:
  """A warm-up call of each variant, then ``repeats`` rounds of one call of each.

  Every other round runs the variants in reverse order, so none always follows
  the same neighbour.
  """
  for v in variants:
    v.warmup_loss = np.asarray(v.run())
  for r in range(repeats):
    for v in (variants if r % 2 == 0 else variants[::-1]):
      t0, c0 = time.perf_counter(), time.process_time()
      v.run()
      v.wall.append(time.perf_counter() - t0)
      v.cpu.append(time.process_time() - c0)
    log(f"  round {r + 1}/{repeats} done (load {_load()})")


def ratio(num: Variant, den: Variant, clock: str = "wall") -> float:
  """Median over rounds of (per-member-step time of ``num``) / (that of ``den``)."""
  rounds = min(len(num.wall), len(den.wall))
  return statistics.median(num.per_member_step(clock, r) / den.per_member_step(clock, r)
                           for r in range(rounds))


def _row(v: Variant, base: Variant, train_steps: int, m: int) -> dict:
  """One row of the strategies table; for the separate baseline ``m`` is the M it stands for."""
  per = v.per_member_step("wall")
  return {"M": m, "strategy": v.label, "conv": v.conv, "steps": v.steps,
          "compile_s": round(v.compile_s, 1), "compile_cpu_s": round(v.compile_cpu_s, 1),
          "ms_per_member_step": round(per * 1e3, 1),
          "cpu_ms_per_member_step": round(v.per_member_step("cpu") * 1e3, 1),
          "steps_per_s_per_member": round(v.steps / statistics.median(v.wall), 2),
          "members_per_hour": round(3600 / (per * train_steps), 2),
          "speedup_vs_separate": round(ratio(base, v, "wall"), 2),
          "cpu_speedup_vs_separate": round(ratio(base, v, "cpu"), 2),
          "wall_s": [round(t, 3) for t in v.wall], "cpu_s": [round(t, 3) for t in v.cpu]}


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
  lines = ["| " + " | ".join(h for h, _ in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    cells = []
    for _, key in columns:
      val = row.get(key)
      cells.append("–" if val is None else (f"{val:g}" if isinstance(val, float) else str(val)))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def check_auto(bench: Bench, impl: str, m: int, rows: list[dict]) -> dict:
  """Runs ``train_many(strategy="auto")`` for one step at M=m and compares its pick."""
  init_fn, apply_fn = bench.models[impl]
  rng = np.random.default_rng(0)
  masks = np.stack([rng.permutation(bench.n) < bench.n // 2 for _ in range(m)])
  cfg = dataclasses.replace(bench.config, num_steps=1, segment_steps=1)
  t0 = time.perf_counter()
  res = train_many(apply_fn, init_fn, bench.schedule, bench.data, masks, list(range(m)), cfg,
                   strategy="auto")
  seconds = time.perf_counter() - t0
  by = {r["strategy"]: r for r in rows if r["M"] == m}
  out = {"M": m, "picked": res.strategy, "seconds_incl_compiles": round(seconds, 1)}
  for clock, key in (("wall", "ms_per_member_step"), ("cpu", "cpu_ms_per_member_step")):
    # auto chooses between map and vmap only.
    cands = {s: by[s][key] for s in ("map", "vmap") if s in by}
    best = min(cands, key=cands.get) if cands else None
    overall = min(by, key=lambda s: by[s][key])
    out[clock] = {"fastest_of_map_vmap": best, "picked_is_fastest": res.strategy == best,
                  "picked_ms": by.get(res.strategy, {}).get(key),
                  "fastest_overall": overall, "fastest_overall_ms": by[overall][key]}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
  words = lambda s: [x for x in s.split(",") if x]  # noqa: E731
  p.add_argument("--members", type=ints, default=[1, 8, 32], help="values of M")
  p.add_argument("--strategies", type=words, default=["vmap", "map", "chunked"])
  p.add_argument("--chunk", type=ints, default=[4], help="chunk size(s) for 'chunked'")
  p.add_argument("--steps", type=int, default=20, help="optimizer steps per member per call")
  p.add_argument("--max-member-steps", type=int, default=160,
                 help="cap on M x steps per call: larger M run fewer steps (0 = no cap)")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per variant")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--train-steps", type=int, default=TrainConfig().num_steps,
                 help="steps per member assumed for members/hour")
  p.add_argument("--conv-members", type=ints, default=[1, 8],
                 help="M at which native ('xla') convs are compared with im2col")
  p.add_argument("--conv-strategies", type=words, default=["map", "vmap"],
                 help="strategies timed with the non-default conv at M > 1")
  p.add_argument("--xla-steps", type=int, default=2,
                 help="steps per member per call for native convs in a loop (slow on CPU); "
                      "times are per step, so they compare with --steps")
  p.add_argument("--no-loop", action="store_true", help="skip the python-loop vs scan section")
  p.add_argument("--auto-members", type=int, default=8,
                 help="M at which strategy='auto' is checked (must be in --members)")
  p.add_argument("--no-auto", action="store_true", help="skip the check of strategy='auto'")
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/train_many_<backend>.json)")
  args = p.parse_args(argv)

  t_start = time.perf_counter()
  backend = jax.default_backend()
  default_impl = resolve_conv_impl("auto")
  other_impl = "xla" if default_impl == "im2col" else "im2col"
  out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                      f"train_many_{backend}.json")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

  def steps_for(m: int, steps: int) -> int:
    if args.max_member_steps <= 0:
      return steps
    return max(1, min(steps, args.max_member_steps // m))

  load_start = _load()
  log(f"backend {backend} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, "
      f"default conv {default_impl}, load {load_start}")
  bench = Bench(args)
  all_m = set(args.members) | set(args.conv_members) | (set() if args.no_loop else {1})
  groups: dict[int, dict] = {}
  for m in sorted(all_m):
    t_group = time.perf_counter()
    vs: dict[str, Variant] = {}
    log(f"M={m}: compiling (load {_load()})")
    vs["separate"] = bench.separate("strategies", default_impl, args.steps)
    if m in args.members:
      for s in args.strategies:
        for c in (args.chunk if s == "chunked" else [None]):
          if s == "chunked" and c >= m:
            continue  # one chunk holding every member is "vmap"
          v = bench.many("strategies", default_impl, m, s, c, steps_for(m, args.steps))
          vs[v.label] = v
    other_steps = args.xla_steps if other_impl == "xla" else args.steps
    if m in args.conv_members or (m == 1 and not args.no_loop):
      vs[f"separate/{other_impl}"] = bench.separate("conv", other_impl, other_steps)
    if m in args.conv_members and m > 1:
      for s in args.conv_strategies:
        for c in (args.chunk if s == "chunked" else [None]):
          if s == "chunked" and c >= m:
            continue
          v = bench.many("conv", other_impl, m, s, c, steps_for(m, other_steps))
          vs[f"{v.label}/{other_impl}"] = v
    if m == 1 and not args.no_loop:
      for impl in ("im2col", "xla"):
        vs[f"python loop/{impl}"] = bench.python_loop(impl, args.steps)
    log(f"M={m}: compiled {len(vs)} programs in {time.perf_counter() - t_group:.0f} s; "
        f"timing {args.repeats} rounds")
    time_group(list(vs.values()), args.repeats, log)
    groups[m] = {"variants": vs, "load": _load(), "seconds": time.perf_counter() - t_group}

  strategy_rows, conv_rows, loop_rows = [], [], []
  fastest = {}
  for m in args.members:
    vs = groups[m]["variants"]
    rows = [_row(v, vs["separate"], args.train_steps, m)
            for v in vs.values() if v.section == "strategies"]
    strategy_rows += rows
    fastest[m] = {c: min(rows, key=lambda r, k=k: r[k])["strategy"]
                  for c, k in (("wall", "ms_per_member_step"), ("cpu", "cpu_ms_per_member_step"))}

  for m in args.conv_members:
    vs = groups[m]["variants"]
    for key, v in vs.items():
      label, _, impl = key.partition("/")
      if impl != other_impl or label == "python loop" or label not in vs:
        continue
      ref = vs[label]
      conv_rows.append({
          "M": m, "strategy": label, f"steps_{other_impl}": v.steps,
          f"steps_{default_impl}": ref.steps,
          f"ms_{other_impl}": round(v.per_member_step("wall") * 1e3, 1),
          f"ms_{default_impl}": round(ref.per_member_step("wall") * 1e3, 1),
          "ratio_wall": round(ratio(v, ref, "wall"), 2),
          f"cpu_ms_{other_impl}": round(v.per_member_step("cpu") * 1e3, 1),
          f"cpu_ms_{default_impl}": round(ref.per_member_step("cpu") * 1e3, 1),
          "ratio_cpu": round(ratio(v, ref, "cpu"), 2),
          f"compile_s_{other_impl}": round(v.compile_s, 1),
          f"compile_s_{default_impl}": round(ref.compile_s, 1)})

  if not args.no_loop:
    vs = groups[1]["variants"]
    for impl in ("xla", "im2col"):
      py = vs[f"python loop/{impl}"]
      scan = vs["separate" if impl == default_impl else f"separate/{impl}"]
      if py.steps == scan.steps:
        # The written-out step must be the segment's loop body: after the same steps
        # from the same state both give the same loss (up to fusion rounding).
        a, b = float(py.warmup_loss), float(scan.warmup_loss)
        log(f"check ({impl}): loss after {py.steps} steps, python loop {a:.6f}, "
            f"lax.scan {b:.6f}")
        if not np.isclose(a, b, rtol=1e-3):
          raise RuntimeError(f"python-loop step and lax.scan segment disagree: {a} vs {b}")
      loop_rows.append({
          "conv": impl, "steps_python_loop": py.steps, "steps_lax_scan": scan.steps,
          "ms_python_loop": round(py.per_member_step("wall") * 1e3, 1),
          "ms_lax_scan": round(scan.per_member_step("wall") * 1e3, 1),
          "ratio_wall": round(ratio(scan, py, "wall"), 2),
          "cpu_ms_python_loop": round(py.per_member_step("cpu") * 1e3, 1),
          "cpu_ms_lax_scan": round(scan.per_member_step("cpu") * 1e3, 1),
          "ratio_cpu": round(ratio(scan, py, "cpu"), 2),
          "compile_s_python_loop": round(py.compile_s, 1),
          "compile_s_lax_scan": round(scan.compile_s, 1)})

  auto = None
  if not args.no_auto and args.auto_members in args.members:
    log(f"auto: train_many(strategy='auto') at M={args.auto_members} (load {_load()})")
    auto = check_auto(bench, default_impl, args.auto_members, strategy_rows)

  total_s = time.perf_counter() - t_start
  load_end = _load()
  o, d = other_impl, default_impl
  print(f"\n## train_many throughput: digits UNet, batch {args.batch_size}, backend {backend}\n")
  print(f"{datetime.datetime.now().isoformat(timespec='minutes')}, {platform.node()}, "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}; load average (1/5/15 min) "
        f"{load_start} at start, {load_end} at end; script {total_s:.0f} s.\n")
  print(f"### Strategies (conv = {d}); members/h at {args.train_steps} steps per member\n")
  print(markdown(strategy_rows, [
      ("M", "M"), ("strategy", "strategy"), ("steps/call", "steps"), ("compile s", "compile_s"),
      ("wall ms / member-step", "ms_per_member_step"),
      ("CPU ms / member-step", "cpu_ms_per_member_step"),
      ("steps/s per member", "steps_per_s_per_member"), ("members/h", "members_per_hour"),
      ("× vs separate (wall)", "speedup_vs_separate"),
      ("× vs separate (CPU)", "cpu_speedup_vs_separate")]))
  print("\n`separate` = M separate runs, each one member's jitted lax.scan segment as "
        "`jattr.train.train` runs it (timed once, × M); its program compiles once per "
        "process (0 = reused).")
  if conv_rows:
    print(f"\n### Native conv vs im2col inside training loops ({o} / {d})\n")
    print(markdown(conv_rows, [
        ("M", "M"), ("strategy", "strategy"), (f"{o} wall ms", f"ms_{o}"),
        (f"{d} wall ms", f"ms_{d}"), (f"{o}/{d} wall", "ratio_wall"),
        (f"{o} CPU ms", f"cpu_ms_{o}"), (f"{d} CPU ms", f"cpu_ms_{d}"),
        (f"{o}/{d} CPU", "ratio_cpu"), (f"compile s {o}", f"compile_s_{o}"),
        (f"compile s {d}", f"compile_s_{d}")]))
    print(f"\n(ms per member-step; {o} calls run {other_steps} steps per member.)")
  if loop_rows:
    print("\n### One member: a jitted step called from Python vs the same steps in lax.scan\n")
    print(markdown(loop_rows, [
        ("conv", "conv"), ("python loop wall ms/step", "ms_python_loop"),
        ("lax.scan wall ms/step", "ms_lax_scan"), ("scan/python wall", "ratio_wall"),
        ("python loop CPU ms/step", "cpu_ms_python_loop"), ("lax.scan CPU ms/step",
                                                             "cpu_ms_lax_scan"),
        ("scan/python CPU", "ratio_cpu"), ("compile s (step)", "compile_s_python_loop"),
        ("compile s (scan)", "compile_s_lax_scan")]))
  print("\nFastest per M (wall / CPU): " + "; ".join(
      f"M={m}: {f['wall']} / {f['cpu']}" for m, f in fastest.items()))
  if auto is not None:
    parts = [f"{clock}: fastest of map/vmap {auto[clock]['fastest_of_map_vmap']!r} "
             f"({'OK' if auto[clock]['picked_is_fastest'] else 'MISMATCH'}), fastest overall "
             f"{auto[clock]['fastest_overall']!r} ({auto[clock]['fastest_overall_ms']} ms vs "
             f"{auto[clock]['picked_ms']} ms)" for clock in ("wall", "cpu")]
    print(f"auto at M={auto['M']}: picked {auto['picked']!r}; " + "; ".join(parts) +
          f"; train_many(auto) for 1 step took {auto['seconds_incl_compiles']} s.")

  result = {
      "benchmark": "train_many", "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "backend": backend, "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
      "host": platform.node(), "jax": jax.__version__, "default_conv": d,
      "load_avg_start": load_start, "load_avg_end": load_end, "total_seconds": round(total_s, 1),
      "args": vars(args),
      "groups": {str(m): {"load_avg_after": g["load"], "seconds": round(g["seconds"], 1)}
                 for m, g in groups.items()},
      "strategies": strategy_rows, "conv": conv_rows, "loop": loop_rows,
      "fastest": {str(m): f for m, f in fastest.items()}, "auto": auto}
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
  log(f"wrote {out_path}; total {total_s:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
