"""The ``jattr`` command line: argparse only, over ``jattr.runs`` and ``jattr.bench``.

    jattr run      [--out DIR] [--config FILE] [flags]   train, sample, attribute (README job)
    jattr train    [--out DIR] [--config FILE] [flags]   train (resumes if interrupted)
    jattr sample   --run DIR [--num N] [--seed S]        generate a grid from a run
    jattr attribute --run DIR                            D-TRAK report for the samples
    jattr fit-curvature / influence                      curvature on disk, influence scores
    jattr featurize / score                              feature stores, scores from them
    jattr mucs                                           unlearning attribution
    jattr lds / counterfactual                           the benchmark harness

Every command takes ``--help``.
"""

from __future__ import annotations

import argparse
import sys

from jattr.cli import curvature, features, lds, mucs, run


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jattr", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for module in (run, curvature, mucs, features, lds):
    module.add_parsers(sub)
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
