"""Flags shared by several ``jattr`` subcommands, defined once, and the value types
every numeric flag is parsed with (``positive_int``, ``finite_float``, …): a bad
value (``--num-train 0``, ``--lr nan``) exits with status 2 and one line naming the
flag, before the command starts."""

from __future__ import annotations

import argparse
import math
import pathlib
import re

from jattr.data import DATASET_NAMES
from jattr.runs import QUERIES

DEFAULT_RUN = "runs/digits"


def _integer(text: str, low: int | None) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
  if low is not None and value < low:
    raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
  return value


def _number(text: str, low: float | None, strict: bool = False) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  if low is not None and (value <= low if strict else value < low):
    raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {low:g}, "
                                     f"got {text!r}")
  return value


def positive_int(text: str) -> int:
  """An argparse type: an integer >= 1."""
  return _integer(text, 1)


def nonneg_int(text: str) -> int:
  """An argparse type: an integer >= 0."""
  return _integer(text, 0)


def finite_float(text: str) -> float:
  """An argparse type: a finite number."""
  return _number(text, None)


def nonneg_float(text: str) -> float:
  """An argparse type: a finite number >= 0."""
  return _number(text, 0.0)


def positive_float(text: str) -> float:
  """An argparse type: a finite number > 0."""
  return _number(text, 0.0, strict=True)


def non_negative_float(text: str) -> float:
  """An argparse type: a finite number >= 0."""
  return _number(text, 0.0, strict=False)


def dataset(text: str) -> str:
  """An argparse type for ``--dataset``: a built-in name as given; an existing path
  made absolute, so the run's config.json names the data wherever the run is used
  from; anything else as given, for ``RunConfig`` to refuse naming the flag."""
  if text in DATASET_NAMES:
    return text
  path = pathlib.Path(text).expanduser()
  try:
    return str(path.absolute()) if path.exists() else text
  except (OSError, ValueError):  # not a possible path: RunConfig names the problem
    return text


def regex(text: str) -> str:
  """An argparse type: a regular expression that compiles."""
  try:
    re.compile(text)
  except re.error as e:
    raise argparse.ArgumentTypeError(f"not a regular expression ({e}): {text!r}") from None
  return text


WRT_HELP = ("attribute with respect to the parameters whose paths (keys joined by '/', e.g. "
            "'up/0/conv/kernel') match this regular expression, the others held fixed "
            "(jattr.wrt; default: all parameters)")


def wrt(p: argparse.ArgumentParser, *aliases: str, help: str = WRT_HELP) -> None:
  """``--wrt REGEX``: the ``jattr.wrt`` selector of the parameters attributed with
  (``args.wrt``, None when not given). ``aliases``: older names of the same flag."""
  p.add_argument("--wrt", *aliases, dest="wrt", type=regex, default=None, metavar="REGEX",
                 help=help)


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
  p.add_argument("--num-draws", type=positive_int, default=10 if defaults else None,
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
  p.add_argument("--dataset", type=dataset, metavar="NAME|PATH",
                 help="digits | fashion_mnist | cifar2 | olivetti, or the path of your own "
                      "data: a folder of PNG/JPEG images (labels from labels.csv or "
                      "sub-folders) or an .npz/.npy file (see docs/data.md)")
  p.add_argument("--data-dir", help="folder of the built-in datasets (default: $JATTR_DATA; "
                                    "not used for a --dataset path)")
  p.add_argument("--num-train", type=positive_int,
                 help="train on a seeded random subset of this size")
  p.add_argument("--image-size", type=positive_int, help="resize images to this square size")
  p.add_argument("--model", help="UNet preset: digits | fashion_mnist | cifar | cifar_30m")
  p.add_argument("--steps", type=positive_int, help="optimizer steps")
  p.add_argument("--batch-size", type=positive_int)
  p.add_argument("--lr", type=positive_float, help="learning rate")
  p.add_argument("--timesteps", type=positive_int, help="diffusion steps T")
  p.add_argument("--seed", type=int, help="model seed")
  p.add_argument("--num-samples", type=positive_int)
  p.add_argument("--sampler", choices=["ddpm", "ddim"])
  p.add_argument("--conditional", action="store_true", default=None,
                 help="class-conditional: the UNet gets each image's label (num_classes from "
                      "the data), trains with condition dropout 0.1 (unless the config sets "
                      "one), samples each class in turn, and the report shows the classes")
  p.add_argument("--guidance-scale", type=non_negative_float,
                 help="classifier-free guidance scale of the samples (conditional runs; "
                      "default 1: plain conditional sampling)")
  p.add_argument("--latent", action="store_true", default=None,
                 help="latent diffusion: train an autoencoder on the training images first "
                      "(the config's latent section, else the default LatentConfig: 2 latent "
                      "channels, downsampling 2), then train, sample and attribute the UNet "
                      "on their latents; the report shows the decoded samples and the "
                      "training images")
  wrt(p, help=WRT_HELP.replace("attribute", "attribute the samples", 1)
      + "; sets attribution.wrt of the run config")
  quiet(p)


def devices_count(s: str):
  """``"all"`` or a positive int (argparse type of ``--devices``)."""
  if s == "all":
    return s
  return positive_int(s)


def experiment_config(p: argparse.ArgumentParser) -> None:
  """The flags of ``jattr lds`` / ``jattr counterfactual``."""
  p.add_argument("--config", required=True, help="experiment config (JSON)")
  p.add_argument("--cache-root", default=None, help="override the config's cache_root")
  p.add_argument("--data-dir", default=None, help="override the config's data_dir")
  p.add_argument("--devices", default=None, type=devices_count, metavar="D|all",
                 help="override the config's devices: split the work over D devices (a "
                      "jax.sharding mesh; docs/devices.md)")
  p.add_argument("--results", default=None, help="where to write the JSON record")
  p.add_argument("--no-progress", action="store_true", help="hide progress bars")
  wrt(p, help="score every gradient and curvature method with respect to the parameters "
              "whose paths match this regular expression (jattr.wrt; reported as "
              "'METHOD[wrt=REGEX]'; default: the methods' own, all parameters)")
