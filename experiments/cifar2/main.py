"""The CIFAR-2 protocol of the D-TRAK and K-FAC-influence papers, as one config-driven driver.

    python experiments/cifar2/main.py --config experiments/cifar2/config_cpu_smoke.json
    python experiments/cifar2/main.py --config experiments/cifar2/config_gpu.json
    python experiments/cifar2/main.py --config ... --stages cache         # the cache only
    python experiments/cifar2/main.py --config ... --stages lds --methods trak,kfac_expand

Run from the repository root. The protocol's stages, as the record names them:

    train           the full-data model (the model attributed)        \
    generate        the generated queries, sampled from it             } step ``cache``
    lds_cache       the M subset models x S seeds, and their measured  /
                    query losses y (the LDS targets)
    featurize       per method: TRAK / D-TRAK features of the          \
                    training set (setup of the gradient methods)        } step ``lds``
    curvature       per method: the K-FAC / EK-FAC / sketched-GGN fit   /
    score           per method: scores of the validation grid and of the reported splits
    counterfactual  remove each query's top-k attributed images, retrain, regenerate
                    (step ``counterfactual``)

The steps run in that order (``--stages`` selects them). The cache's stages are
``jattr.bench.build_cache`` (``jattr.bench.lds_cache.build``: train, generate, then
lds_cache), timed in the cache's ``timing.json`` and summed over resumptions.
Featurize, curvature and score are ``jattr.bench.run_lds``: one call for each run
of consecutive light methods, and one for each influence method, so that its N x P
training gradients are never alive beside another method's. The counterfactual is
``jattr.bench.run_counterfactual``. Everything is resumable as the harness is: a
second run with the same config reuses the cache and the counterfactual trainings
and trains nothing; the LDS reports accumulate in the config's ``results``.

This driver adds the stage times (wall and process CPU seconds) and writes them, the
LDS table and the counterfactual summary to ``--record`` (default: ``stages.json``
beside the config's ``results``). See docs/cifar2.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time

import jax
import numpy as np

from jattr import bench, devices, models
from jattr.bench import curvature_methods, drivers, gradient_methods, lds_cache
from jattr.cli.progress import TqdmProgress
from jattr.io import atomic

HERE = pathlib.Path(__file__).resolve().parent
STEPS = ("cache", "lds", "counterfactual")
"""What ``--stages`` selects (each a call of ``jattr.bench``)."""
STAGES = ("train", "generate", "featurize", "curvature", "lds_cache", "score",
          "counterfactual")
"""The protocol's stages, as the record names them."""
CACHE_STAGES = {"full_model": "train", "autoencoder": "train", "generate": "generate"}
"""``timing.json`` entries of the cache -> protocol stage (the rest: ``lds_cache``)."""
PRESETS = ("cifar", "cifar_30m")


def _clock() -> tuple[float, float]:
  return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> dict:
  wall, cpu = _clock()
  return {"wall_s": wall - start[0], "cpu_s": cpu - start[1]}


def parameter_count(preset: str, image_shape=(32, 32, 3), **overrides) -> int:
  """Parameters of a UNet preset (``jattr.models.config_by_name``), from shapes only."""
  config = models.config_by_name(preset, image_shape=tuple(image_shape), **overrides)
  shapes = jax.eval_shape(models.make_init_fn(config), jax.random.key(0))
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(shapes)))


def method_stage(name: str, variants: dict | None) -> str:
  """``featurize`` for the gradient-feature methods, ``curvature`` for the influence
  ones; ``score`` for the rest (baselines: their setup is part of scoring)."""
  base = (variants or {}).get(name, {}).get("method", name)
  if base in gradient_methods.LDS_VARIANTS:
    return "featurize"
  if base in curvature_methods.LDS_VARIANTS:
    return "curvature"
  return "score"


