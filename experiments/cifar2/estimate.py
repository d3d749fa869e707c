"""Stage-time ESTIMATES of the CIFAR-2 protocol (config_gpu.json) on one and on 8 GPUs.

    python experiments/cifar2/estimate.py                        # cifar and cifar_30m
    python experiments/cifar2/estimate.py --presets cifar --skip-relative

Nothing here runs the protocol. For each UNet preset the script

1. counts the FLOPs and bytes of one step of each full-size program with XLA's
   compiled cost analysis on this CPU (``jax.jit(f).lower(*args).compile()
   .cost_analysis()``; compiled, never executed at full size): a training step at
   batch 128 at 32x32, the forward pass, the per-example loss gradient of one
   (example, draw) pair, and one block of the random projection at k = 4096 and
   32,768 (regeneration of P included);
2. times, on this CPU at full size (``--relative-preset``) but for a few (example,
   draw) pairs, a K-FAC factor update, an EK-FAC eigenvalue-correction update and a
   sketched-GGN update per pair relative to the per-example gradient of a pair, and
   turns the ratios into FLOPs and bytes (``--skip-relative``: the ``DEFAULT_RATIOS``);
3. multiplies by the protocol's counts (from the config: N, M, S, steps, batch, K,
   queries, sampler steps, the methods' K and k, the counterfactual's retrainings);
4. converts to hours with a roofline per stage, t = max(FLOPs / (f_c x peak),
   bytes / (f_m x bandwidth)), at the GPU peaks and achieved fractions of
   ``SCENARIOS``, on one GPU and on 8 (``PARALLEL``: how each stage splits).

Writes the JSON to ``--out`` (benchmarks/results/cifar2_estimate.json) and prints the
table of docs/cifar2.md. Every number is an estimate under the stated assumptions,
not a measurement: no GPU was available.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import pathlib
import platform
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jattr import bench, models
from jattr.bench import gradient_methods
from jattr.curvature import fit_ekfac, fit_kfac
from jattr.curvature.sketch import sketch_gram
from jattr.diffusion import draws as draws_lib
from jattr.diffusion.measurements import measurement_fn
from jattr.diffusion.schedules import Schedule
from jattr.features.projection import ProjectionConfig, block_matrix
from jattr.grads.per_example import per_example_grads
from jattr.io import atomic
from jattr.train import TrainConfig, init_state, make_optimizer
from jattr.train.loop import make_step_fn

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]

GPUS = {
    "H100 SXM": {"tf32_tflops": 494.7, "bf16_tflops": 989.4, "hbm_tb_s": 3.35,
                 "memory_gb": 80},
    "A100 SXM 80GB": {"tf32_tflops": 156.0, "bf16_tflops": 312.0, "hbm_tb_s": 2.039,
                      "memory_gb": 80},
}
"""Dense tensor-core peaks (no sparsity) from NVIDIA's data sheets. jattr trains and
attributes in float32; XLA runs float32 matmuls and convolutions on TF32 tensor cores
at JAX's default precision, so TF32 is the peak used (bf16 listed for reference)."""
SCENARIOS = {"optimistic": {"compute": 0.30, "memory": 0.60},
             "conservative": {"compute": 0.10, "memory": 0.30}}
"""Achieved fractions of the TF32 peak (f_c) and of the HBM bandwidth (f_m). Small
32x32 convolutions with GroupNorm, SiLU and attention rarely reach more than a third
of a tensor-core peak; 10% is the pessimistic end."""
PARALLEL = {"train": 1, "generate": 1, "lds_cache": 8, "featurize": 8, "curvature": 8,
            "score": 8, "counterfactual": 8}
"""Speed-up on 8 GPUs per stage: the 2M = 128 subset models and the counterfactual's
retrainings are independent (members split over the mesh, docs/devices.md); the
featurization, the fits, the gradients and the measurements split their examples
(data parallel); the one full-data model and the batch-1 sampler are taken not to
speed up at all."""
DEFAULT_RATIOS = {"kfac": 4.4, "ekfac": 1.9, "sketch": 24.0}
"""Cost of one (example, draw) pair of each fit relative to one per-example gradient,
used with ``--skip-relative``: what ``relative_fit_costs`` measured for the ``cifar``
preset on 2 shared CPU cores (benchmarks/results/cifar2_estimate.json)."""
CHUNK = 25  # examples per featurization chunk (gradient_methods.feature_fn's default)


