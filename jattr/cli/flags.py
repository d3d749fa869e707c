"""Flags shared by several ``jattr`` subcommands, defined once."""

from __future__ import annotations

import argparse

from jattr.runs import QUERIES

DEFAULT_RUN = "runs/digits"


def run_dir(p: argparse.ArgumentParser, name: str = "--run") -> None:
  """The run directory a command reads."""
  p.add_argument(name, default=DEFAULT_RUN, help="run directory (default: %(default)s)")


def quiet(p: argparse.ArgumentParser) -> None:
  p.add_argument("--quiet", action="store_true", help="no progress bars")


def queries(p: argparse.ArgumentParser, default: str) -> None:
  """Which of the run's examples: ``jattr.runs.QUERIES``."""
  p.add_argument("--queries", choices=QUERIES, default=default,
                 help="the run's samples.npz, held-out real images (test) or its training "
                      "images (default: %(default)s)")


def draws(p: argparse.ArgumentParser, *, defaults: bool = True) -> None:
  """K fixed (t, ε) draws: ``--num-draws``, ``--timesteps``, ``--draw-seed``.

  With ``defaults=False`` they default to None (filled from elsewhere, e.g. a
  ``--like`` store).
  """
  p.add_argument("--num-draws", type=int, default=10 if defaults else None,
                 help="K fixed (t, eps) draws (default: 10)")
  p.add_argument("--timesteps", choices=("uniform", "random"),
                 default="uniform" if defaults else None,
                 help="timesteps of the draws (default: uniform)")
  p.add_argument("--draw-seed", type=int, default=0 if defaults else None,
                 help="seed of the draws (default: 0)")


def run_config(p: argparse.ArgumentParser, default_out: str = DEFAULT_RUN) -> None:
  """The flags of ``jattr run`` / ``jattr train``, each overriding the ``--config`` file."""
  p.add_argument("--out", default=default_out, help="run directory (default: %(default)s)")
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
  quiet(p)


def experiment_config(p: argparse.ArgumentParser) -> None:
  """The flags of ``jattr lds`` / ``jattr counterfactual``."""
  p.add_argument("--config", required=True, help="experiment config (JSON)")
  p.add_argument("--cache-root", default=None, help="override the config's cache_root")
  p.add_argument("--data-dir", default=None, help="override the config's data_dir")
  p.add_argument("--results", default=None, help="where to write the JSON record")
  p.add_argument("--no-progress", action="store_true", help="hide progress bars")