@contextlib.contextmanager
def timed_setups(marks: list):
  """Appends ``(name, wall, cpu)`` when each method's factory starts and ends.

  ``run_lds`` times a method's setup (its factory: featurization, a curvature fit)
  and its scoring on the wall clock only; wrapping the factories it resolves
  (``drivers.method_factory``) for the duration of the call gives the process CPU
  seconds of both as well.
  """
  original = drivers.method_factory

  def method_factory(name, variants=None, wrt=None):
    report_name, factory = original(name, variants, wrt)

    def timed(cache):
      marks.append((report_name, *_clock()))
      try:
        return factory(cache)
      finally:
        marks.append((report_name, *_clock()))

    return report_name, timed

  drivers.method_factory = method_factory
  try:
    yield
  finally:
    drivers.method_factory = original


def holds_gradients(name: str, variants: dict | None) -> bool:
  """True for the influence methods (``curvature_methods.influence_method``): they hold
  the N x P training gradients (97 GB at N = 5000 for the 4.86M-parameter ``cifar``
  preset), so each is run in a ``run_lds`` call of its own, with nothing of another
  method alive beside it."""
  base = (variants or {}).get(name, {}).get("method", name)
  factory = bench.METHODS.get(base)
  return getattr(factory, "func", factory) is curvature_methods.influence_method


def method_groups(names, variants: dict | None) -> list[list[str]]:
  """The methods in ``run_lds`` calls: consecutive light methods together, each
  influence method alone (``holds_gradients``)."""
  groups: list[list[str]] = []
  for name in names:
    if holds_gradients(name, variants) or not groups or holds_gradients(groups[-1][-1],
                                                                         variants):
      groups.append([name])
    else:
      groups[-1].append(name)
  return groups


def run_methods(config: dict, names: list[str], progress, out) -> dict:
  """One ``run_lds`` call for ``names``: each method's setup and scoring seconds, wall
  and CPU (``timed_setups``), and the harness's own timing entries."""
  marks: list = []
  start = _clock()
  with timed_setups(marks):
    record = bench.run_lds(config, methods=names, progress=progress, out=out)
  end = _clock()
  starts, ends = marks[0::2], marks[1::2]
  out_times = {}
  for i, name in enumerate(names):
    harness = dict(record["timing"].get(name, {}))
    extra = {k: v for k, v in harness.items() if k not in ("setup_s", "scoring_s")}
    if len(marks) == 2 * len(names) and starts[i][0] == name:
      # The factory's start and end: the setup; from its end to the next method's
      # start (or the end of the call): the scoring.
      (_, w0, c0), (_, w1, c1) = starts[i], ends[i]
      w2, c2 = (starts[i + 1][1:] if i + 1 < len(names) else end)
      times = {"setup_wall_s": w1 - w0, "setup_cpu_s": c1 - c0,
               "scoring_wall_s": w2 - w1, "scoring_cpu_s": c2 - c1}
    else:  # the harness resolved the factories otherwise: its wall times, no CPU
      times = {"setup_wall_s": harness.get("setup_s"),
               "scoring_wall_s": harness.get("scoring_s"),
               "setup_cpu_s": None, "scoring_cpu_s": None}
    out_times[name] = {**times, **extra, "run_lds_call": list(names)}
  first = out_times[names[0]]
  if marks:  # loading the cache, once per call: counted with the call's first method
    first["load_wall_s"], first["load_cpu_s"] = marks[0][1] - start[0], marks[0][2] - start[1]
  first["call_wall_s"], first["call_cpu_s"] = end[0] - start[0], end[1] - start[1]
  return out_times


def _timing_file(config: dict) -> pathlib.Path:
  spec = lds_cache.LdsSpec.from_dict(config["spec"])
  return lds_cache.cache_dir(spec, config.get("cache_root", "runs/lds_cache")) / "timing.json"


def _read_timing(config: dict) -> dict:
  path = _timing_file(config)
  return json.loads(path.read_text()) if path.exists() else {}


def cache_stages(timing: dict, before: dict) -> dict:
  """The cache's ``timing.json`` as protocol stages: the build's seconds (summed over
  every run that built part of it) and this run's share (0: reused)."""
  stages = {s: {"wall_s": 0.0, "cpu_s": 0.0, "this_run_wall_s": 0.0, "parts": []}
            for s in ("train", "generate", "lds_cache")}
  for part, t in timing.items():
    entry = stages[CACHE_STAGES.get(part, "lds_cache")]
    entry["wall_s"] += t["wall_s"]
    entry["cpu_s"] += t["cpu_s"]
    entry["this_run_wall_s"] += t["wall_s"] - before.get(part, {}).get("wall_s", 0.0)
    entry["parts"].append(part)
  for entry in stages.values():
    entry["reused"] = entry["this_run_wall_s"] == 0.0
  return stages


