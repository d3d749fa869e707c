"""The ``jattr`` command line: thin wrappers over ``jattr.runs`` and the library.

    jattr run      [--out DIR] [--config FILE] [flags]   train, sample, attribute (README job)
    jattr train    [--out DIR] [--config FILE] [flags]   train (resumes if interrupted)
    jattr sample   --run DIR [--num N] [--seed S]        generate a grid from a run
    jattr attribute --run DIR                            D-TRAK report for the samples
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

from jattr.train import TrainConfig

DEFAULT_OUT = "runs/digits"


def _add_run_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--out", default=DEFAULT_OUT, help="run directory (default: %(default)s)")
  p.add_argument("--config", help="JSON RunConfig file; flags below override it")
  p.add_argument("--dataset", help="digits | fashion_mnist | cifar2 | olivetti")
  p.add_argument("--data-dir", help="folder of the real datasets (default: $JATTR_DATA)")
  p.add_argument("--num-train", type=int, help="train on a seeded random subset of this size")
  p.add_argument("--image-size", type=int, help="resize images to this square size")
  p.add_argument("--model", help="UNet preset: digits | fashion_mnist | cifar | cifar_30m")
  p.add_argument("--steps", type=int, help="optimizer steps")
  p.add_argument("--batch-size", type=int)
  p.add_argument("--lr", type=float, help="learning rate")
  p.add_argument("--timesteps", type=int, help="diffusion steps T")
  p.add_argument("--seed", type=int, help="model seed")
  p.add_argument("--num-samples", type=int)
  p.add_argument("--sampler", choices=["ddpm", "ddim"])
  p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args) -> "RunConfig":  # noqa: F821
  from jattr.models import config_by_name
  from jattr.runs import RunConfig, load_config

  cfg = load_config(args.config) if args.config else RunConfig()
  top = {"dataset": args.dataset, "data_dir": args.data_dir, "num_train": args.num_train,
         "image_size": args.image_size, "num_timesteps": args.timesteps, "seed": args.seed,
         "num_samples": args.num_samples, "sampler": args.sampler}
  cfg = dataclasses.replace(cfg, **{k: v for k, v in top.items() if v is not None})
  if args.model:
    cfg = dataclasses.replace(cfg, model=config_by_name(args.model))
  tr = {"num_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr}
  tr = {k: v for k, v in tr.items() if v is not None}
  if tr:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **tr))
  return cfg


def cmd_train(args) -> dict:
  from jattr import runs

  cfg = config_from_args(args)
  t0 = time.perf_counter()
  runs.train_run(cfg, args.out, progress=not args.quiet)
  summary = json.loads((pathlib.Path(args.out) / "train_summary.json").read_text())
  print(f"trained {summary['num_params']:,}-parameter UNet on {summary['num_train']} "
        f"{cfg.dataset} images for {cfg.train.num_steps} steps in {time.perf_counter() - t0:.0f} s;"
        f" final loss {summary['final_loss_mean_last_100']:.4f}; checkpoint in "
        f"{pathlib.Path(args.out) / 'checkpoints'}")
  return summary


def cmd_sample(args) -> None:
  from jattr import runs

  t0 = time.perf_counter()
  x, png = runs.sample_run(args.run, num=args.num, seed=args.seed)
  print(f"{len(x)} samples in {time.perf_counter() - t0:.0f} s -> {png}")


def cmd_attribute(args) -> None:
  from jattr import runs

  t0 = time.perf_counter()
  page = runs.attribute_run(args.run, progress=not getattr(args, "quiet", False))
  print(f"attributed samples in {time.perf_counter() - t0:.0f} s; report: {page}")


def cmd_run(args) -> None:
  cmd_train(args)
  args.run, args.num, args.seed = args.out, None, None
  cmd_sample(args)
  cmd_attribute(args)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jattr", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("run", help="train + sample (+ attribute) on the default digits data")
  _add_run_flags(p)
  p.set_defaults(func=cmd_run)
  p = sub.add_parser("train", help="train a denoiser (resumes an interrupted run)")
  _add_run_flags(p)
  p.set_defaults(func=cmd_train)
  p = sub.add_parser("sample", help="generate samples from a trained run")
  p.add_argument("--run", default=DEFAULT_OUT, help="run directory (default: %(default)s)")
  p.add_argument("--num", type=int, help="number of samples (default: the run's config)")
  p.add_argument("--seed", type=int, help="sampler seed (default: the run's config)")
  p.set_defaults(func=cmd_sample)
  p = sub.add_parser("attribute", help="attribute a run's samples (D-TRAK) and write a report")
  p.add_argument("--run", default=DEFAULT_OUT, help="run directory (default: %(default)s)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(func=cmd_attribute)
  from jattr.curvature import cli as curvature_cli
  curvature_cli.add_fit_curvature_parser(sub)
  curvature_cli.add_influence_parser(sub)
  from jattr.methods import unlearning_cli
  unlearning_cli.add_mucs_parser(sub)
  from jattr.features import cli as features_cli
  features_cli.add_featurize_parser(sub)
  features_cli.add_score_parser(sub)
  from jattr.eval import cli as eval_cli
  eval_cli.add_lds_parser(sub)
  eval_cli.add_counterfactual_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except (FileNotFoundError, ValueError) as e:
    print(f"jattr {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
