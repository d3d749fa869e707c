"""The LDS and counterfactual drivers (``jattr lds``, ``jattr counterfactual``).

Both read an experiment config (JSON; see ``experiments/digits_lds/``):

    {
      "name": "digits_lds",
      "spec": {...},                      # jattr.bench.lds_cache.LdsSpec fields
      "cache_root": "runs/lds_cache",     # where caches live (keyed by the spec hash)
      "data_dir": null,                   # for fashion_mnist / cifar2 (else $JATTR_DATA)
      "strategy": "map", "chunk_size": null, "query_chunk": 64,
      "devices": null,                    # D: split examples / members over D devices
      "methods": ["random", "pixel_cosine"],
      "variants": {"trak_lora": {"method": "trak", "wrt": "^lora/"}},  # optional
      "bootstrap": {"num_resamples": 10000, "confidence": 0.95, "seed": 0},
      "results": "runs/digits_lds/results.json",
      "counterfactual": {"method": "pixel_cosine", "num_queries": 10,
                         "ks": [10, 50, 100], "random_seed": 0}
    }

``jattr lds`` builds (or reuses) the cache, scores every requested method with
validation-only selection (``jattr.eval.selection.select_and_evaluate``), prints the
table (LDS on test real queries and on generated queries, with intervals, and the
noise ceilings) and writes the results record. Any score matrices computed
elsewhere enter with ``--scores NAME=PATH.npz`` (keys ``validation``, ``test``,
``generated``, each τ [Q, N] over the cache's training set).

Methods are registered by name in ``jattr.bench.registry.METHODS``. ``variants``
names a method with options, e.g. TRAK w.r.t. the LoRA adapter only (``wrt``, a
``jattr.wrt`` regex), scored beside ``"trak"`` (all parameters) under its own name;
``--wrt REGEX`` (``run_lds(wrt=...)``) scores every requested gradient, influence
and unlearning method w.r.t. REGEX, reported as ``"NAME[wrt=REGEX]"``
(``jattr.bench.registry.method_factory``). Neither enters the cache's spec: the
cache (and its digest) is the same whatever is attributed with respect to what.

``devices`` (an int D, or ``"all"``) runs both drivers on a ``jattr.devices``
mesh of D devices: the cache's retrained members, featurization, curvature fits,
scoring and measurements are split over them (docs/devices.md); ``null`` runs on
one device. The numbers do not depend on D beyond float rounding, so D is not part
of the cache's spec either.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jattr import devices as jdevices
from jattr.bench import lds_cache
from jattr.bench.registry import METHODS, method_factory, scores_file_method
from jattr.eval.counterfactual import counterfactual as run_removal
from jattr.eval.selection import VALIDATION, MethodReport, results_table, select_and_evaluate
from jattr.io import atomic, checkpoint, guard
from jattr.progress import Progress
from jattr.train import STRATEGIES


@dataclasses.dataclass(frozen=True)
class BootstrapConfig:
  """The ``bootstrap`` entry of an experiment config (``select_and_evaluate``'s)."""

  num_resamples: int = 10000
  confidence: float = 0.95
  seed: int = 0

  def __post_init__(self):
    guard.check_fields(self)
    guard.at_least(self, "num_resamples", 1)
    if not 0 < self.confidence < 1:
      raise guard.ConfigError("confidence", f" = {self.confidence}: expected a number in "
                              f"(0, 1)", "BootstrapConfig")


@dataclasses.dataclass(frozen=True)
class CounterfactualConfig:
  """The ``counterfactual`` entry of an experiment config (``run_counterfactual``)."""

  method: str = "pixel_cosine"
  num_queries: int = 10
  ks: tuple[int, ...] = (10, 50, 100)
  random_seed: int = 0
  results: str | None = None

  def __post_init__(self):
    guard.check_fields(self)
    guard.one_of(self, "method", sorted(METHODS))
    guard.at_least(self, "num_queries", 1)
    if not self.ks or min(self.ks) < 1:
      raise guard.ConfigError("ks", f" = {guard.show(list(self.ks))}: expected a non-empty "
                              f"list of integers >= 1", "CounterfactualConfig")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """The keys of an experiment config (module docstring), and their types.

  ``load_config`` checks a file against these before anything runs; the drivers
  read the config as the dict it is.
  """

  spec: dict
  name: str | None = None
  comment: Any = None
  cache_root: str = "runs/lds_cache"
  data_dir: str | None = None
  strategy: str = "map"
  chunk_size: int | None = None
  query_chunk: int = 64
  devices: int | str | None = None
  methods: tuple[str, ...] | None = None
  variants: dict | None = None
  bootstrap: BootstrapConfig = BootstrapConfig()
  results: str | None = None
  counterfactual: CounterfactualConfig = CounterfactualConfig()

  def __post_init__(self):
    guard.check_fields(self)
    guard.one_of(self, "strategy", STRATEGIES)
    guard.at_least(self, "chunk_size", 1, optional=True)
    guard.at_least(self, "query_chunk", 1)
    if self.devices is not None and self.devices != "all" and (
        isinstance(self.devices, bool) or not isinstance(self.devices, int)
        or self.devices < 1):
      raise guard.ConfigError("devices", f" = {guard.show(self.devices)}: expected a positive "
                              "int, \"all\" or null", "ExperimentConfig")
    variants = self.variants or {}
    for name, v in variants.items():
      if name in METHODS:
        raise guard.ConfigError(f"variants.{name}", ": a variant may not reuse the name of a "
                                "method of jattr.bench.METHODS", "ExperimentConfig")
      if not isinstance(v, dict) or v.get("method") not in METHODS:
        raise guard.ConfigError(f"variants.{name}", f" = {guard.show(v)}: expected an object "
                                "whose 'method' is a method of jattr.bench.METHODS (and the "
                                "method's options, e.g. 'wrt')", "ExperimentConfig")
      try:
        method_factory(name, variants)
      except ValueError as e:
        raise guard.ConfigError(f"variants.{name}", f": {e}", "ExperimentConfig") from None
    known = [*METHODS, *variants]
    for i, m in enumerate(self.methods or ()):
      if m not in known:
        raise guard.ConfigError(f"methods[{i}]", f" = {guard.show(m)}: expected a method of "
                                f"jattr.bench.METHODS or of variants{guard.suggest(m, known)}",
                                "ExperimentConfig")


def load_config(path: str | pathlib.Path) -> dict:
  """Reads an experiment config and checks all of it before anything runs.

  Every key of the file (``ExperimentConfig``), of its ``spec`` (``LdsSpec``, whose
  ``model`` is the UNet ``build`` makes) and of the nested entries is checked for
  its type and range; an unknown key is refused with the nearest valid one.

  Raises:
    FileNotFoundError: no such file.
    ValueError (``jattr.io.guard.ConfigError`` for a key): naming the file, the key,
      the value and what is expected; invalid JSON with its line and column.
  """
  where = str(path)
  config = guard.read_json(path, "experiment config")
  guard.from_dict(ExperimentConfig, config, where=where)
  spec = lds_cache.LdsSpec.from_dict(config["spec"], where=where, key="spec")
  try:
    lds_cache.check_unet_model(spec)
  except guard.ConfigError as e:
    raise e.within("spec", where) from None
  return config


def build_cache(config: dict, *, progress: Progress | None = None) -> lds_cache.LdsCache:
  """Builds or loads the cache a config describes."""
  spec = lds_cache.LdsSpec.from_dict(config["spec"])
  return lds_cache.build(spec, config.get("cache_root", "runs/lds_cache"),
                         data_dir=config.get("data_dir"),
                         strategy=config.get("strategy", "map"),
                         chunk_size=config.get("chunk_size"),
                         query_chunk=config.get("query_chunk", 64), progress=progress)


def _method_list(config: dict, methods, scores: dict | None):
  names = list(methods if methods is not None else config.get("methods", list(METHODS)))
  variants = config.get("variants") or {}
  unknown = [m for m in names if m not in METHODS and m not in variants]
  if unknown:
    raise ValueError(f"unknown methods {unknown}; known: {sorted(METHODS)}"
                     + (f" and the config's variants {sorted(variants)}" if variants else "")
                     + " (or pass --scores NAME=PATH.npz)")
  return names, dict(scores or {})


def _on_config_mesh(driver):
  """Runs ``driver(config, ...)`` on the mesh of the config's ``devices``
  (``jattr.devices.mesh_of``; ``None``: one device)."""
  @functools.wraps(driver)
  def run(config: dict, **kwargs):
    with jdevices.use_mesh(jdevices.mesh_of(config.get("devices"))):
      return driver(config, **kwargs)
  return run


@_on_config_mesh
def run_lds(config: dict, *, methods=None, scores: dict | None = None,
            results_path: str | None = None, progress: Progress | None = None,
            out=None, wrt=None) -> dict:
  """Builds/reuses the cache, scores methods, prints the table, writes the record.

  Args:
    config: an experiment config (module docstring).
    methods: names from ``METHODS`` or the config's ``variants``; default: the
      config's ``methods``.
    scores: extra ``{name: path.npz}`` precomputed score matrices.
    results_path: where to write the JSON record (default: the config's ``results``).
    progress: ``jattr.progress`` callback for the cache build.
    out: where the table is printed (default: the current ``sys.stdout``).
    wrt: score the gradient, influence and unlearning methods w.r.t. this selector,
      each reported as ``"NAME[wrt=...]"`` (``jattr.bench.registry.method_factory``).

  Returns:
    The results record (also written as JSON).
  """
  out = sys.stdout if out is None else out
  names, scores = _method_list(config, methods, scores)
  t0 = time.perf_counter()
  cache = build_cache(config, progress=progress)
  boot = config.get("bootstrap", {})
  split_names = ("test",) + cache.spec.generated_splits  # + generated_g3 etc. if guided
  reported = [cache.splits[s] for s in split_names if cache.splits[s].y.shape[0]]
  reports, timing = [], {}
  for name in names:
    name, factory = method_factory(name, config.get("variants"), wrt)
    t1 = time.perf_counter()
    score_fn, grid = factory(cache)
    t2 = time.perf_counter()
    reports.append(select_and_evaluate(name, score_fn, grid, cache.masks,
                                       cache.splits[VALIDATION], reported, **boot))
    # setup: the method's once-per-model work (featurising or fitting the training
    # set, compile included); scoring: every grid point on validation (the points
    # a widened grid added included), then the chosen one on each reported split.
    timing[name] = {"setup_s": t2 - t1, "scoring_s": time.perf_counter() - t2,
                    "grid_size": len(reports[-1].grid),
                    **getattr(score_fn, "timing", {})}  # a method's own stage times
  for name, path in scores.items():
    score_fn, grid = scores_file_method(path)
    reports.append(select_and_evaluate(name, score_fn, grid, cache.masks,
                                       cache.splits[VALIDATION], reported, **boot))
  summary = lds_cache.cache_summary(cache)
  path = results_path or config.get("results")
  previous = _previous_reports(path, cache.spec.digest()) if path else {}
  merged = {**previous, **{r.method: r.to_dict() for r in reports}}
  table = (results_table([MethodReport.from_dict(d) for d in merged.values()], split_names)
           if merged else "")
  record = {"name": config.get("name"), "spec": cache.spec.to_dict(),
            "spec_digest": cache.spec.digest(), "cache": summary,
            "reports": list(merged.values()), "table": table,
            "timing": {**(_previous_timing(path) if previous else {}), **timing},
            "wall_s": time.perf_counter() - t0}
  if path:
    lds_cache.save_report(path, record)
  print(_header(cache, summary), file=out)
  print(results_table(reports, split_names) if reports else "", file=out)
  for name, tm in timing.items():
    print(f"  {name}: setup {tm['setup_s']:.1f} s, scoring {tm['scoring_s']:.1f} s "
          f"({tm['grid_size']} grid points on validation + the reported splits)", file=out)
  if path:
    kept = sorted(set(previous) - {r.method for r in reports})
    print(f"\nresults written to {path}" + (f" (with the earlier runs' {', '.join(kept)})"
                                            if kept else ""), file=out)
  return record


def _previous_reports(path, spec_digest: str) -> dict:
  """The reports already in a results record, by method (they accumulate across runs).

  Raises:
    ValueError: if the record belongs to another benchmark (spec digest).
  """
  path = pathlib.Path(path)
  if not path.exists():
    return {}
  try:
    record = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not a readable results record ({e}); pass another "
                     "--results or remove it") from None
  if record.get("spec_digest") != spec_digest:
    raise ValueError(f"{path} holds results of another benchmark (spec digest "
                     f"{str(record.get('spec_digest'))[:12]}…, this one {spec_digest[:12]}…); "
                     "pass another --results file")
  return {r["method"]: r for r in record.get("reports", [])}