def method_stages(methods: dict) -> dict:
  """Featurize / curvature / score totals over the methods' records."""
  stages = {s: {"wall_s": 0.0, "cpu_s": 0.0, "methods": []}
            for s in ("featurize", "curvature", "score")}
  for name, m in methods.items():
    setup = stages[m["stage"]]
    setup["wall_s"] += m["setup_wall_s"] or 0.0
    setup["cpu_s"] += m["setup_cpu_s"] or 0.0
    setup["methods"].append(name)
    score = stages["score"]
    score["wall_s"] += m["scoring_wall_s"] or 0.0
    score["cpu_s"] += m["scoring_cpu_s"] or 0.0
    if name not in score["methods"]:
      score["methods"].append(name)
  return stages


def lds_summary(results_path: str | None) -> dict:
  """``{method: {split: mean LDS}}`` and the table of the harness's results record."""
  if not results_path or not pathlib.Path(results_path).exists():
    return {}
  record = json.loads(pathlib.Path(results_path).read_text())
  means = {r["method"]: {s: v["mean"] for s, v in r["results"].items()}
           for r in record.get("reports", [])}
  ceilings = next(({s: v["mean"] for s, v in r["ceilings"].items()}
                   for r in record.get("reports", [])), {})
  return {"results": str(results_path), "table": record.get("table", ""), "lds": means,
          "noise_ceiling": ceilings}


def _load_record(path: pathlib.Path, digest: str) -> dict:
  """The record of an earlier run of the same benchmark, or an empty one."""
  if path.exists():
    record = json.loads(path.read_text())
    if record.get("spec_digest") == digest:
      return record
    raise ValueError(f"{path} is the record of another benchmark (spec digest "
                     f"{str(record.get('spec_digest'))[:12]}, this one {digest[:12]}); pass "
                     "another --record")
  return {}


def format_stages(stages: dict) -> str:
  lines = ["| stage | wall s | CPU s | note |", "|---|---|---|---|"]
  for name in STAGES:
    s = stages.get(name)
    if s is None:
      lines.append(f"| {name} | - | - | not run |")
      continue
    if "parts" in s:
      note = ("reused (build time)" if s["reused"] else
              f"built this run ({s['this_run_wall_s']:.1f} s)") + f": {', '.join(s['parts'])}"
    elif "methods" in s:
      note = ", ".join(s["methods"]) or "no method"
    else:
      note = s.get("note", "")
    lines.append(f"| {name} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | {note} |")
  return "\n".join(lines)


