"""What the benchmark scripts share: /proc readings, a peak-memory sampler, writing results."""

from __future__ import annotations

import json
import pathlib
import threading
import time


def status_kb(field: str) -> int:
  """A field of /proc/self/status in kB (``"VmHWM"``: peak RSS, ``"VmRSS"``: RSS)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def ints(s: str) -> list[int]:
  """``"4,16,32"`` -> ``[4, 16, 32]`` (argparse type)."""
  return [int(v) for v in s.split(",") if v]


class PeakSampler:
  """Reads VmHWM every ``period_s`` in a thread, to show when during a run the peak rose.

  ``peak_until(t)``: the largest reading taken at most ``t`` seconds after ``start()``
  (``default`` when none was).
  """

  def __init__(self, period_s: float = 1.0):
    self.period_s, self.samples, self._stop = period_s, [], threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.wait(self.period_s):
      self.samples.append((time.perf_counter() - self.t0, status_kb("VmHWM")))

  def start(self) -> "PeakSampler":
    self.t0 = time.perf_counter()
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()

  def peak_until(self, t: float, default: int) -> int:
    return max([h for s, h in self.samples if s <= t] or [default])


def write_results(res: dict, out: str | pathlib.Path, report, t0: float) -> None:
  """Records the total time in ``res["env"]``, writes ``res`` as JSON to ``out`` and
  prints ``report(res)``."""
  res["env"]["total_s"] = time.perf_counter() - t0
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(res, indent=1, default=str))
  print(report(res))
  print(f"\n(total {res['env']['total_s']:.0f} s; results in {out})")


COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileClock:
  """Sums jax's compile-stage durations (tracing, lowering, backend compile)."""

  def __init__(self):
    import jax  # only the scripts that time JAX need it
    self.total = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    if event in COMPILE_EVENTS:
      self.total += duration


def log(msg: str) -> None:
  """A timestamped progress line on stderr."""
  import sys
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def interleaved(calls: dict, reps: int, clock: CompileClock | None = None,
                block=lambda out: out) -> dict:
  """Times ``calls`` (name -> zero-argument function), reps interleaved.

  Each call runs once first (its compile time from ``clock``, its first-call wall
  time), then ``reps`` rounds in which every call runs once, in order, each with
  wall and process CPU time (all threads). ``block(out)`` waits for a call's result
  (``jax.block_until_ready`` for JAX; the identity for eager torch).

  Returns:
    name -> ``{"compile_s", "first_call_s", "wall", "cpu", "wall_s", "cpu_s",
    "compile_in_reps_s"}``: ``wall_s`` / ``cpu_s`` the medians, and the compile time
    within each timed rep (non-zero when a call recompiles every time).
  """
  import os
  import statistics
  rows = {}
  for name, call in calls.items():
    before = clock.total if clock else 0.0
    t0 = time.perf_counter()
    block(call())
    first = time.perf_counter() - t0
    rows[name] = {"compile_s": (clock.total - before) if clock else None,
                  "first_call_s": first, "wall": [], "cpu": [], "compile_in_reps_s": []}
    log(f"{name}: first call {first:.2f} s"
        + (f" (compile {rows[name]['compile_s']:.1f} s)" if clock else ""))
  for r in range(reps):
    for name, call in calls.items():
      before = clock.total if clock else 0.0
      t0, c0 = time.perf_counter(), time.process_time()
      block(call())
      rows[name]["wall"].append(time.perf_counter() - t0)
      rows[name]["cpu"].append(time.process_time() - c0)
      rows[name]["compile_in_reps_s"].append((clock.total - before) if clock else 0.0)
    log(f"rep {r + 1}/{reps} done, load {os.getloadavg()[0]:.2f}")
  for row in rows.values():
    row["wall_s"] = statistics.median(row["wall"])
    row["cpu_s"] = statistics.median(row["cpu"])
  return rows


def env_record(args) -> dict:
  """Date, load, CPUs, the JAX backend and version, and the arguments."""
  import datetime
  import os
  import platform

  import jax
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
          "load_before": [round(v, 2) for v in os.getloadavg()],
          "cpus": os.cpu_count(), "backend": jax.default_backend(),
          "device": str(jax.devices()[0]), "jax": jax.__version__,
          "machine": platform.machine(), "args": dict(vars(args))}
