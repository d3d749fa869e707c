"""The digits LDS benchmark (and its Fashion-MNIST / CIFAR-2 variants): a thin driver.

    python experiments/digits_lds/main.py                                  # digits, LDS table
    python experiments/digits_lds/main.py --config experiments/digits_lds/config_cifar2_small.json
    python experiments/digits_lds/main.py --counterfactual                 # + counterfactual

Run from the repository root. Builds (or reuses) the retrained-subset cache under
the config's ``cache_root``, prints the LDS table with noise ceilings and writes the
record to the config's ``results``. All the substance is in ``jattr.eval`` and
``jattr.io.lds_cache``; see docs/evaluation.md.
"""

import argparse
import pathlib

from jattr.eval import cli

HERE = pathlib.Path(__file__).resolve().parent


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(HERE / "config_digits.json"))
  parser.add_argument("--counterfactual", action="store_true",
                      help="also run the config's counterfactual evaluation")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args()
  config = cli.load_config(args.config)
  cli.run_lds(config, progress=not args.no_progress)
  if args.counterfactual:
    cli.run_counterfactual(config, progress=not args.no_progress)


if __name__ == "__main__":
  main()
