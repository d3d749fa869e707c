"""Journey-TRAK on the digits LDS benchmark: per-step attributions of generated samples.

For the benchmark's generated queries (each re-sampled alone from its key, DDIM 50
steps, exactly as the cache made it), scores every sampling step s with
``jattr.methods.journey_trak_scores`` (f_s = the loss at t_s with one fixed noise
ε_s, x̂₀^(s) as the query) and measures how well step s's attribution predicts the
subset models' loss on the *final* sample: LDS per step against the cache's
generated-query measurements. Writes

  docs/figures/journey_steps.png   x̂₀ at six steps with that step's top-3 training images
  docs/figures/journey_lds.png     LDS (generated) of each step's scores, and of their mean
  runs/digits_lds/journey.json     the per-step numbers

    python experiments/digits_lds/journey_figure.py [--num-queries 100] [--relative-damping 0.1]

Needs matplotlib (``pip install -e '.[plots]'``). The relative damping is fixed
up front (not tuned on these queries).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattr.diffusion import samplers
from jattr import bench
from jattr.eval.lds import lds_per_query, noise_ceiling, summarize
from jattr.features.projection import ProjectionConfig
from jattr.bench import lds_cache
from jattr.methods.trak import journey_trak_scores

HERE = pathlib.Path(__file__).parent


def trajectories(cache, num_queries: int) -> samplers.Trajectory:
  """The generated queries' sampling paths, each sampled alone from its own key."""
  spec = cache.spec
  sampler = dict(spec.sampler)
  if sampler.pop("kind") != "ddim":
    raise ValueError("this script expects the benchmark's DDIM sampler")
  keys = lds_cache.sample_keys(spec)[:num_queries]
  shape = (1,) + tuple(cache.train_images.shape[1:])

  def one(key):
    return samplers.ddim_sample(cache.apply_fn, cache.full_params, cache.schedule, key, shape,
                                parameterization=cache.train_config.parameterization,
                                return_trajectory=True, **sampler)

  tr = jax.jit(jax.vmap(one))(keys)  # leaves [Q, S, 1, ...]
  return samplers.Trajectory(t=tr.t[0], x_t=jnp.swapaxes(tr.x_t[:, :, 0], 0, 1),
                             x0_pred=jnp.swapaxes(tr.x0_pred[:, :, 0], 0, 1),
                             x0=tr.x0[:, 0])


def _summary(tau, masks, y) -> dict:
  r = summarize(lds_per_query(tau, masks, y))
  return {"mean": r.mean, "ci_low": r.ci_low, "ci_high": r.ci_high}


def _standardize(tau):
  tau = np.asarray(tau, np.float64)
  return (tau - tau.mean(-1, keepdims=True)) / (tau.std(-1, keepdims=True) + 1e-30)


