"""Attributing a run's queries by unlearning them (``jattr mucs``: MUCS and its ablations).

    jattr mucs --run DIR --out scores.npz [--queries samples|test|train | --queries-file F.npz]
               [--num-queries Q] [--variant mucs|no_bound|independent_noise|baseline]
               [--steps 100] [--lr 1e-4] [--optimizer adam|sgd] [--forget-weight 0.2]
               [--retain-weight 1] [--retain-batch 32] [--stop-ratio 0.95]
               [--ewc-weight G] [--trainable REGEX] [--num-draws 10]
               [--timesteps uniform] [--draw-seed 0] [--null-models 4] [--seed 0]
               [--skew-constant 1e-6] [--query-chunk 8] [--train-chunk 64]

For each query x_q a copy of the run's EMA parameters unlearns x_q
(``jattr.methods.mucs``), and every training example gets the skew of its loss
between the unlearned and the original model, on the same K draws. Variants, all
one code path:

    mucs               retain + bounded mirrored forget (λ = 0.2, stop at 0.95·L_null)
    no_bound           the same objective without the min, the stop and the rejection
    independent_noise  MUCS, but the original model's losses use other draws
    baseline           gradient ascent + EWC (Wang et al. 2024), no bound, no retain

Flags given explicitly override the variant's defaults. The .npz holds ``tau``
[Q, N] (τ > 0: proponent), the query images, the unlearning diagnostics
(``forget_loss`` [Q, 2] before/after, ``null_loss``, ``steps``, ``rejected``),
``seconds`` and ``seconds_per_query`` (wall clock, including compilation), and
``config`` (JSON).
"""

from __future__ import annotations

import json
import numbers
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jattr.io import atomic, guard
from jattr.methods.mucs import mucs_attribute, variant_config
from jattr.runs.features import query_examples
from jattr.runs.run import latent_space, load_run, model_fns, run_examples, training_data


MUCS_KEYS = ("tau", "forget_loss", "config")
"""Arrays every ``mucs_run`` file holds (an existing --out without them is refused)."""


def load_queries(cfg, run_dir: pathlib.Path, queries: str = "samples",
                 queries_file: str | os.PathLike | None = None,
                 num_queries: int | None = None) -> np.ndarray:
  """The query images of a run: ``queries_file`` (an .npz with ``x``, and the labels
  ``y`` for a conditional run) or ``queries`` (``jattr.runs.QUERIES``), optionally the
  first ``num_queries``. A conditional run's queries are ``(images, labels)``."""
  if queries_file:
    with np.load(queries_file) as z:
      if "x" not in z:
        raise ValueError(f"{queries_file} has no array 'x'; it holds {sorted(z.files)}")
      x = np.asarray(z["x"], np.float32)
      y = np.asarray(z["y"]) if "y" in z.files else None
    if x.ndim != 4 or x.shape[1:] != tuple(cfg.model.image_shape):
      raise ValueError(f"{queries_file}: x has shape {x.shape}; expected "
                       f"[Q, *{tuple(cfg.model.image_shape)}]")
    if cfg.conditional:
      if y is None or y.shape != x.shape[:1]:
        raise ValueError(f"{queries_file}: a conditional run needs each query's label, an "
                         f"array 'y' of shape [{x.shape[0]}]; it holds {sorted(z.files)}")
      x = (x, y.astype(np.int32))
  else:
    x = query_examples(cfg, run_dir, queries)[0]
  if num_queries is not None:
    if num_queries < 1:
      raise ValueError(f"--num-queries must be >= 1, got {num_queries}")
    x = jax.tree.map(lambda a: a[:num_queries], x)  # a conditional run's labels too
  return x


def mucs_run(run_dir, out, *, variant: str = "mucs", queries: str = "samples",
             queries_file: str | os.PathLike | None = None, num_queries: int | None = None,
             config_overrides: dict | None = None, **options) -> tuple[np.ndarray, dict]:
  """Unlearning attribution of a run's queries, written to ``out`` (what ``jattr mucs`` does).

  Args:
    run_dir: a trained run directory.
    out: the .npz to write (module docstring).
    variant: ``jattr.methods.mucs.MUCS_VARIANTS``.
    queries, queries_file, num_queries: which queries (``load_queries``).
    config_overrides: ``UnlearnConfig`` fields overriding the variant's (None ignored).
    **options: the rest of ``jattr.methods.mucs.mucs_attribute``'s keywords
      (``trainable``, ``num_draws``, ``seed``, ``query_chunk``…).

  Returns:
    ``(tau [Q, N], info)`` as written.
  """
  out = guard.check_output_file(out, "--out", kind="mucs", keys=MUCS_KEYS)
  if num_queries is not None and (isinstance(num_queries, bool) or not isinstance(
      num_queries, numbers.Integral) or num_queries < 1):
    raise ValueError(f"num_queries = {num_queries!r}: expected None or an integer >= 1")
  run_dir = pathlib.Path(run_dir)
  cfg, apply_fn, params = load_run(run_dir)
  _, init_fn = model_fns(cfg)
  ds, train_ids = training_data(cfg)
  x = load_queries(cfg, run_dir, queries, queries_file, num_queries)
  config = variant_config(variant, **(config_overrides or {}))
  tau, info = mucs_attribute(apply_fn, params, init_fn, cfg.noise_schedule,
                             jax.tree.map(jnp.asarray,
                                          run_examples(cfg, ds, latent_space(cfg, run_dir))),
                             jax.tree.map(jnp.asarray, x), variant=variant, config=config,
                             parameterization=cfg.train.parameterization, **options)
  arrays = {k: info.pop(k) for k in ("forget_loss", "null_loss", "steps", "rejected")}
  info["run"] = str(run_dir)
  info["queries"] = str(queries_file) if queries_file else queries
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_npz(out, tau=tau, queries=x, train_ids=train_ids, config=json.dumps(info),
                   seconds=info["seconds"], seconds_per_query=info["seconds_per_query"],
                   **arrays)
  return tau, {**info, **arrays}
