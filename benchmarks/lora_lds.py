"""LoRA LDS: the D-TRAK fine-tuning protocol in miniature, on the embedded digits.

1. A base UNet (the digits LDS benchmark's 12,921-parameter model) is trained on all
   digits of classes 0–4.
2. A LoRA adapter (``jattr.models.lora``, every kernel, rank r) is fine-tuned on a
   200-image set of classes 5–9, the base frozen: the model trained is
   ``restrict(lora_apply_fn(apply_fn), {"base": θ_base, "lora": adapter}, LORA)``.
3. The LDS retrains ONLY the fine-tune: M = 64 subsets (α = 0.5) of the 200 images,
   S = 2 seed replicates each (each member a fresh adapter on the same base), measured
   by the diffusion loss over K fixed draws on held-out real images of classes 5–9
   (validation, test) and on samples of the full fine-tune (generated). This is
   ``jattr.bench.lds_cache.build`` with ``model=(init_fn, apply_fn)`` = (a fresh
   adapter, the restricted LoRA model), so it has that module's cache, resume and
   noise ceiling.
4. Scores: pixel cosine; TRAK, D-TRAK (f = mean, square_norm); K-FAC, EK-FAC and
   dense-GGN influence — each w.r.t. the LoRA parameters (``@lora``: the cache's
   model as it is) and w.r.t. all parameters (``@all``: base and adapter, the same
   function of ``{"base", "lora"}``). Hyper-parameters are chosen on validation
   queries only (``jattr.eval.selection.select_and_evaluate``).

Everything expensive lives under ``--cache DIR`` (``base-<hash>/``: the base model's
checkpoint; ``lds/digits-<hash>/``: the LDS cache) and resumes where it stopped; the
scores accumulate in ``--results`` (default ``DIR/results-<hash>.json``), one method at
a time, and a rerun skips the methods already there (``--rescore`` to redo them).

    .venv/bin/python benchmarks/lora_lds.py --cache runs/lora_lds --smoke   # ~minutes
    .venv/bin/python benchmarks/lora_lds.py --cache runs/lora_lds           # full size
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import pathlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jattr import data as data_lib
from jattr import models
from jattr.bench import curvature_methods, gradient_methods, lds_cache
from jattr.bench.registry import pixel_cosine_method
from jattr.curvature import fit_ekfac, fit_kfac, inverse_vp_fn
from jattr.diffusion.draws import fixed_draws
from jattr.diffusion.measurements import measurement_fn
from jattr.diffusion.schedules import Schedule
from jattr.eval.measure import measure_loss
from jattr.eval.selection import MethodReport, results_table, select_and_evaluate
from jattr.grads.per_example import per_example_flat_grads
from jattr.io import checkpoint
from jattr.io.hashing import array_hash
from jattr.methods.influence import influence_scores
from jattr.models import LORA, lora_apply_fn, lora_init, lora_num_params
from jattr.train import TrainConfig, member_keys, train
from jattr.wrt import restrict

MODEL = {"preset": "digits", "base_channels": 8, "channel_mults": [1, 1], "num_res_blocks": 1,
         "attn_resolutions": [], "num_groups": 4, "time_embed_dim": 32}
"""The digits LDS benchmark's UNet (12,921 parameters)."""

CONFIG = {
    "name": "lora_lds",
    "base": {"classes": [0, 1, 2, 3, 4], "model": MODEL, "seed": 0,
             "schedule": {"kind": "linear", "num_timesteps": 1000},
             "train": {"num_steps": 2000, "batch_size": 64, "learning_rate": 0.002,
                       "warmup_steps": 100, "segment_steps": 250}},
    "lora": {"rank": 2, "alpha": 2.0, "targets": None},
    "spec": {"dataset": "digits", "classes": [5, 6, 7, 8, 9], "num_train": 200,
             "num_validation": 100, "num_test": 100, "num_generated": 100, "split_seed": 0,
             "schedule": {"kind": "linear", "num_timesteps": 1000},
             "train": {"num_steps": 400, "batch_size": 64, "learning_rate": 0.01,
                       "warmup_steps": 50, "segment_steps": 100},
             "num_subsets": 64, "alpha": 0.5, "subset_seed": 0, "num_seeds": 2,
             "full_seed": 0, "num_draws": 100, "draw_seed": 0,
             "sampler": {"kind": "ddim", "num_steps": 50, "eta": 0.0}, "sample_seed": 0},
    "strategy": "map",
    "query_chunk": 4,
    "bootstrap": {"num_resamples": 10000, "confidence": 0.95, "seed": 0},
}