def plot_steps(path, traj, scores, train_images, show_steps, samples):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  img = lambda x: np.clip((np.asarray(x)[..., 0] + 1) / 2, 0, 1)
  rows = len(samples) * 4
  fig, axes = plt.subplots(rows, len(show_steps), figsize=(1.3 * len(show_steps), 1.3 * rows))
  for a, b in enumerate(samples):
    for c, s in enumerate(show_steps):
      ax = axes[4 * a, c]
      ax.imshow(img(traj.x0_pred[s, b]), cmap="gray", vmin=0, vmax=1)
      ax.set_title(f"q{b} step {s}\nt={int(traj.t[s])}", fontsize=7)
      top = np.argsort(-np.asarray(scores[s, b]))[:3]
      for r, i in enumerate(top):
        ax = axes[4 * a + 1 + r, c]
        ax.imshow(img(train_images[i]), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"#{i} τ={float(scores[s, b, i]):.2g}", fontsize=6)
  for ax in axes.ravel():
    ax.set_xticks([]), ax.set_yticks([])
  fig.suptitle("Journey-TRAK: x̂₀ at a sampling step (row 1) and that step's top-3 training "
               "images", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_lds(path, t, per_step, mean_lds, ceiling):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5.5, 3.2))
  m = np.array([r["mean"] for r in per_step])
  lo = np.array([r["ci_low"] for r in per_step])
  hi = np.array([r["ci_high"] for r in per_step])
  ax.plot(t, m, "o-", ms=3, label="step s alone")
  ax.fill_between(t, lo, hi, alpha=0.25)
  ax.axhline(mean_lds, color="C1", ls="--", label=f"mean of standardised steps ({mean_lds:.3f})")
  ax.axhline(ceiling, color="k", ls=":", label=f"noise ceiling ({ceiling:.3f})")
  ax.invert_xaxis()
  ax.set_xlabel("timestep t of the sampling step (sampling runs left → right)")
  ax.set_ylabel("LDS on the final samples")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=str(HERE / "config_digits.json"))
  p.add_argument("--num-queries", type=int, default=100)
  p.add_argument("--relative-damping", type=float, default=0.1)
  p.add_argument("--dim", type=int, default=4096)
  p.add_argument("--noise-seed", type=int, default=1, help="seed of the per-step noises ε_s")
  p.add_argument("--figures", default="docs/figures")
  p.add_argument("--results", default="runs/digits_lds/journey.json")
  args = p.parse_args(argv)

  t0 = time.perf_counter()
  cache = bench.build_cache(bench.load_config(args.config))
  gen = cache.splits["generated"]
  q = min(args.num_queries, gen.y.shape[0])
  traj = trajectories(cache, q)
  drift = float(np.abs(np.asarray(traj.x0) - gen.queries.images[:q]).max())
  if drift > 1e-4:
    raise RuntimeError(f"re-sampled queries differ from the cache's (max |Δ| {drift:.2g})")
  steps = list(range(traj.t.shape[0]))
  train = jnp.asarray(cache.train_images)
  t1 = time.perf_counter()
  scores = np.asarray(journey_trak_scores(
      cache.apply_fn, cache.full_params, cache.schedule, traj, steps, train,
      jax.random.key(args.noise_seed), ProjectionConfig(dim=args.dim),
      parameterization=cache.train_config.parameterization,
      relative_damping=args.relative_damping, chunk_size=50))
  score_s = time.perf_counter() - t1
  y = gen.y[:q]
  per_step = [_summary(scores[s], cache.masks, y) for s in steps]
  mean_lds = _summary(np.mean([_standardize(scores[s]) for s in steps], axis=0), cache.masks, y)
  ceil = noise_ceiling(y)
  ceil = {"mean": ceil.mean, "ci_low": ceil.ci_low, "ci_high": ceil.ci_high}

  figures = pathlib.Path(args.figures)
  figures.mkdir(parents=True, exist_ok=True)
  show = [0, 10, 20, 30, 40, steps[-1]]
  plot_steps(figures / "journey_steps.png", traj, scores, cache.train_images, show, [0, 1, 2])
  plot_lds(figures / "journey_lds.png", np.asarray(traj.t), per_step, mean_lds["mean"],
           ceil["mean"])
  record = {"num_queries": q, "relative_damping": args.relative_damping, "dim": args.dim,
            "noise_seed": args.noise_seed, "t": np.asarray(traj.t).tolist(),
            "per_step": per_step, "mean_of_steps": mean_lds, "noise_ceiling": ceil,
            "scoring_s": score_s, "total_s": time.perf_counter() - t0}
  pathlib.Path(args.results).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.results).write_text(json.dumps(record, indent=1, default=float))
  print("| step | t | LDS generated |\n|---|---|---|")
  for s in steps[::5] + [steps[-1]]:
    r = per_step[s]
    print(f"| {s} | {int(traj.t[s])} | {r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |")
  print(f"mean of standardised steps: {mean_lds['mean']:.3f} [{mean_lds['ci_low']:.3f}, "
        f"{mean_lds['ci_high']:.3f}]; ceiling {ceil['mean']:.3f}; scoring {score_s:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
