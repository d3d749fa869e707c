"""The ``jattr`` command line: argparse only, over ``jattr.runs`` and ``jattr.bench``.

    jattr run      [--out DIR] [--config FILE] [flags]   train, sample, attribute (README job)
    jattr train    [--out DIR] [--config FILE] [flags]   train (resumes if interrupted)
    jattr sample   --run DIR [--num N] [--seed S]        generate a grid from a run
    jattr attribute --run DIR                            D-TRAK report for the samples
    jattr fit-curvature / influence                      curvature on disk, influence scores
    jattr featurize / score                              feature stores, scores from them
    jattr mucs                                           unlearning attribution
    jattr lds / counterfactual                           the benchmark harness
    jattr report   --scores FILE [--run DIR]             HTML report of any score file

Every command takes ``--help``, and ``--devices D`` (or ``all``): run its
example loops and retraining split over D devices (a ``jax.sharding`` mesh,
docs/devices.md; the default is one device). A command that fails prints one line,
``jattr CMD: error: …`` naming the flag, key or path and what is wrong, and exits
with status 2; ``jattr --debug CMD …`` (or ``JATTR_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from jattr import devices
from jattr.cli import curvature, features, flags, lds, mucs, report, run
from jattr.cli.errors import EXPECTED, debug_enabled, message


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jattr", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--debug", action="store_true",
                      help="print the traceback of an error (also: JATTR_DEBUG=1)")
  sub = parser.add_subparsers(dest="command", required=True)
  for module in (run, curvature, mucs, features, lds, report):
    module.add_parsers(sub)
  for command in sub.choices.values():  # `jattr CMD --debug` works too
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="print the traceback of an error (also: JATTR_DEBUG=1)")
    if not any("--devices" in a.option_strings for a in command._actions):  # noqa: SLF001
      command.add_argument("--devices", default=None, type=flags.devices_count, metavar="D|all",
                           help="split the work over D devices (a jax.sharding mesh; "
                                "docs/devices.md); default: one device")
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs one command; returns its exit status (0, or 2 with one line on stderr).

  Flags are checked by argparse (a bad flag value exits 2 with argparse's usage
  line), then the command checks everything else before it writes anything.
  """
  try:
    args = build_parser().parse_args(argv)
  except SystemExit as e:  # --help, or argparse refused a flag (it printed why)
    return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
  try:
    with devices.use_mesh(devices.mesh_of(getattr(args, "devices", None))):
      args.func(args)
  except EXPECTED as e:
    if debug_enabled(args.debug):
      traceback.print_exc()
    print(f"jattr {args.command}: error: {message(e)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
