"""``jattr mucs``: unlearning attribution of a run's queries (``jattr.runs.mucs``)."""

from __future__ import annotations

import argparse

from jattr.cli import flags
from jattr.methods.mucs import MUCS_VARIANTS
from jattr.runs import mucs as workflow
from jattr.runs import mucs_run

# Flag name -> UnlearnConfig field.
CONFIG_FLAGS = {"steps": "num_steps", "lr": "learning_rate", "optimizer": "optimizer",
                "forget_weight": "forget_weight", "retain_weight": "retain_weight",
                "retain_batch": "retain_batch_size", "stop_ratio": "stop_ratio",
                "ewc_weight": "ewc_weight"}


def cmd_mucs(args):
  tau, info = mucs_run(
      args.run, args.out, variant=args.variant, queries=args.queries,
      queries_file=args.queries_file, num_queries=args.num_queries,
      config_overrides={field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items()},
      trainable=args.wrt, num_draws=args.num_draws, timesteps=args.timesteps,
      draw_seed=args.draw_seed, null_models=args.null_models, seed=args.seed,
      skew_constant=args.skew_constant, query_chunk=args.query_chunk,
      train_chunk=args.train_chunk)
  fl = info["forget_loss"]
  print(f"mucs[{args.variant}]: {tau.shape[0]} queries x {tau.shape[1]} training images in "
        f"{info['seconds']:.0f} s ({info['seconds_per_query']:.1f} s/query); L_forget "
        f"{fl[:, 0].mean():.3f} -> {fl[:, 1].mean():.3f} (L_null {info['null_loss'].mean():.3f}),"
        f" mean steps {info['steps'].mean():.1f}; -> {args.out}")
  return tau, info


def add_parsers(sub) -> None:
  """Adds ``mucs`` to an argparse subparsers object."""
  p = sub.add_parser(
      "mucs", help="attribute queries by unlearning them (MUCS, ablations, baseline)",
      description=workflow.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  flags.run_dir(p)
  p.add_argument("--out", required=True, help="output .npz")
  flags.queries(p, "samples")
  p.add_argument("--queries-file", help=".npz whose array 'x' [Q, H, W, C] holds the queries "
                                        "(overrides --queries)")
  p.add_argument("--num-queries", type=flags.positive_int, help="use only the first Q queries")
  p.add_argument("--variant", choices=MUCS_VARIANTS, default="mucs", help="default: %(default)s")
  p.add_argument("--steps", type=flags.positive_int, help="step budget per query")
  p.add_argument("--lr", type=flags.positive_float, help="learning rate")
  p.add_argument("--optimizer", choices=["adam", "sgd"])
  p.add_argument("--forget-weight", type=flags.nonneg_float, help="lambda")
  p.add_argument("--retain-weight", type=flags.nonneg_float)
  p.add_argument("--retain-batch", type=flags.positive_int,
                 help="training examples per retain batch")
  p.add_argument("--stop-ratio", type=flags.positive_float,
                 help="stop once L_forget >= ratio * L_null")
  p.add_argument("--ewc-weight", type=flags.nonneg_float,
                 help="gamma of the EWC penalty (baseline)")
  flags.wrt(p, "--trainable", help="regex on parameter paths that may move: the parameters "
                                  "attributed with (jattr.wrt; default: all)")
  flags.draws(p)
  p.add_argument("--null-models", type=flags.positive_int, default=4,
                 help="freshly initialised models averaged for L_null (default: %(default)s)")
  p.add_argument("--seed", type=int, default=0, help="seed of the retain batches and L_null")
  p.add_argument("--skew-constant", type=flags.positive_float, default=1e-6)
  p.add_argument("--query-chunk", type=flags.positive_int, default=8,
                 help="queries unlearned at once (vmap)")
  p.add_argument("--train-chunk", type=flags.positive_int, default=64,
                 help="training examples per chunk")
  p.set_defaults(func=cmd_mucs)