SMOKE = {
    "base": {"train": {"num_steps": 100, "segment_steps": 50}},
    "spec": {"num_train": 40, "num_validation": 8, "num_test": 8, "num_generated": 4,
             "train": {"num_steps": 20, "batch_size": 16, "segment_steps": 10, "warmup_steps": 5},
             "num_subsets": 6, "num_draws": 10, "sampler": {"kind": "ddim", "num_steps": 5}},
    "bootstrap": {"num_resamples": 200},
}
"""Overrides of a CPU smoke run: checks the pipeline; its numbers mean nothing."""

METHODS = ("pixel_cosine", "trak@lora", "dtrak_mean@lora", "dtrak_square_norm@lora",
           "trak@all", "dtrak_mean@all", "dtrak_square_norm@all", "dense_ggn@lora",
           "kfac_expand@lora", "ekfac_expand@lora", "kfac_expand@all", "ekfac_expand@all",
           "dense_ggn@all")
"""Every row, cheap first. ``@lora``: w.r.t. the adapter; ``@all``: base and adapter.
The influence rows also report their untuned default (``<name>_default``: factor 0.1)."""


def deep_update(base: dict, over: dict) -> dict:
  out = dict(base)
  for k, v in over.items():
    out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
        else v
  return out


def digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def progress(desc, done, total, **metrics):
  extra = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
  log(f"  {desc}: {done}/{total} {extra}")


def unet(model: dict) -> models.UNetConfig:
  fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model.items()
            if k != "preset"}
  return dataclasses.replace(models.config_by_name(model["preset"]), image_shape=(8, 8, 1),
                             **fields)


# ---------------------------------------------------------------------------------
# Stage 1: the base model
# ---------------------------------------------------------------------------------


def train_base(config: dict, root: pathlib.Path):
  """The base UNet trained on classes ``base.classes``: (apply_fn, EMA params, record)."""
  base = config["base"]
  cfg = unet(base["model"])
  apply_fn, init_fn = models.make_apply_fn(cfg), models.make_init_fn(cfg)
  ds = data_lib.filter_classes(data_lib.load_digits(), base["classes"])
  sched, recipe = Schedule(**base["schedule"]), TrainConfig(**base["train"])
  init_key, train_key = member_keys(base["seed"])
  directory = root / f"base-{digest(base)}"
  t0 = time.perf_counter()
  state, losses = train(apply_fn, init_fn(init_key), sched, ds.x, recipe, train_key,
                        checkpointer=checkpoint.Checkpointer(directory),
                        meta={"lora_lds_base": digest(base)}, progress=progress)
  record = {"directory": str(directory), "num_images": int(ds.x.shape[0]),
            "num_params": models.num_params(state.ema_params),
            "loss_first_100": float(np.mean(losses[:100])),
            "loss_last_100": float(np.mean(losses[-100:])),
            "wall_s_this_run": time.perf_counter() - t0}
  return apply_fn, cfg, state.ema_params, record


# ---------------------------------------------------------------------------------
# Stage 2–3: the LoRA fine-tune and its LDS cache
# ---------------------------------------------------------------------------------


def lora_problem(config: dict, apply_fn, base_params):
  """(apply over {"base", "lora"}, restricted apply, init_fn of a fresh adapter)."""
  lora = config["lora"]
  apply = lora_apply_fn(apply_fn, alpha=lora["alpha"])
  template = {"base": base_params,
              "lora": lora_init(jax.random.key(0), base_params, lora["rank"], lora["targets"])}
  apply_sub, sub = restrict(apply, template, LORA)

  def init_fn(key):
    return {**sub, "lora": lora_init(key, base_params, lora["rank"], lora["targets"])}

  return apply, apply_sub, init_fn


def lds_spec(config: dict, base_params) -> lds_cache.LdsSpec:
  """The fine-tune's ``LdsSpec``; ``model`` names the base (its hash) and the adapter."""
  model = {"lora": config["lora"], "base": config["base"],
           "base_params_sha256": array_hash(np.asarray(ravel_pytree(base_params)[0]))}
  return lds_cache.LdsSpec.from_dict({**config["spec"], "model": model})


def fit_record(cache, apply_fn, base_params, apply_sub) -> dict:
  """How well the fine-tune fits: loss over the K measurement draws, train vs test,
  under the base model and under the full-data LoRA fine-tune."""
  out = {}
  param = cache.train_config.parameterization
  images = {"finetune_train": cache.train_images,
            "finetune_test": cache.splits["test"].queries.images}
  for name, (fn, params) in {"base": (apply_fn, base_params),
                             "lora": (apply_sub, cache.full_params)}.items():
    for split, x in images.items():
      y = measure_loss(fn, params, cache.schedule, jnp.asarray(x), cache.draws,
                       parameterization=param, query_chunk=8)
      out[f"{name}/{split}"] = float(np.mean(np.asarray(y)))
  meta = checkpoint.read_meta(cache.directory / "full")
  losses = np.asarray(meta["losses"], np.float32).reshape(-1)
  out["lora_train_loss_first_50"] = float(np.mean(losses[:50]))
  out["lora_train_loss_last_50"] = float(np.mean(losses[-50:]))
  return out


