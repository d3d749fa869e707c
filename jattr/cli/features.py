"""``jattr featurize`` and ``jattr score`` (``jattr.runs.features``)."""

from __future__ import annotations

import argparse
import time

from jattr.cli import flags
from jattr.cli.progress import progress_for
from jattr.features.projection import GRAD_DTYPES, PROJECTION_KINDS
from jattr.io import guard
from jattr.io.feature_store import DTYPE, DTYPES
from jattr.runs import SCORE_METHODS, SPEC_DEFAULTS, featurize_run, score_stores, write_scores
from jattr.runs import features as workflow


def _processes(args) -> dict:
  """``featurize_run``'s process_index / process_count from the flags."""
  if (args.process_index is None) != (args.process_count is None):
    raise ValueError("--process-index and --process-count go together (this process's share "
                     "of the store: index p of P)")
  if args.process_index is not None and args.process_index >= args.process_count:
    raise ValueError(f"--process-index {args.process_index}: expected an index in [0, "
                     f"--process-count {args.process_count})")
  return {"process_index": args.process_index, "process_count": args.process_count}


def cmd_featurize(args):
  t0 = time.perf_counter()
  spec = {k: getattr(args, k) for k in SPEC_DEFAULTS}
  store = featurize_run(args.run, args.out, queries=args.queries, like=args.like,
                        chunk_size=args.chunk_size, store_chunk_rows=args.store_chunk_rows,
                        store_dtype=args.store_dtype, progress=progress_for(args),
                        wait_s=args.wait, **_processes(args), **spec)
  c = store.config
  share = ("" if store.complete else f"; {len(store.completed_chunks())} of "
           f"{store.num_chunks} chunks complete, the others' processes still to run")
  print(f"{store.num_rows} {args.queries} features (k={store.dim}, f={c['measurement']['name']}, "
        f"K={c['draws']['num_draws']}) in {store.path}{share} "
        f"({time.perf_counter() - t0:.0f} s)")
  return store


def cmd_score(args):
  guard.check_output_file(args.out, "--out", kind="score", keys=workflow.SCORE_KEYS)
  t0 = time.perf_counter()
  tau, info = score_stores(args.train_store, args.query_store, args.method,
                           damping=args.damping, relative_damping=args.relative_damping)
  out = write_scores(args.out, tau, info)
  print(f"tau {tau.shape} ({args.method}) -> {out} ({time.perf_counter() - t0:.0f} s)")
  return tau


def add_parsers(sub) -> None:
  """Adds ``featurize`` and ``score`` to an argparse subparsers object."""
  p = sub.add_parser(
      "featurize", help="projected per-example gradients of a run into a feature store",
      description=workflow.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  flags.run_dir(p)
  p.add_argument("--out", required=True, help="feature store directory (created or resumed)")
  flags.queries(p, "train")
  p.add_argument("--like", help="train feature store whose measurement, draws and "
                                "projection to reuse (for query stores)")
  p.add_argument("--measurement", help="output function f (default: square_norm)")
  p.add_argument("--time", type=flags.nonneg_int, help="timestep of --measurement loss_at_time")
  flags.draws(p, defaults=False)
  p.add_argument("--proj-dim", type=flags.positive_int,
                 help="k, projected dimension (default: 4096)")
  p.add_argument("--proj-kind", choices=PROJECTION_KINDS, help="default: rademacher")
  p.add_argument("--proj-seed", type=int, help="seed of the projection (default: 0)")
  p.add_argument("--proj-nonzeros", type=flags.positive_int,
                 help="non-zeros per row of a --proj-kind sparse P (default: 2; --proj-dim "
                      "must be a multiple)")
  p.add_argument("--block-size", type=flags.positive_int,
                 help="rows of P regenerated at a time (default: 1024)")
  p.add_argument("--grad-dtype", choices=GRAD_DTYPES,
                 help="compute the per-example gradients with the model in this dtype "
                      "(projected in float32; recorded in the store's projection; default: "
                      "the model's own)")
  flags.wrt(p, help=flags.WRT_HELP.replace("(jattr.wrt;", "(jattr.wrt; with --like: the "
                                           "train store's;"))
  p.add_argument("--chunk-size", type=flags.positive_int,
                 help="examples whose gradients exist at once (default: the most that fit "
                      "1 GiB, at most --store-chunk-rows)")
  p.add_argument("--store-chunk-rows", type=flags.positive_int, default=256,
                 help="rows per store chunk, the unit of resumption (default: %(default)s)")
  p.add_argument("--store-dtype", choices=DTYPES, default=DTYPE,
                 help="what the store keeps on disk (bfloat16: half the space, read back as "
                      "float32; default: %(default)s)")
  p.add_argument("--process-index", type=flags.nonneg_int,
                 help="with --process-count P: this host's share of a store that P hosts "
                      "featurize together, each running the same command with its own "
                      "index p in [0, P) (docs/devices.md)")
  p.add_argument("--process-count", type=flags.positive_int,
                 help="P, the number of hosts featurizing the store (default: 1)")
  p.add_argument("--wait", type=flags.nonneg_float,
                 help="seconds a host waits, after its share, for the other hosts' chunks "
                      "(each new chunk restarts the clock; then it names the missing ones "
                      "and exits 2; default: 0, return at once: the last host to finish "
                      "checks and folds the store)")
  flags.quiet(p)
  p.set_defaults(func=cmd_featurize)

  p = sub.add_parser("score", help="attribution scores tau [Q, N] from two feature stores",
                     description=workflow.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--train-store", required=True, help="feature store of the training set")
  p.add_argument("--query-store", required=True, help="feature store of the queries")
  p.add_argument("--method", choices=SCORE_METHODS, default="trak", help="default: %(default)s")
  p.add_argument("--damping", type=flags.nonneg_float, help="TRAK: explicit lambda >= 0")
  p.add_argument("--relative-damping", type=flags.nonneg_float,
                 help="TRAK: lambda = c * tr(Phi^T Phi)/k when --damping is not given "
                      "(default: the lambda at which the kernel's effective dimension is a "
                      "quarter of its rank)")
  p.add_argument("--out", required=True, help="output .npz")
  p.set_defaults(func=cmd_score)
