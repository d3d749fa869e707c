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