# ---------------------------------------------------------------------------------
# Stage 4: the scorers
# ---------------------------------------------------------------------------------


def kfac_method(view, kfac_apply, *, approx: str, num_draws: int = 10, draw_seed: int = 1,
                batch_size: int = 50, grid=curvature_methods.DAMPING_FACTOR_GRID):
  """K-FAC / EK-FAC influence on ``view`` (an ``LdsCache`` with the model to attribute),
  fitted with ``kfac_apply`` (the same function with native convolutions); as
  ``jattr.bench.curvature_methods.influence_method`` computes it, with m = ℓ = the loss
  over ``num_draws`` draws of ``draw_seed``."""
  train_x = jnp.asarray(view.train_images)
  param = view.train_config.parameterization
  draws = fixed_draws(jax.random.key(draw_seed), num_draws, tuple(train_x.shape[1:]),
                      view.schedule.num_timesteps)
  t0 = time.perf_counter()
  state = fit_kfac(kfac_apply, view.full_params, view.schedule, train_x, draws,
                   weight_sharing="expand", batch_size=batch_size, parameterization=param)
  if approx == "ekfac":
    state = fit_ekfac(view.apply_fn, view.full_params, view.schedule, train_x, draws, state,
                      batch_size=batch_size, parameterization=param)
  jax.block_until_ready(jax.tree.leaves(state))
  seconds = time.perf_counter() - t0
  loss = measurement_fn("loss", view.apply_fn, view.schedule, draws, parameterization=param)
  grads = jax.jit(lambda x: per_example_flat_grads(loss, view.full_params, x, chunk_size=50))
  train_grads = grads(train_x)
  unravel = ravel_pytree(view.full_params)[1]
  query_grads = {}

  def score_fn(hparams, queries):
    key = (queries.name, queries.images.shape)
    if key not in query_grads:
      query_grads[key] = jax.vmap(unravel)(grads(jnp.asarray(queries.images)))
    ivp = inverse_vp_fn(state, damping_factor=hparams.get("damping_factor", 0.1))
    return np.asarray(influence_scores(query_grads[key], train_grads, ivp, chunk_size=50))

  score_fn.fit_seconds = seconds
  return score_fn, [{"damping_factor": c} for c in grid]


def views(cache, apply, base_params, kfac_base, alpha):
  """``{"lora": view, "all": view}``: the cache with the model to attribute, and the
  native-convolution model K-FAC fits on."""
  full = {"base": base_params, "lora": cache.full_params["lora"]}
  kfac_all = lora_apply_fn(kfac_base, alpha=alpha)
  kfac_lora, _ = restrict(kfac_all, full, LORA)
  return {"lora": (cache, kfac_lora),
          "all": (dataclasses.replace(cache, apply_fn=apply, full_params=full, memo={}),
                  kfac_all)}


def method_factory(name: str, views_):
  """(score_fn, grid, has_default) of a ``METHODS`` row."""
  if name == "pixel_cosine":
    return (*pixel_cosine_method(views_["lora"][0]), False)
  base, group = name.split("@")
  view, kfac_apply = views_[group]
  if base == "trak":
    return (*gradient_methods.trak_method(view, measurement="loss", num_draws=10), False)
  if base.startswith("dtrak_"):
    return (*gradient_methods.trak_method(view, measurement=base[len("dtrak_"):],
                                          num_draws=10), False)
  if base == "dense_ggn":
    return (*curvature_methods.influence_method(view, approx="dense", batch_size=4), True)
  if base in ("kfac_expand", "ekfac_expand"):
    return (*kfac_method(view, kfac_apply, approx=base.split("_")[0]), True)
  raise ValueError(f"unknown method {name!r}; known: {METHODS}")