def _cost(fn, *args) -> dict:
  """``{"flops", "bytes"}`` of ``jax.jit(fn)`` compiled for ``args`` (not executed)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0]
  memory = compiled.memory_analysis()
  temp = getattr(memory, "temp_size_in_bytes", None)
  return {"flops": float(analysis.get("flops", 0.0)),
          "bytes": float(analysis.get("bytes accessed", 0.0)),
          "temp_gb": None if temp is None else temp / 1e9,
          "compile_s": time.perf_counter() - t0}


def _scaled(cost: dict, factor: float) -> dict:
  return {"flops": cost["flops"] * factor, "bytes": cost["bytes"] * factor}


def _total(*parts) -> dict:
  return {"flops": sum(p["flops"] for p in parts), "bytes": sum(p["bytes"] for p in parts)}


def _marginal(fn, small: int = 2, large: int = 6) -> float:
  """Seconds per extra pair of ``fn(n)`` between n = small and n = large pairs, warm
  (each size run once first, so compiling is excluded), best of 2; the fixed costs
  of a call (layer registry, host eigendecompositions) cancel."""
  for n in (small, large):
    jax.block_until_ready(jax.tree.leaves(fn(n)))
  best = {}
  for n in (small, large):
    for _ in range(2):
      t0 = time.perf_counter()
      jax.block_until_ready(jax.tree.leaves(fn(n)))
      best[n] = min(best.get(n, math.inf), time.perf_counter() - t0)
  return max(best[large] - best[small], 1e-9) / (large - small)


def step_costs(preset: str, spec: dict, ratios: dict) -> dict:
  """The per-step FLOPs and bytes of ``preset`` at the spec's image size and batch."""
  shape = (32, 32, 3)
  # Native convolutions, as the UNet runs on a GPU (``conv_impl="auto"`` would pick
  # im2col on this CPU, whose patches inflate the bytes ~10x); same parameters.
  config = models.config_by_name(preset, image_shape=shape, conv_impl="xla")
  init, apply = models.make_init_fn(config), models.make_apply_fn(config)
  params = jax.eval_shape(init, jax.random.key(0))
  num_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
  schedule = Schedule(**spec["schedule"])
  train = TrainConfig(**spec["train"])
  batch = train.batch_size
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
  out = {"num_params": num_params}

  # Forward pass at the training batch (the measurement and the sampler: per image).
  fwd = _cost(lambda p, x, t: apply(p, x, t), params, f32(batch, *shape), i32(batch))
  out["forward_per_image"] = {**_scaled(fwd, 1 / batch), "compile_s": fwd["compile_s"]}

  # One optimizer step (batch draw, loss, gradient, clipping, AdamW, EMA).
  optimizer = make_optimizer(train)
  state = jax.eval_shape(lambda p: init_state(p, optimizer), params)
  step = make_step_fn(apply, schedule, train, optimizer)
  n = spec["num_train"]
  out["train_step"] = _cost(step, state, f32(n, *shape), i32(n), i32(), jax.random.key(0))

  # Per-example gradient of the loss over K draws, for a chunk: per (example, draw).
  k_draws = 10
  draws = jax.eval_shape(lambda: draws_lib.fixed_draws(
      jax.random.key(1), k_draws, shape, schedule.num_timesteps))
  grad = _cost(lambda p, x, d: per_example_grads(measurement_fn("loss", apply, schedule, d),
                                                 p, x), params, f32(CHUNK, *shape), draws)
  out["grad_per_pair"] = {**_scaled(grad, 1 / (CHUNK * k_draws)), "compile_s": grad["compile_s"],
                          f"temp_gb_chunk{CHUNK}_k{k_draws}": grad["temp_gb"]}

  # One block of the dense Rademacher projection (regenerated, then G_b P_b), per example.
  for dim in (4096, 32768):
    proj = ProjectionConfig(dim=dim)
    blocks = math.ceil(num_params / proj.block_size)
    one = _cost(lambda g, b, c=proj: g @ block_matrix(c, b), f32(CHUNK, proj.block_size),
                i32())
    out[f"projection_per_example_k{dim}"] = {**_scaled(one, blocks / CHUNK),
                                             "compile_s": one["compile_s"]}

  out["fit_ratio_per_pair"] = ratios
  for name, r in ratios.items():
    if isinstance(r, (int, float)):
      out[f"{name}_per_pair"] = _scaled(out["grad_per_pair"], r)
  return out


