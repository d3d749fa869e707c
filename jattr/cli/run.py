"""``jattr run``, ``train``, ``sample``, ``attribute``: the run-directory commands."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

from jattr.cli import flags
from jattr.cli.progress import progress_for
from jattr.io import guard
from jattr.models import config_by_name
from jattr.runs import RunConfig, attribute_run, load_config, sample_run, train_run


# RunConfig key -> the flag that sets it (for messages about a flag's value).
FLAG_OF = {"dataset": "--dataset", "data_dir": "--data-dir", "num_train": "--num-train",
           "image_size": "--image-size", "num_timesteps": "--timesteps", "seed": "--seed",
           "num_samples": "--num-samples", "sampler": "--sampler", "model": "--model",
           "num_steps": "--steps", "batch_size": "--batch-size", "learning_rate": "--lr"}


def config_from_args(args) -> RunConfig:
  """The ``RunConfig`` of ``--config`` (or the default), with the given flags applied.

  Raises:
    ValueError: the config file or a flag's value is refused (the message names the
      file and key, or the flag).
  """
  cfg = load_config(args.config) if args.config else RunConfig()
  top = {"dataset": args.dataset, "data_dir": args.data_dir, "num_train": args.num_train,
         "image_size": args.image_size, "num_timesteps": args.timesteps, "seed": args.seed,
         "num_samples": args.num_samples, "sampler": args.sampler}
  tr = {"num_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr}
  tr = {k: v for k, v in tr.items() if v is not None}
  try:
    cfg = dataclasses.replace(cfg, **{k: v for k, v in top.items() if v is not None})
    if args.model:
      try:
        cfg = dataclasses.replace(cfg, model=config_by_name(args.model))
      except ValueError as e:
        raise ValueError(f"--model {args.model!r}: {e}") from None
    if tr:
      cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **tr))
    if getattr(args, "wrt", None) is not None:
      cfg = dataclasses.replace(cfg, attribution=dataclasses.replace(cfg.attribution,
                                                                     wrt=args.wrt))
  except guard.ConfigError as e:
    flag = FLAG_OF.get(e.key)
    given = f" (with the flags given, on {args.config})" if args.config else ""
    raise ValueError(f"{flag}{e.problem}" if flag else f"{e}{given}") from None
  return cfg


def cmd_train(args) -> dict:
  cfg = config_from_args(args)
  t0 = time.perf_counter()
  train_run(cfg, args.out, progress=progress_for(args))
  summary = json.loads((pathlib.Path(args.out) / "train_summary.json").read_text())
  print(f"trained {summary['num_params']:,}-parameter UNet on {summary['num_train']} "
        f"{cfg.dataset} images for {cfg.train.num_steps} steps in {time.perf_counter() - t0:.0f} s;"
        f" final loss {summary['final_loss_mean_last_100']:.4f}; checkpoint in "
        f"{pathlib.Path(args.out) / 'checkpoints'}")
  return summary


def cmd_sample(args) -> None:
  t0 = time.perf_counter()
  x, png = sample_run(args.run, num=args.num, seed=args.seed)
  print(f"{len(x)} samples in {time.perf_counter() - t0:.0f} s -> {png}")


def cmd_attribute(args) -> None:
  guard.check_writable(args.run, "--run")  # the report goes into the run directory
  t0 = time.perf_counter()
  page = attribute_run(args.run, progress=progress_for(args), wrt=getattr(args, "wrt", None))
  print(f"attributed samples in {time.perf_counter() - t0:.0f} s; report: {page}")


def cmd_run(args) -> None:
  cmd_train(args)
  args.run, args.num, args.seed, args.wrt = args.out, None, None, None  # wrt: in the config
  cmd_sample(args)
  cmd_attribute(args)


def add_parsers(sub) -> None:
  """Adds ``run``, ``train``, ``sample`` and ``attribute`` to an argparse subparsers object."""
  p = sub.add_parser("run", help="train + sample + attribute on the default digits data")
  flags.run_config(p)
  p.set_defaults(func=cmd_run)
  p = sub.add_parser("train", help="train a denoiser (resumes an interrupted run)")
  flags.run_config(p)
  p.set_defaults(func=cmd_train)
  p = sub.add_parser("sample", help="generate samples from a trained run")
  flags.run_dir(p)
  p.add_argument("--num", type=flags.positive_int,
                 help="number of samples (default: the run's config)")
  p.add_argument("--seed", type=int, help="sampler seed (default: the run's config)")
  p.set_defaults(func=cmd_sample)
  p = sub.add_parser("attribute", help="attribute a run's samples (D-TRAK) and write a report")
  flags.run_dir(p)
  flags.wrt(p, help=flags.WRT_HELP.replace("default: all parameters", "default: the run "
                                           "config's attribution.wrt, else all parameters"))
  flags.quiet(p)
  p.set_defaults(func=cmd_attribute)


