"""``jattr fit-curvature`` and ``jattr influence`` (``jattr.runs.curvature``)."""

from __future__ import annotations

import argparse
import time

from jattr.cli import flags
from jattr.cli.progress import progress_for
from jattr.curvature import DEFAULT_ESTIMATION_MODE, ESTIMATION_MODES, MAX_DENSE_PARAMS
from jattr.diffusion.measurements import MEASUREMENTS
from jattr.features.projection import PROJECTION_KINDS, ProjectionConfig
from jattr.io import guard
from jattr.runs import CURVATURES, fit_run_curvature, influence_run, write_influence
from jattr.runs import curvature as workflow


def cmd_fit_curvature(args):
  t0 = time.perf_counter()
  state, meta = fit_run_curvature(
      args.run, args.out, approx=args.approx, weight_sharing=args.weight_sharing,
      num_draws=args.num_draws, timesteps=args.timesteps, draw_seed=args.draw_seed,
      damping=args.damping, estimation_mode=args.estimation_mode, num_samples=args.num_samples,
      seed=args.seed, batch_size=args.batch_size, grad_batch_size=args.grad_batch_size,
      chunk_size=args.chunk_size, max_dense_params=args.max_dense_params,
      overwrite=args.overwrite, progress=progress_for(args), wrt=args.wrt,
      projection=ProjectionConfig(dim=args.sketch_dim, kind=args.sketch_projection, seed=0,
                                  nonzeros=4 if args.sketch_projection == "sparse" else 2),
      rank=args.rank)
  ws = f" ({meta['weight_sharing']})" if meta["weight_sharing"] else ""
  print(f"{meta['kind']}{ws} curvature of {meta['num_parameters']:,} parameters over "
        f"{meta['dataset']['num']} examples x {meta['draws']['num_draws']} draws -> {args.out} "
        f"({time.perf_counter() - t0:.0f} s)")
  return state


def cmd_influence(args):
  guard.check_output_file(args.out, "--out", kind="influence", keys=workflow.INFLUENCE_KEYS)
  t0 = time.perf_counter()
  kw = {} if args.damping is None else {"damping": args.damping}
  if args.wrt is not None:
    kw["wrt"] = args.wrt
  tau, info = influence_run(args.run, args.curvature, measurement=args.measurement,
                            time_=args.time, queries=args.queries, tile_size=args.tile_size,
                            chunk_size=args.chunk_size, progress=progress_for(args), **kw)
  out = write_influence(args.out, tau, info)
  meta = info["curvature_meta"]
  lam = "default" if info["damping"] is None else f"{info['damping']:g}"
  print(f"tau {tau.shape} ({meta['kind']} influence, m = {args.measurement}, lambda = {lam}) "
        f"-> {out} ({time.perf_counter() - t0:.0f} s)")
  return tau


def add_parsers(sub) -> None:
  """Adds ``fit-curvature`` and ``influence`` to an argparse subparsers object."""
  p = sub.add_parser(
      "fit-curvature", help="fit K-FAC / EK-FAC / diagonal / dense / sketched / low-rank GGN "
                            "curvature of a run's "
                            "training loss",
      description=workflow.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  flags.run_dir(p)
  p.add_argument("--out", required=True, help="curvature directory to write")
  p.add_argument("--approx", choices=CURVATURES, default="kfac", help="default: %(default)s")
  p.add_argument("--weight-sharing", choices=("expand", "reduce"), default="expand",
                 help="K-FAC approximation for conv/attention layers (K-FAC, EK-FAC's basis; "
                      "default: %(default)s)")
  flags.draws(p)
  p.add_argument("--damping", type=flags.nonneg_float,
                 help="default lambda stored with the curvature (default: 0.1 x the mean "
                      "eigenvalue, per block)")
  p.add_argument("--estimation-mode", choices=ESTIMATION_MODES, default=DEFAULT_ESTIMATION_MODE,
                 help="how G is sampled (default: %(default)s)")
  p.add_argument("--num-samples", type=flags.positive_int,
                 help="random output vectors per example-draw (default: 1; 16 for --approx "
                      "sketch)")
  p.add_argument("--sketch-dim", type=flags.positive_int, default=4096,
                 help="k of --approx sketch: G is fitted in a random k-dimensional subspace "
                      "(default: %(default)s)")
  p.add_argument("--rank", type=flags.positive_int, default=256,
                 help="r of --approx low_rank: the top-r eigenpairs of G by Lanczos "
                      "(default: %(default)s)")
  p.add_argument("--sketch-projection", choices=PROJECTION_KINDS, default="sparse",
                 help="the random P of --approx sketch (default: %(default)s, 4 non-zeros "
                      "per row)")
  p.add_argument("--seed", type=int, default=0, help="seed of the sampled estimation modes")
  p.add_argument("--batch-size", type=flags.positive_int, default=64,
                 help="examples (each with all K draws) per K-FAC update (default: %(default)s)")
  p.add_argument("--grad-batch-size", type=flags.positive_int,
                 help="examples per per-example-gradient pass of EK-FAC / diagonal (default: "
                      "the most whose K x P gradients fit 1 GiB)")
  p.add_argument("--chunk-size", type=flags.positive_int, help="GGN rows per vmap in those passes")
  p.add_argument("--max-dense-params", type=flags.positive_int, default=MAX_DENSE_PARAMS,
                 help="largest P --approx dense accepts (default: %(default)s)")
  flags.wrt(p, help=flags.WRT_HELP.replace("attribute", "fit the curvature", 1)
            + "; recorded with the curvature, which `jattr influence` then uses")
  p.add_argument("--overwrite", action="store_true", help="replace a curvature in --out")
  flags.quiet(p)
  p.set_defaults(func=cmd_fit_curvature)

  p = sub.add_parser(
      "influence", help="influence scores tau [Q, N] of a run's samples from a fitted curvature",
      description=workflow.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  flags.run_dir(p)
  p.add_argument("--curvature", required=True, help="directory made by `jattr fit-curvature`")
  p.add_argument("--measurement", choices=MEASUREMENTS, default="loss",
                 help="query measurement m_q (default: %(default)s)")
  p.add_argument("--time", type=flags.nonneg_int, help="timestep of --measurement loss_at_time")
  flags.queries(p, "samples")
  p.add_argument("--damping", type=flags.nonneg_float,
                 help="lambda (default: the curvature's stored default)")
  p.add_argument("--tile-size", type=flags.positive_int, default=256,
                 help="training examples per gradient tile (default: %(default)s)")
  p.add_argument("--chunk-size", type=flags.positive_int,
                 help="examples per vmap (default: the most whose gradients fit 1 GiB)")
  flags.wrt(p, help="regular expression on parameter paths of the gradients (default: the "
                    "selection the curvature was fitted with; another one is refused)")
  p.add_argument("--out", required=True, help="output .npz")
  flags.quiet(p)
  p.set_defaults(func=cmd_influence)