def relative_fit_costs(preset: str, schedule: Schedule) -> dict:
  """K-FAC / EK-FAC / sketched-GGN update time per (example, draw) pair over the
  per-example gradient's, on this CPU at full size: the marginal seconds per pair
  between 2 and 6 pairs (``_marginal``), batches of 2 examples x 1 draw."""
  config = models.config_by_name(preset, image_shape=(32, 32, 3), conv_impl="xla")
  apply = models.make_apply_fn(config)
  params = models.make_init_fn(config)(jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (6, 32, 32, 3))
  draws = draws_lib.fixed_draws(jax.random.key(2), 1, (32, 32, 3), schedule.num_timesteps)
  loss = measurement_fn("loss", apply, schedule, draws)
  kfac_apply = models.kfac_apply_fn(config)
  sketch = ProjectionConfig(dim=4096, kind="sparse", nonzeros=4)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the diagonal-block notes of fit_kfac
    state = fit_kfac(kfac_apply, params, schedule, images, draws, batch_size=2)
    seconds = {
        "grad": _marginal(lambda n: per_example_grads(loss, params, images[:n], chunk_size=2)),
        "kfac": _marginal(lambda n: fit_kfac(kfac_apply, params, schedule, images[:n], draws,
                                             batch_size=2)),
        "ekfac": _marginal(lambda n: fit_ekfac(apply, params, schedule, images[:n], draws,
                                               state, batch_size=2)),
        "sketch": _marginal(lambda n: sketch_gram(apply, params, schedule, images[:n], draws,
                                                  sketch, batch_size=2, chunk_size=32))}
  ratios = {k: v / seconds["grad"] for k, v in seconds.items() if k != "grad"}
  return {**ratios, "measured_on": preset, "seconds_per_pair_on_this_cpu": seconds,
          "note": "marginal wall seconds per (example, draw) pair between 2 and 6 pairs on "
                  "this CPU (shared, 2 cores), warm, best of 2, over the per-example "
                  "gradient's; the sketch with S = 16 rows per pair at k = 4096"}


def _options(name: str) -> dict:
  """The keyword arguments a registry method's factory is called with (defaults filled)."""
  factory = bench.METHODS[name]
  keywords = dict(getattr(factory, "keywords", {}) or {})
  func = getattr(factory, "func", factory)
  defaults = {k: p.default for k, p in inspect.signature(func).parameters.items()
              if p.default is not inspect.Parameter.empty}
  features = {k: p.default for k, p in inspect.signature(
      gradient_methods.feature_fn).parameters.items() if p.default is not inspect.Parameter.empty}
  return {**features, **defaults, **keywords, "kind_of": func.__name__}


