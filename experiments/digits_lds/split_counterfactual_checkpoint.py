"""One-off: split a combined counterfactual checkpoint (attributed + random control
members in one train_many run, as ``jattr counterfactual`` wrote them before the
controls were shared) into the two checkpoints the current code reads.

    python experiments/digits_lds/split_counterfactual_checkpoint.py \
        --config experiments/digits_lds/config_digits.json --method pixel_cosine \
        --removed runs/digits_lds/counterfactual_pixel_cosine.npz

The combined directory is renamed ``<tag>.combined`` (kept); the first half of its
members (the attributed removals) is written to ``<tag>`` and the second half (the
random controls) to ``random-control-q<Q>-k<ks>-r<seed>``, each with the job
metadata train_many computes for that half, so ``jattr counterfactual`` restores
them instead of retraining. Each member trained alone ("map"), so the halves are
exactly the models the split runs would train; rerunning the method's
counterfactual reproduces its stored table.
"""

import argparse
import pathlib

import jax
import numpy as np

from jattr.bench import build_cache, load_config
from jattr.bench.lds_cache import abstract_state
from jattr.io import checkpoint
from jattr.train import config_dict, make_subsets, subsets_digest


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", required=True)
  p.add_argument("--method", required=True)
  p.add_argument("--removed", required=True, help="the method's counterfactual .npz")
  p.add_argument("--random-seed", type=int, default=0)
  args = p.parse_args()
  cache = build_cache(load_config(args.config))
  with np.load(args.removed) as z:
    removed, ks = z["removed"], [int(k) for k in z["ks"]]
  q, n = removed.shape[2], cache.masks.shape[1]
  suffix = f"q{q}-k{'_'.join(map(str, ks))}-r{args.random_seed}"
  root = cache.directory / "counterfactual"
  src = root / f"{args.method}-{suffix}"
  combined = src.with_name(src.name + ".combined")
  control = root / f"random-control-{suffix}"
  src.rename(combined)
  config = cache.train_config
  num = 2 * len(ks) * q
  state, meta, step = checkpoint.restore(combined, abstract_state(cache.init_fn, config, num))
  losses = np.asarray(meta["losses"], np.float32)
  masks = np.ones((2, len(ks), q, n), bool)
  for kind in range(2):
    for j, k in enumerate(ks):
      np.put_along_axis(masks[kind, j], removed[kind, j, :, :k], False, axis=1)
  seed = meta["job"]["seeds"][0]
  for kind, (dst, extra) in enumerate([
      (src, {"counterfactual": ks}),
      (control, {"counterfactual_control": ks, "random_seed": args.random_seed})]):
    m = masks[kind].reshape(-1, n)
    half = slice(kind * num // 2, (kind + 1) * num // 2)
    job = {"kind": "train_many", "config": config_dict(config), "seeds": [seed] * m.shape[0],
           "subsets": subsets_digest(make_subsets(m, n)), **extra}
    checkpoint.save(dst, step, jax.tree.map(lambda a: a[half], state),
                    {"job": job, "losses": losses[half].tolist(), "strategy": meta["strategy"]})
    print(f"wrote {dst} ({m.shape[0]} members, step {step})")


if __name__ == "__main__":
  main()
