"""``jattr lds`` and ``jattr counterfactual``: the benchmark harness (``jattr.bench``)."""

from __future__ import annotations

import errno
import pathlib

from jattr.bench import METHODS, load_config, run_counterfactual, run_lds
from jattr.bench.drivers import with_overrides
from jattr.cli import flags
from jattr.cli.progress import progress_for
from jattr.io import guard


def parse_scores(items) -> dict:
  """``["NAME=PATH.npz", ...]`` → ``{NAME: PATH}``."""
  out = {}
  for item in items or []:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--scores must look like NAME=PATH.npz, got {item!r}")
    out[name] = path
  return out


def _config(args) -> dict:
  """The experiment config with the flags applied, its outputs checked before any work.

  The cache root must be writable (or creatable) and the results record's path must
  not be a directory; ``--scores`` files must exist.
  """
  config = with_overrides(load_config(args.config), cache_root=args.cache_root,
                          data_dir=args.data_dir, devices=args.devices)
  flag = "--cache-root" if args.cache_root else f"cache_root of {args.config}"
  guard.check_writable(config.get("cache_root", "runs/lds_cache"), flag)
  results = args.results or config.get("results")
  if results:
    results = pathlib.Path(results)
    if results.is_dir():
      raise ValueError(f"--results {results} is a directory; give the path of the JSON "
                       f"record to write")
    guard.check_writable(results.parent, "--results" if args.results else
                         f"results of {args.config}")
  scores = args.scores if isinstance(args.scores, list) else [args.scores] if args.scores else []
  for item in scores:
    path = pathlib.Path(item.partition("=")[2] or item)
    if not path.is_file():
      raise FileNotFoundError(errno.ENOENT, "--scores file not found", str(path))
  return config


def cmd_lds(args) -> dict:
  scores = parse_scores(args.scores)
  return run_lds(_config(args), methods=args.method, scores=scores,
                 results_path=args.results, progress=progress_for(args), wrt=args.wrt)


def cmd_counterfactual(args) -> dict:
  config = _config(args)
  if args.chosen_from:
    guard.read_json(args.chosen_from, "`jattr lds` results record")
  return run_counterfactual(config, method=args.method, scores=args.scores,
                            chosen_from=args.chosen_from, num_queries=args.num_queries,
                            ks=args.ks, random_seed=args.random_seed,
                            results_path=args.results, progress=progress_for(args),
                            wrt=args.wrt)


def add_parsers(sub) -> None:
  """Adds ``lds`` and ``counterfactual`` to an argparse subparsers object."""
  p = sub.add_parser(
      "lds", help="linear datamodeling score of attribution methods (builds/reuses the cache)",
      description="Builds (or reuses) the retrained-subset cache of a config and prints LDS "
                  "on test real and generated queries, with bootstrap intervals and the "
                  "noise ceiling. Hyper-parameters are selected on validation queries only.")
  flags.experiment_config(p)
  p.add_argument("--method", action="append", default=None, choices=sorted(METHODS),
                 help="method to score (repeatable; default: the config's methods)")
  p.add_argument("--scores", action="append", default=[], metavar="NAME=PATH.npz",
                 help="precomputed scores: .npz with validation/test/generated [Q, N]")
  p.set_defaults(func=cmd_lds)

  p = sub.add_parser(
      "counterfactual", help="retrain without the top-k attributed examples and regenerate",
      description="For the first generated queries of the config's cache, removes the top-k "
                  "attributed (and k random) training examples, retrains with the same "
                  "recipe and seed, regenerates from the same noise, and reports the change.")
  flags.experiment_config(p)
  p.add_argument("--method", default=None, choices=sorted(METHODS),
                 help="attribution method (default: the config's counterfactual.method)")
  p.add_argument("--scores", default=None, metavar="PATH.npz",
                 help="precomputed scores (.npz with a 'generated' [Q, N] array)")
  p.add_argument("--num-queries", type=flags.positive_int, default=None)
  p.add_argument("--ks", type=flags.positive_int, nargs="+", default=None)
  p.add_argument("--random-seed", type=int, default=None)
  p.add_argument("--chosen-from", default=None, metavar="RESULTS.json",
                 help="take the method's hyper-parameters from a `jattr lds` record (chosen "
                      "on validation there) instead of re-running its validation grid")
  p.set_defaults(func=cmd_counterfactual)