def _previous_timing(path) -> dict:
  return json.loads(pathlib.Path(path).read_text()).get("timing", {})


def _header(cache: lds_cache.LdsCache, summary: dict) -> str:
  s = cache.spec
  lines = [f"LDS benchmark {s.dataset}: N={s.num_train}, M={s.num_subsets}, alpha={s.alpha}, "
           f"S={s.num_seeds} seeds/subset, K={s.num_draws} draws, "
           f"{s.train_config.num_steps} steps; cache {cache.directory}"]
  for name, c in summary["ceilings"].items():
    full = c["spearman_brown_full"]
    lines.append(f"  noise ceiling {name}: split-half {c['split_half']:.3f} "
                 f"[{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]; Spearman-Brown estimate for the "
                 f"{s.num_seeds}-seed average: " + ("-" if full is None else f"{full:.3f}"))
  lines.append(f"  cache build (summed over runs): {summary['build_wall_s']:.0f} s wall, "
               f"{summary['build_cpu_s']:.0f} s CPU")
  return "\n".join(lines) + "\n"


def chosen_hparams(path: str | pathlib.Path, method: str, spec_digest: str) -> dict:
  """The hyper-parameters a ``jattr lds`` record chose for ``method`` on validation.

  Lets ``jattr counterfactual`` skip re-running the validation grid of a costly
  method; the record must be of the same benchmark (spec digest).
  """
  record = json.loads(pathlib.Path(path).read_text())
  if record.get("spec_digest") != spec_digest:
    raise ValueError(f"{path} is a record of another benchmark (spec digest "
                     f"{str(record.get('spec_digest'))[:12]}, expected {spec_digest[:12]})")
  for r in record.get("reports", []):
    if r["method"] == method:
      if r.get("selected_on") != VALIDATION:
        raise ValueError(f"{path}: {method} was selected on {r.get('selected_on')!r}, not on "
                         f"{VALIDATION!r}")
      return dict(r["chosen"])
  raise ValueError(f"{path} has no report for {method!r}; it has "
                   f"{[r['method'] for r in record.get('reports', [])]}")