def protocol_costs(costs: dict, config: dict) -> dict:
  """FLOPs and bytes of each protocol stage (and of each method) for one preset."""
  spec = config["spec"]
  n, m, s = spec["num_train"], spec["num_subsets"], spec["num_seeds"]
  steps = spec["train"]["num_steps"]
  q = spec["num_validation"] + spec["num_test"] + spec["num_generated"]
  k_meas = spec["num_draws"]
  sampler_steps = spec["sampler"].get("num_steps", spec["schedule"]["num_timesteps"])
  p = costs["num_params"]
  fwd, grad, train = costs["forward_per_image"], costs["grad_per_pair"], costs["train_step"]
  flop = lambda f, b=0.0: {"flops": float(f), "bytes": float(b)}  # noqa: E731

  stages = {"train": _scaled(train, steps),
            "generate": _scaled(fwd, spec["num_generated"] * sampler_steps),
            "lds_cache": _total(_scaled(train, m * s * steps),
                                _scaled(fwd, m * s * q * k_meas))}
  methods, setup, scoring = {}, {"featurize": [], "curvature": []}, []
  for name in config.get("methods", []):
    o = _options(name)
    kind = o["kind_of"]
    if kind in ("random_method", "pixel_cosine_method"):
      continue
    draws = o.get("num_draws", 10)
    if kind == "trak_method":
      dim = o.get("dim", 4096)
      proj = costs[f"projection_per_example_k{dim}"]
      per_example = _total(_scaled(grad, draws), proj)
      # Per damping of the grid: the kernel (ΦΦᵀ if N < k, else ΦᵀΦ) and its Cholesky
      # factor (jattr.methods.trak.trak_fit), then the queries' solves and products.
      small = min(n, dim)
      fit = flop(2 * n * dim * small + small**3 / 3 + 2 * q * (n * dim + small**2))
      grid = len(o.get("grid", gradient_methods.RELATIVE_DAMPING_GRID))
      m_setup = _scaled(per_example, n)
      m_score = _total(_scaled(per_example, q), _scaled(fit, grid))
      stage = "featurize"
    elif kind == "influence_method":
      approx = o.get("approx", "kfac")
      pair = costs[f"{approx}_per_pair"] if approx in ("kfac", "ekfac") else grad
      fit = _scaled(pair, n * draws)
      if approx == "ekfac":  # its K-FAC fit first
        fit = _total(fit, _scaled(costs["kfac_per_pair"], n * draws))
      m_setup = _total(fit, _scaled(grad, n * draws))  # + the N x P training gradients
      grid = len(o.get("grid", ())) if o.get("tune", True) else 1
      m_score = _total(_scaled(grad, q * draws), flop((grid + 2) * 2 * q * n * p))
      stage = "curvature"
    elif kind == "sketch_method":
      dim = o.get("dim", 4096)
      sparse = flop(2 * p * o.get("nonzeros", 4), 4 * p * 3)  # per example: P·s adds
      feats = _total(_scaled(grad, draws), sparse)
      m_setup = _total(_scaled(feats, n), _scaled(costs["sketch_per_pair"], n * draws),
                       flop(10 * dim**3))
      m_score = _total(_scaled(feats, q), flop(10 * 2 * q * n * dim))
      stage = "curvature"
    else:
      raise ValueError(f"{name}: no cost model for {kind}")
    methods[name] = {"stage": stage, "setup": m_setup, "scoring": m_score,
                     "num_draws": draws, "dim": o.get("dim")}
    setup[stage].append(m_setup)
    scoring.append(m_score)
  stages["featurize"] = _total(*setup["featurize"]) if setup["featurize"] else flop(0)
  stages["curvature"] = _total(*setup["curvature"]) if setup["curvature"] else flop(0)
  stages["score"] = _total(*scoring) if scoring else flop(0)

  cf = config.get("counterfactual", {})
  retrained = 2 * cf.get("num_queries", 10) * len(cf.get("ks", (10, 50, 100)))
  cf_method = methods.get(cf.get("method"), {"setup": flop(0), "scoring": flop(0)})
  stages["counterfactual"] = _total(_scaled(train, retrained * steps),
                                    _scaled(fwd, retrained * sampler_steps),
                                    cf_method["setup"], cf_method["scoring"])
  memory = {"influence_train_grads_gb": n * p * 4 / 1e9,
            "trak_features_gb_k32768": n * 32768 * 4 / 1e9,
            "trak_kernel_gb_k32768": 32768**2 * 4 / 1e9}
  counts = {"num_train": n, "num_queries": q, "subset_models": m * s, "steps": steps,
            "batch_size": spec["train"]["batch_size"], "measurement_draws": k_meas,
            "sampler_steps": sampler_steps, "counterfactual_models": retrained}
  return {"stages": stages, "methods": methods, "memory": memory, "counts": counts}


def hours(stage: dict, gpu: dict, scenario: dict, devices: int = 1) -> float:
  compute = stage["flops"] / (scenario["compute"] * gpu["tf32_tflops"] * 1e12)
  memory = stage["bytes"] / (scenario["memory"] * gpu["hbm_tb_s"] * 1e12)
  return max(compute, memory) / devices / 3600.0


