"""Pilot behind the benchmark's recipe: the noise ceiling as training proceeds.

Trains M subsets × S seeds (common random numbers: seed r shared by all subsets)
of one recipe as one ``lax.map`` program and, every ``every`` steps, measures the
loss of 100 validation, 100 test and 100 training images over K = 100 fixed draws,
printing the single-seed (seed 0 vs 1) and split-half (seeds 0-1 vs 2-3) ceilings
as JSON lines. The numbers in docs/results.md came from

    python experiments/digits_lds/pilot_ceiling.py '{"N": 200, "steps": 1000,
      "model": {"base_channels": 8, "channel_mults": [1, 1], "num_res_blocks": 1,
                "attn_resolutions": [], "time_embed_dim": 32, "num_groups": 4}}'

(M = 16, S = 4 by default; about 25 CPU-minutes on the shared 2-core machine).
"""

import importlib
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jattr import diffusion
from jattr.data import load_digits, split_indices
from jattr.models import UNetConfig, make_apply_fn, make_init_fn
from jattr.train import TrainConfig, init_state, make_optimizer, make_subsets, member_keys
from jattr.train.loop import make_segment_fn

lds = importlib.import_module("jattr.eval.lds")


def main(args: dict) -> None:
  n, m, s = args["N"], args.get("M", 16), args.get("S", 4)
  steps, every = args["steps"], args.get("every", 500)
  cfg = UNetConfig(image_shape=(8, 8, 1), **args["model"])
  tc = TrainConfig(num_steps=steps, batch_size=args.get("bs", 64),
                   learning_rate=args.get("lr", 2e-3), ema_decay=args.get("ema", 0.999))
  ds = load_digits()
  tr, va, te = split_indices(len(ds), [n, 100, 100], 0)
  data = jnp.asarray(ds.x[tr])
  queries = jnp.asarray(np.concatenate([ds.x[va], ds.x[te], ds.x[tr[:100]]]))
  sched = diffusion.linear(1000)
  init, apply = make_init_fn(cfg), make_apply_fn(cfg)
  opt = make_optimizer(tc)
  seg = make_segment_fn(apply, sched, tc, opt)
  masks = np.concatenate([lds.subset_masks(n, m, 0.5, 0)] * s)
  seeds = np.repeat(np.arange(s), m)
  table = make_subsets(masks, n)
  idx, cnt = jnp.asarray(table.indices), jnp.asarray(table.counts)
  keys = [member_keys(int(r)) for r in seeds]
  state = jax.jit(jax.vmap(lambda k: init_state(init(k), opt)))(jnp.stack([k[0] for k in keys]))
  tkeys = jnp.stack([k[1] for k in keys])
  run = jax.jit(lambda st: jax.lax.map(
      lambda x: seg(x[0], data, x[1], x[2], x[3], 100), (st, idx, cnt, tkeys)))
  draws = diffusion.fixed_draws(jax.random.key(0), 100, (8, 8, 1), 1000)
  measure = lds.member_measure_fn(apply, sched, draws, query_chunk=4)
  for step in range(100, steps + 1, 100):
    state, losses = run(state)
    if step % every:
      continue
    y = np.asarray(measure(state.ema_params, queries), np.float64)
    y = y.reshape(-1, s, m).transpose(0, 2, 1)  # [Q, M, S]
    out = {"step": step, "loss": float(np.mean(losses[:, -50:]))}
    for name, rows in (("val", slice(0, 100)), ("test", slice(100, 200)),
                       ("train", slice(200, 300))):
      out[name + "_1v1"] = round(lds.noise_ceiling(y[rows][..., :2], num_resamples=10).mean, 3)
      out[name + "_2v2"] = round(lds.noise_ceiling(y[rows], num_resamples=10).mean, 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
