"""``jattr run``, ``train``, ``sample``, ``attribute``: the run-directory commands."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np

from jattr.cli import flags
from jattr.cli.progress import progress_for
from jattr.io import guard
from jattr.models import config_by_name
from jattr.runs import RunConfig, attribute_run, load_config, sample_run, train_run
from jattr.runs.config import LatentConfig
from jattr.runs.run import pixel_data, training_data


# RunConfig key -> the flag that sets it (for messages about a flag's value).
FLAG_OF = {"dataset": "--dataset", "data_dir": "--data-dir", "num_train": "--num-train",
           "image_size": "--image-size", "num_timesteps": "--timesteps", "seed": "--seed",
           "num_samples": "--num-samples", "sampler": "--sampler", "model": "--model",
           "num_steps": "--steps", "batch_size": "--batch-size", "learning_rate": "--lr",
           "guidance_scale": "--guidance-scale"}


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
    if getattr(args, "latent", None):
      cfg = latent_config(cfg)
    if getattr(args, "conditional", None):
      cfg = conditional_config(cfg)
    if getattr(args, "guidance_scale", None) is not None:
      cfg = dataclasses.replace(cfg, guidance_scale=args.guidance_scale)
    if getattr(args, "wrt", None) is not None:
      cfg = dataclasses.replace(cfg, attribution=dataclasses.replace(cfg.attribution,
                                                                     wrt=args.wrt))
  except guard.ConfigError as e:
    flag = FLAG_OF.get(e.key)
    given = f" (with the flags given, on {args.config})" if args.config else ""
    raise ValueError(f"{flag}{e.problem}" if flag else f"{e}{given}") from None
  return cfg


def conditional_config(cfg: RunConfig) -> RunConfig:
  """``cfg`` made class-conditional (``--conditional``): the UNet's ``num_classes`` from
  the data's labels (max + 1), and condition dropout 0.1 for guidance unless the
  recipe sets one."""
  if cfg.conditional:
    return cfg
  ds, _ = training_data(cfg)
  num_classes = int(np.max(ds.y)) + 1
  train_cfg = cfg.train
  if train_cfg.cond_dropout == 0.0:
    train_cfg = dataclasses.replace(train_cfg, cond_dropout=0.1)
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes),
                             train=train_cfg)


def latent_config(cfg: RunConfig, latent: LatentConfig | None = None) -> RunConfig:
  """``cfg`` made a latent run (``--latent``): ``latent`` (default: the config's own
  latent section, else ``LatentConfig()``), and the UNet's ``image_shape`` set to the
  latent shape of the run's images (H/f, W/f, latent_channels).

  Raises:
    ValueError: the autoencoder does not take the run's images (H or W not divisible
      by its downsampling).
  """
  latent = latent or cfg.latent or LatentConfig()
  ds, _ = pixel_data(cfg)
  try:
    shape = latent.latent_shape(ds.shape)
  except ValueError as e:
    raise ValueError(f"--latent: the autoencoder does not take the run's {ds.shape} images: "
                     f"{e}") from None
  return dataclasses.replace(cfg, latent=latent,
                             model=dataclasses.replace(cfg.model, image_shape=shape))


def cmd_train(args) -> dict:
  cfg = config_from_args(args)
  t0 = time.perf_counter()
  train_run(cfg, args.out, progress=progress_for(args))
  summary = json.loads((pathlib.Path(args.out) / "train_summary.json").read_text())
  space = "" if cfg.latent is None else (
      f" (latents {'×'.join(map(str, cfg.model.image_shape))} of an autoencoder with "
      f"reconstruction MSE {summary['latent']['autoencoder_reconstruction_mse']:.4f})")
  print(f"trained {summary['num_params']:,}-parameter UNet on {summary['num_train']} "
        f"{cfg.dataset} images{space} for {cfg.train.num_steps} steps in {time.perf_counter() - t0:.0f} s;"
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
  p = sub.add_parser("attribute", help="attribute a run's samples (sketched-GGN influence or "
                                        "(D-)TRAK) and write a report")
  flags.run_dir(p)
  flags.wrt(p, help=flags.WRT_HELP.replace("default: all parameters", "default: the run "
                                           "config's attribution.wrt, else all parameters"))
  flags.quiet(p)
  p.set_defaults(func=cmd_attribute)