def estimate_table(per_stage: dict, gpu_name: str = "H100 SXM") -> list[dict]:
  gpu = GPUS[gpu_name]
  rows = []
  for name in bench_stages():
    st = per_stage[name]
    row = {"stage": name, "flops": st["flops"], "bytes": st["bytes"]}
    for sc_name, sc in SCENARIOS.items():
      row[f"h_1gpu_{sc_name}"] = hours(st, gpu, sc)
      row[f"h_8gpu_{sc_name}"] = hours(st, gpu, sc, PARALLEL[name])
    rows.append(row)
  total = {"stage": "total", "flops": sum(r["flops"] for r in rows),
           "bytes": sum(r["bytes"] for r in rows)}
  for key in rows[0]:
    if key.startswith("h_"):
      total[key] = sum(r[key] for r in rows)
  return rows + [total]


def bench_stages() -> tuple[str, ...]:
  return ("train", "generate", "featurize", "curvature", "lds_cache", "score",
          "counterfactual")


def format_table(rows: list[dict], preset: str, num_params: int, gpu_name: str) -> str:
  lines = [f"{preset} ({num_params / 1e6:.2f}M parameters), {gpu_name}, hours "
           "(optimistic - conservative):", "",
           "| stage | PFLOP | TB moved | 1 GPU | 8 GPUs |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['stage']} | {r['flops'] / 1e15:,.1f} | {r['bytes'] / 1e12:,.1f} | "
                 f"{r['h_1gpu_optimistic']:.2f} - {r['h_1gpu_conservative']:.2f} | "
                 f"{r['h_8gpu_optimistic']:.2f} - {r['h_8gpu_conservative']:.2f} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(HERE / "config_gpu.json"))
  parser.add_argument("--presets", default="cifar,cifar_30m")
  parser.add_argument("--skip-relative", action="store_true",
                      help="assume DEFAULT_RATIOS instead of timing the fits on this CPU")
  parser.add_argument("--relative-preset", default="cifar",
                      help="the preset the fits' relative costs are timed on (applied to all)")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" /
                                           "cifar2_estimate.json"))
  args = parser.parse_args(argv)
  config = bench.load_config(args.config)
  record = {"what": "ESTIMATE, not a measurement: per-step FLOPs and bytes from XLA's "
                    "compiled cost analysis on CPU, times the protocol's step counts, "
                    "converted with a roofline at assumed fractions of GPU peaks",
            "config": str(pathlib.Path(args.config).resolve().relative_to(REPO)),
            "host": {"machine": platform.machine(), "jax": jax.__version__,
                     "backend": jax.default_backend()},
            "assumptions": {"gpus": GPUS, "scenarios": SCENARIOS, "parallel_8gpu": PARALLEL,
                            "peak_used": "TF32 dense tensor-core peak (float32 at JAX's "
                                         "default matmul precision)",
                            "roofline": "hours = max(FLOPs / (f_c x peak), bytes / (f_m x "
                                        "HBM bandwidth)) per stage",
                            "bytes": "XLA:CPU's 'bytes accessed' (CPU fusion; a GPU fuses "
                                     "differently)",
                            "linear_in_draws": "a K-draw gradient costs K one-draw ones "
                                               "(the draws are a batch of the UNet)"},
            "presets": {}}
  ratios = dict(DEFAULT_RATIOS)
  if not args.skip_relative:
    print(f"timing the fits against the per-example gradient ({args.relative_preset}) ...",
          flush=True)
    ratios = relative_fit_costs(args.relative_preset, Schedule(**config["spec"]["schedule"]))
  record["assumptions"]["fit_ratios"] = ratios
  for preset in args.presets.split(","):
    print(f"{preset}: compiling the full-size programs (cost analysis) ...", flush=True)
    costs = step_costs(preset, config["spec"], ratios)
    proto = protocol_costs(costs, config)
    tables = {g: estimate_table(proto["stages"], g) for g in GPUS}
    record["presets"][preset] = {"per_step": costs, **proto, "hours": tables}
    for g in GPUS:
      print("\n" + format_table(tables[g], preset, costs["num_params"], g))
    print(f"\nmemory: {json.dumps({k: round(v, 1) for k, v in proto['memory'].items()})}")
  atomic.write_json(args.out, record)
  print(f"\nwritten to {args.out}")
  return record


if __name__ == "__main__":
  main()
