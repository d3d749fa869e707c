"""The digits LDS benchmark (and its Fashion-MNIST / CIFAR-2 variants): a thin driver.

    python experiments/digits_lds/main.py                                  # digits, LDS table
    python experiments/digits_lds/main.py --config experiments/digits_lds/config_cifar2_small.json
    python experiments/digits_lds/main.py --counterfactual                 # + counterfactual

Run from the repository root. Builds (or reuses) the retrained-subset cache under
the config's ``cache_root``, prints the LDS table with noise ceilings and writes the
record to the config's ``results``. All the substance is in ``jattr.eval`` and
``jattr.bench``; see docs/evaluation.md.
"""

import argparse
import pathlib

from jattr import bench
from jattr.cli.progress import TqdmProgress

HERE = pathlib.Path(__file__).resolve().parent


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(HERE / "config_digits.json"))
  parser.add_argument("--counterfactual", action="store_true",
                      help="also run the config's counterfactual evaluation")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args()
  config = bench.load_config(args.config)
  progress = None if args.no_progress else TqdmProgress()
  bench.run_lds(config, progress=progress)
  if args.counterfactual:
    bench.run_counterfactual(config, progress=progress)


if __name__ == "__main__":
  main()
