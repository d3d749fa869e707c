"""Forgetting a digit class by dropping ensemble members (docs/ensembles.md §5).

    python experiments/digits_lds/ensemble_forgetting.py \
        --config experiments/digits_lds/config_digits.json \
        --figure docs/figures/ensemble_forgetting.png --out runs/digits_lds/ensemble_forgetting.json

Trains (once; cached in the LDS cache, ``jattr.bench.ensemble_cache``) an 8-member
binary-code ensemble over the 10 classes of the benchmark's training set, with the
benchmark's recipe; samples from the ensemble (the members' mean ε prediction,
the benchmark's DDIM sampler) and from the ensemble without the members that saw
class c (``jattr.methods.ensembles.forget``), from the same keys; and labels every
sample by its nearest neighbour (pixel L2) among all labelled digits images.
"""

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jattr.bench import build_cache, ensemble_cache, lds_cache, load_config  # noqa: E402
from jattr.cli.progress import TqdmProgress  # noqa: E402
from jattr.io import images  # noqa: E402
from jattr.methods import ensembles  # noqa: E402


def nearest_labels(samples, ref_x, ref_y):
  d = ((samples.reshape(len(samples), -1)[:, None, :]
        - ref_x.reshape(len(ref_x), -1)[None]) ** 2).sum(-1)
  return ref_y[np.argmin(d, axis=1)]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", required=True)
  p.add_argument("--figure", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--forget", type=int, nargs="+", default=[3, 7])
  p.add_argument("--num-samples", type=int, default=64)
  p.add_argument("--members", type=int, default=8)
  args = p.parse_args()

  cache = build_cache(load_config(args.config))
  spec = ensemble_cache.EnsembleSpec(num_members=args.members, design="binary_code",
                                     group_by="class", seed=2)
  t0 = time.perf_counter()
  ens = ensemble_cache.build(cache, spec, progress=TqdmProgress())
  labels = ensemble_cache.train_labels(cache)
  shape = tuple(cache.train_images.shape[1:])
  sample = lds_cache.make_sample_fn(ensembles.ensemble_apply_fn(cache.apply_fn), cache.spec,
                                    shape)
  run = jax.jit(lambda e, ks: jax.lax.map(lambda k: sample(e, k), ks))
  keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(123), j))(
      jnp.arange(args.num_samples))
  ds = lds_cache.load_data(cache.spec)
  rows, record = [], {"ensemble": spec.to_dict(), "directory": str(ens.directory),
                      "timing": ens.timing, "num_samples": args.num_samples, "rows": []}
  for c in [None] + list(args.forget):
    keep = (np.ones(args.members, bool) if c is None
            else ensembles.forget(ens.masks, labels == c))
    x = np.asarray(run(ensembles.ensemble_params(ens.params, keep), keys))
    lab = nearest_labels(x, np.asarray(ds.x), np.asarray(ds.y))
    counts = np.bincount(lab, minlength=10)
    seen = sorted(int(k) for k in np.unique(labels[ens.masks[keep].any(axis=0)]))
    record["rows"].append({"forget": c, "members": np.flatnonzero(keep).tolist(),
                           "classes_seen": seen, "nn_class_counts": counts.tolist()})
    rows.append((c, keep.sum(), x, counts))
    print(f"forget {c}: {keep.sum()} members, classes seen {seen}, nearest-neighbour class "
          f"counts {counts.tolist()}", flush=True)
  record["seconds"] = time.perf_counter() - t0

  # Left: the samples whose full-ensemble nearest neighbour is one of the forgotten
  # classes, regenerated from the same keys by each ensemble. Right: class counts.
  full_lab = nearest_labels(rows[0][2], np.asarray(ds.x), np.asarray(ds.y))
  pick = np.concatenate([np.flatnonzero(full_lab == c)[:8] for c in args.forget])
  record["shown_sample_indices"] = pick.tolist()
  for c, m, x, _ in rows[1:]:
    lab = nearest_labels(x[pick], np.asarray(ds.x), np.asarray(ds.y))
    kept = {int(g): int(np.sum((full_lab[pick] == g) & (lab == g))) for g in args.forget}
    record.setdefault("kept_class_of_shown", {})[str(c)] = kept
    print(f"forget {c}: of the shown samples, still drawn as their class: {kept} of "
          f"{ {int(g): int(np.sum(full_lab[pick] == g)) for g in args.forget} }")
  fig, axes = plt.subplots(len(rows), 2, figsize=(10, 2.6 * len(rows)),
                           gridspec_kw={"width_ratios": [1.4, 1]})
  for (c, m, x, counts), (a0, a1) in zip(rows, axes):
    a0.imshow(images.grid(x[pick], ncol=8, scale=4)[..., 0], cmap="gray")
    a0.set_axis_off()
    a0.set_title("all %d members" % m if c is None else f"forget class {c}: {m} members left",
                 fontsize=10)
    colors = ["tab:red" if k == c else "tab:gray" for k in range(10)]
    a1.bar(range(10), counts, color=colors)
    a1.set_xticks(range(10))
    a1.set_ylim(0, max(r[3].max() for r in rows) + 2)
    a1.set_title(f"nearest-neighbour class of {len(x)} samples", fontsize=9)
  fig.suptitle("samples that the full ensemble drew as " + " and ".join(
      f"{c}s" for c in args.forget) + " (same keys in every row)", fontsize=10)
  fig.tight_layout()
  pathlib.Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(args.figure, dpi=110)
  lds_cache.save_report(args.out, record)
  print(f"figure {args.figure}; record {args.out}")


if __name__ == "__main__":
  main()
