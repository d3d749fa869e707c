"""Paired LDS differences between methods of one `jattr lds` results record.

    python experiments/digits_lds/paired.py runs/digits_lds/results.json \
        --pair trak_sparse_s2:trak --pair dtrak_mean_sparse_s2:dtrak_mean

For each ``A:B`` and each reported split: LDS(A) − LDS(B) on the same queries, the
mean per-query difference with its 95% bootstrap interval
(``jattr.eval.lds.paired_difference``). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys

from jattr.eval.lds import LdsResult, paired_difference


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("results", help="a `jattr lds` results JSON")
  p.add_argument("--pair", action="append", required=True, metavar="A:B")
  p.add_argument("--splits", default="test,generated")
  args = p.parse_args(argv)
  with open(args.results) as f:
    reports = {r["method"]: r for r in json.load(f)["reports"]}
  splits = args.splits.split(",")
  print("| A − B | " + " | ".join(f"{s}: paired difference [95%]" for s in splits) + " |")
  print("|---|" + "---|" * len(splits))
  for pair in args.pair:
    a, b = pair.split(":")
    missing = [m for m in (a, b) if m not in reports]
    if missing:
      p.error(f"{args.results} has no report for {missing}; it has {sorted(reports)}")
    cells = []
    for s in splits:
      d = paired_difference(LdsResult.from_dict(reports[a]["results"][s]),
                            LdsResult.from_dict(reports[b]["results"][s]))
      cells.append(f"{d.mean:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}]")
    print(f"| {a} − {b} | " + " | ".join(cells) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