def parse_stages(text: str) -> tuple[str, ...]:
  names = [s.strip() for s in text.split(",") if s.strip()]
  if names == ["all"]:
    return STEPS
  unknown = [s for s in names if s not in STEPS]
  if unknown or not names:
    raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(STEPS)} "
                                     f"(or all), got {text!r}")
  return tuple(s for s in STEPS if s in names)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(HERE / "config_cpu_smoke.json"))
  parser.add_argument("--stages", type=parse_stages, default=STEPS,
                      help=f"comma-separated steps to run, of {', '.join(STEPS)} (default: all)")
  parser.add_argument("--methods", default=None,
                      help="comma-separated methods to score (default: the config's)")
  parser.add_argument("--data-dir", default=None, help="overrides the config's data_dir")
  parser.add_argument("--cache-root", default=None, help="overrides the config's cache_root")
  parser.add_argument("--results", default=None, help="overrides the config's results")
  parser.add_argument("--record", default=None,
                      help="where the stage record goes (default: stages.json beside results)")
  parser.add_argument("--devices", type=int, default=None,
                      help="run jattr's data-parallel loops on a mesh of this many devices "
                           "(jattr.devices, docs/devices.md); default: the config's "
                           "\"devices\" (none: one device)")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)

  config = drivers.with_overrides(bench.load_config(args.config), data_dir=args.data_dir,
                                  cache_root=args.cache_root, results=args.results,
                                  devices=args.devices)
  spec = lds_cache.LdsSpec.from_dict(config["spec"])
  results = config.get("results") or "runs/cifar2/results.json"
  config["results"] = results
  record_path = pathlib.Path(args.record or pathlib.Path(results).with_name("stages.json"))
  record = _load_record(record_path, spec.digest())
  progress = None if args.no_progress else TqdmProgress()
  names = (args.methods.split(",") if args.methods else list(config.get("methods") or []))
  out = sys.stdout

  # the config's "devices" (--devices overrides it): the drivers read it, and the
  # cache stage (bench.build_cache, outside them) runs on the same mesh
  count = config.get("devices")
  mesh_context = devices.use_mesh(devices.mesh_of(count))

  start = _clock()
  before = _read_timing(config)
  methods = dict(record.get("methods", {}))
  stages = dict(record.get("stages", {}))
  with mesh_context:
    if "cache" in args.stages:
      t = _clock()
      cache = bench.build_cache(config, progress=progress)
      record.setdefault("calls", {})["build_cache"] = _since(t)
      num_params = int(sum(np.size(a) for a in jax.tree.leaves(cache.full_params)))
      record["model"] = {**config["spec"]["model"], "num_params": num_params,
                         "image_shape": list(cache.train_images.shape[1:])}
      del cache
    if "lds" in args.stages:
      for group in method_groups(names, config.get("variants")):
        print(f"\n== {', '.join(group)}", file=out)
        for name, times in run_methods(config, group, progress, out).items():
          methods[name] = {"stage": method_stage(name, config.get("variants")), **times}
    if "counterfactual" in args.stages:
      cf_method = config.get("counterfactual", {}).get("method", "pixel_cosine")
      chosen_from = results if cf_method in lds_summary(results).get("lds", {}) else None
      t = _clock()
      cf = bench.run_counterfactual(config, progress=progress, chosen_from=chosen_from, out=out)
      # A rerun reuses the retrained models' checkpoints: the earlier runs are kept.
      earlier = stages.get("counterfactual")
      previous = ([] if earlier is None else earlier.get("earlier_runs", []) +
                  [{"wall_s": earlier["wall_s"], "cpu_s": earlier["cpu_s"]}])
      stages["counterfactual"] = {**_since(t), "earlier_runs": previous,
                                  "note": f"{cf['method']}, {cf['num_queries']} queries, "
                                          f"k = {', '.join(str(r['k']) for r in cf['summary'])}"
                                          + (f"; {len(previous)} earlier run(s) kept in the "
                                             "record" if previous else "")}
      record["counterfactual"] = cf
  stages.update(cache_stages(_read_timing(config), before))
  stages.update(method_stages(methods))
  record.update({
      "name": config.get("name"), "config": str(args.config), "spec_digest": spec.digest(),
      "spec": spec.to_dict(), "stages_run": list(args.stages),
      "devices": {"backend": jax.default_backend(), "count": jax.device_count(),
                  "kind": jax.devices()[0].device_kind, "mesh": count},
      "presets": record.get("presets") or {p: parameter_count(p) for p in PRESETS},
      "stages": stages, "methods": methods, "lds": lds_summary(results),
      "wall_s": _since(start)["wall_s"], "cpu_s": _since(start)["cpu_s"]})
  record["runs"] = record.get("runs", []) + [{"stages": list(args.stages),
                                              "methods": names if "lds" in args.stages else [],
                                              "wall_s": record["wall_s"],
                                              "cpu_s": record["cpu_s"]}]
  record_path.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_json(record_path, record)
  print("\n" + (record["lds"].get("table") or "(no LDS table yet)"), file=out)
  print("\nstages (wall and process CPU seconds; the cache's summed over its builds)", file=out)
  print(format_stages(stages), file=out)
  print(f"\nthis run: {record['wall_s']:.1f} s wall, {record['cpu_s']:.1f} s CPU; record "
        f"written to {record_path}", file=out)
  return record


if __name__ == "__main__":
  main()