@_on_config_mesh
def run_counterfactual(config: dict, *, method: str | None = None, scores: str | None = None,
                       num_queries: int | None = None, ks=None, random_seed: int | None = None,
                       results_path: str | None = None, progress: Progress | None = None,
                       chosen_from: str | None = None, out=None, wrt=None) -> dict:
  """Counterfactual retraining for the first generated queries of a config's cache.

  The method's hyper-parameters (if any) are chosen by validation LDS, as for the
  table; the retrained models use the full-data model's recipe and seed
  (``jattr.eval.counterfactual``). ``method`` may be a config variant; ``wrt`` as
  in ``run_lds``.

  Returns:
    A record with the per-k summary (attributed vs random removal).
  """
  out = sys.stdout if out is None else out
  cf = dict(config.get("counterfactual", {}))
  method = method or cf.get("method", "pixel_cosine")
  num_queries = int(num_queries or cf.get("num_queries", 10))
  ks = tuple(ks or cf.get("ks", (10, 50, 100)))
  random_seed = int(cf.get("random_seed", 0) if random_seed is None else random_seed)
  cache = build_cache(config, progress=progress)
  gen = cache.splits["generated"]
  if gen.y.shape[0] < num_queries:
    raise ValueError(f"num_queries={num_queries} but the cache has only {gen.y.shape[0]} "
                     f"generated queries")
  if scores is not None:
    score_fn, grid = scores_file_method(scores)
    method = pathlib.Path(scores).stem
  else:
    method, factory = method_factory(method, config.get("variants"), wrt)
    score_fn, grid = factory(cache)
  if chosen_from is not None:
    chosen = chosen_hparams(chosen_from, method, cache.spec.digest())
  else:
    chosen = grid[0] if len(grid) == 1 else select_and_evaluate(
        method, score_fn, grid, cache.masks, cache.splits[VALIDATION], []).chosen
  tau = np.asarray(score_fn(chosen, gen.queries))[:num_queries]
  keys = jax.random.wrap_key_data(jnp.asarray(gen.queries.sample_keys[:num_queries]))
  image_shape = cache.train_images.shape[1:]
  safe = method.replace("/", "_")  # "trak[wrt=^lora/]"; the names without "/" unchanged
  tag = f"{safe}-q{num_queries}-k{'_'.join(map(str, ks))}-r{random_seed}"
  ckpt = cache.directory / "counterfactual" / tag
  # The random controls depend on (Q, ks, random_seed) only: trained once, shared.
  control = (cache.directory / "counterfactual" /
             f"random-control-q{num_queries}-k{'_'.join(map(str, ks))}-r{random_seed}")
  res = run_removal(cache.apply_fn, cache.init_fn, cache.schedule, cache.train_examples,
                    cache.train_config, tau,
                    lds_cache.make_sample_fn(cache.apply_fn, cache.spec, image_shape),
                    keys, gen.queries.images[:num_queries], seed=cache.spec.full_seed, ks=ks,
                    random_seed=random_seed, strategy=config.get("strategy", "map"),
                    chunk_size=config.get("chunk_size"),
                    checkpointer=checkpoint.Checkpointer(ckpt),
                    control_checkpointer=checkpoint.Checkpointer(control), progress=progress,
                    sample_cond=(None if gen.queries.cond is None
                                 else gen.queries.cond[:num_queries]),
                    **cache.train_options)
  rows = res.summary()
  record = {"name": config.get("name"), "spec_digest": cache.spec.digest(), "method": method,
            "chosen": chosen, "chosen_from": chosen_from, "num_queries": num_queries,
            "random_seed": random_seed,
            "summary": rows}
  path = results_path or cf.get("results") or str(ckpt) + ".json"
  lds_cache.save_report(path, record)
  atomic.write_npz(pathlib.Path(path).with_suffix(".npz"), l2=res.l2, ssim=res.ssim,
                   removed=res.removed, ks=np.asarray(ks))
  print(f"counterfactual {method} on {num_queries} generated queries "
        f"(attributed vs random removal)", file=out)
  print("| k | L2 attributed | L2 random | SSIM attributed | SSIM random | "
        "frac L2 larger |", file=out)
  print("|---|---|---|---|---|---|", file=out)
  for r in rows:
    print(f"| {r['k']} | {r['l2_attributed']:.3f} | {r['l2_random']:.3f} | "
          f"{r['ssim_attributed']:.3f} | {r['ssim_random']:.3f} | {r['frac_l2_larger']:.2f} |",
          file=out)
  print(f"\nresults written to {path}", file=out)
  return record


def with_overrides(config: dict, **overrides) -> dict:
  """A copy of ``config`` with the given top-level keys replaced (None: left as is)."""
  return {**config, **{k: v for k, v in overrides.items() if v is not None}}
