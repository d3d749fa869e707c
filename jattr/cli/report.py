"""``jattr report``: the attribution report of any score file over a run."""

from __future__ import annotations

import time

from jattr.cli import flags
from jattr.runs import report_run


def cmd_report(args) -> None:
  t0 = time.perf_counter()
  page = report_run(args.run, args.scores, queries=args.queries, key=args.key, out=args.out,
                    top_k=args.top_k, page_size=args.page_size)
  print(f"report in {time.perf_counter() - t0:.0f} s: {page}")


def add_parsers(sub) -> None:
  """Adds ``report`` to an argparse subparsers object."""
  p = sub.add_parser(
      "report", help="write the HTML attribution report of a score file (.npz with tau [Q, N])",
      description="Rebuilds the attribution report (index.html, one page and PNG per query, "
                  "scores.npz) from any score matrix over the run's training set: the "
                  "output of jattr score, influence, mucs or attribute, or an array of a "
                  "jattr lds --scores file (--key). See docs/report.md.")
  p.add_argument("--scores", required=True, metavar="FILE.npz",
                 help="score file holding tau [Q, N] (Q queries x N training images)")
  flags.run_dir(p)
  flags.queries(p, "samples")
  p.add_argument("--key", default="tau", help="the array of scores in the file (default: tau)")
  p.add_argument("--out", default=None,
                 help="report folder (default: <run>/reports/<scores file stem>)")
  p.add_argument("--top-k", type=int, default=None,
                 help="proponents, opponents and neighbours per query (default: the run's "
                      "attribution.top_k)")
  p.add_argument("--page-size", type=int, default=100, help="index rows per page (default: 100)")
  p.set_defaults(func=cmd_report)