def score(config: dict, cache, views_, methods, results_path: pathlib.Path, rescore: bool,
          record: dict) -> dict:
  boot = config["bootstrap"]
  reported = [cache.splits[s] for s in ("test", "generated") if cache.splits[s].y.shape[0]]
  previous = json.loads(results_path.read_text()) if results_path.exists() else {}
  reports = {r["method"]: r for r in previous.get("reports", [])}
  timing = previous.get("timing", {})
  for name in methods:
    if name in reports and not rescore:
      log(f"{name}: in {results_path} already (--rescore to redo)")
      continue
    log(f"scoring {name}")
    t0 = time.perf_counter()
    try:
      score_fn, grid, has_default = method_factory(name, views_)
      t1 = time.perf_counter()
      rep = select_and_evaluate(name, score_fn, grid, cache.masks, cache.splits["validation"],
                                reported, **boot)
      reports[name] = rep.to_dict()
      if has_default:
        reports[f"{name}_default"] = select_and_evaluate(
            f"{name}_default", score_fn, [{}], cache.masks, cache.splits["validation"],
            reported, **boot).to_dict()
    except Exception as e:  # noqa: BLE001 - one failing method must not lose the others
      log(f"{name} FAILED: {type(e).__name__}: {str(e)[:2000]}\n{traceback.format_exc()}")
      timing[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
      write(results_path, record, reports, timing)
      continue
    timing[name] = {"setup_s": t1 - t0, "scoring_s": time.perf_counter() - t1,
                    "grid_size": len(grid),
                    "fit_s": getattr(score_fn, "fit_seconds", None)}
    r = reports[name]["results"]
    log(f"{name}: " + ", ".join(f"{s} {r[s]['mean']:.3f}" for s in r) +
        f" ({timing[name]['setup_s']:.0f} s setup, {timing[name]['scoring_s']:.0f} s scoring)")
    write(results_path, record, reports, timing)
  return write(results_path, record, reports, timing)


def write(path: pathlib.Path, record: dict, reports: dict, timing: dict) -> dict:
  table = results_table([MethodReport.from_dict(d) for d in reports.values()]) if reports else ""
  out = {**record, "reports": list(reports.values()), "timing": timing, "table": table}
  lds_cache.save_report(path, out)
  return out


# ---------------------------------------------------------------------------------


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cache", required=True, help="directory of the base model and LDS cache")
  p.add_argument("--config", help="JSON file of overrides of CONFIG")
  p.add_argument("--smoke", action="store_true", help="reduced sizes (SMOKE) for a CPU check")
  p.add_argument("--methods", default=",".join(METHODS), help="comma-separated METHODS rows")
  p.add_argument("--results", help="results JSON (default: CACHE/results-<hash>.json)")
  p.add_argument("--rescore", action="store_true", help="redo methods already in --results")
  p.add_argument("--build-only", action="store_true", help="build the cache, score nothing")
  p.add_argument("--lora-steps", type=int, help="fine-tune steps (spec.train.num_steps)")
  p.add_argument("--base-steps", type=int, help="base model steps")
  p.add_argument("--num-subsets", type=int, help="M")
  args = p.parse_args(argv)

  config = deep_update(CONFIG, SMOKE) if args.smoke else dict(CONFIG)
  if args.config:
    config = deep_update(config, json.loads(pathlib.Path(args.config).read_text()))
  if args.lora_steps:
    config = deep_update(config, {"spec": {"train": {"num_steps": args.lora_steps}}})
  if args.base_steps:
    config = deep_update(config, {"base": {"train": {"num_steps": args.base_steps}}})
  if args.num_subsets:
    config = deep_update(config, {"spec": {"num_subsets": args.num_subsets}})
  methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    p.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
  root = pathlib.Path(args.cache)
  t_start = time.perf_counter()
  log(f"config {digest(config)}: {json.dumps(config)}")

  apply_fn, cfg, base_params, base_record = train_base(config, root)
  log(f"base: {base_record}")
  apply, apply_sub, init_fn = lora_problem(config, apply_fn, base_params)
  spec = lds_spec(config, base_params)
  lora = config["lora"]
  log(f"LoRA rank {lora['rank']}, alpha {lora['alpha']}: "
      f"{lora_num_params(base_params, lora['rank'], lora['targets'])} adapter parameters on "
      f"{models.num_params(base_params)} base parameters")
  t0 = time.perf_counter()
  cache = lds_cache.build(spec, root / "lds", model=(init_fn, apply_sub),
                          strategy=config["strategy"], query_chunk=config["query_chunk"],
                          progress=progress)
  summary = lds_cache.cache_summary(cache)
  log(f"LDS cache {cache.directory} ready in {time.perf_counter() - t0:.0f} s this run; "
      f"ceilings {json.dumps(summary['ceilings'])}; build {summary['build_wall_s']:.0f} s wall "
      f"summed over runs")
  fit = fit_record(cache, apply_fn, base_params, apply_sub)
  log(f"fit: {json.dumps(fit)}")
  record = {"name": config["name"], "config": config, "config_digest": digest(config),
            "spec_digest": spec.digest(), "base": base_record, "fit": fit, "cache": summary,
            "lora_params": lora_num_params(base_params, lora["rank"], lora["targets"]),
            "base_params": models.num_params(base_params)}
  results = pathlib.Path(args.results or root / f"results-{digest(config)}.json")
  if args.build_only:
    write(results, record, {}, {})
    return 0
  v = views(cache, apply, base_params, models.kfac_apply_fn(cfg), lora["alpha"])
  out = score(config, cache, v, methods, results, args.rescore, record)
  print(out["table"])
  log(f"done in {time.perf_counter() - t_start:.0f} s; results in {results}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
