"""Counterfactual retraining: does removing the top-attributed examples change the sample?

For a generated query x_q = G(θ; z_q) — the sampler run from the key z_q, which fixes
the initial noise and every step's noise — and a score row τ[q, ·] (positive =
proponent), let R_q^k be the k training examples with the largest τ[q, i] and
U_q^k k examples drawn uniformly at random (the control). Retrain from scratch on
D ∖ R_q^k (and on D ∖ U_q^k) with the *same* recipe and seed as θ, so that, with
common random numbers, the data is the only difference, and regenerate from the
same key:

    x_q' = G(θ_{D∖R_q^k}; z_q),

    ΔL2   = ‖x_q' − x_q‖₂                (over all pixels)
    SSIM  = ssim(x_q, x_q')             (``jattr.eval.ssim``; lower = more change)

An attribution that finds the examples the sample depends on should change it more
than random removal: larger ΔL2 and lower SSIM than the control, query by query.

The control sets depend only on (Q, N, ks, ``random_seed``), never on the scores,
so with ``control_dir`` the control models are trained once, in their own
resumable checkpoint, and every later method reuses them: each method then pays
for its len(ks)·Q attributed retrainings only.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jattr.diffusion import conditioning
from jattr.diffusion.schedules import Schedule
from jattr.eval.ssim import ssim
from jattr.progress import Progress
from jattr.train import Checkpointer, TrainConfig, train_many
from jattr.types import ApplyFn, Params

REMOVAL_KINDS = ("attributed", "random")


def removal_sets(scores, k: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The top-k proponents of each query and a random control of the same size.

  Args:
    scores: τ, [Q, N].
    k: examples removed per query, 1 ≤ k < N.
    seed: seed of the random control (``np.random.default_rng``); query q's control
      set is independent of its scores.

  Returns:
    ``(top, random)``, each int64 [Q, k], rows sorted by index. ``top`` holds the k
    largest scores (ties broken towards the lower index).
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2:
    raise ValueError(f"scores must be [Q, N], got shape {scores.shape}")
  q, n = scores.shape
  if not 1 <= k < n:
    raise ValueError(f"k must be in [1, N={n}), got {k}")
  order = np.argsort(-scores, axis=1, kind="stable")
  top = np.sort(order[:, :k], axis=1)
  u = np.random.default_rng(seed).random((q, n))
  rand = np.sort(np.argsort(u, axis=1)[:, :k], axis=1)
  return top.astype(np.int64), rand.astype(np.int64)


def _key_data(keys) -> jax.Array:
  """Raw key data [Q, ...] of typed keys or of key data already."""
  keys = keys if isinstance(keys, jax.Array) else jnp.asarray(keys)
  if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(keys)
  return jnp.asarray(keys, jnp.uint32)


class CounterfactualResult(NamedTuple):
  """Changes of each regenerated sample.

  Attributes:
    ks: the removal sizes.
    removed: int64 [2, len(ks), Q, max k], padded with −1; index 0 of the first
      axis is the attributed removal, 1 the random control (``REMOVAL_KINDS``).
    samples: regenerated samples [2, len(ks), Q, H, W, C].
    l2: ‖x' − x‖₂, [2, len(ks), Q].
    ssim: ssim(x, x'), [2, len(ks), Q].
  """

  ks: tuple
  removed: np.ndarray
  samples: np.ndarray
  l2: np.ndarray
  ssim: np.ndarray

  def summary(self) -> list[dict]:
    """Per k: mean ΔL2 and SSIM for attributed and random removal, and the
    fraction of queries where the attributed removal changed the sample more."""
    rows = []
    for j, k in enumerate(self.ks):
      rows.append({
          "k": int(k),
          "l2_attributed": float(self.l2[0, j].mean()),
          "l2_random": float(self.l2[1, j].mean()),
          "ssim_attributed": float(self.ssim[0, j].mean()),
          "ssim_random": float(self.ssim[1, j].mean()),
          "frac_l2_larger": float(np.mean(self.l2[0, j] > self.l2[1, j])),
          "frac_ssim_lower": float(np.mean(self.ssim[0, j] < self.ssim[1, j])),
          "num_queries": int(self.l2.shape[-1]),
      })
    return rows


def counterfactual(apply_fn: ApplyFn, init_fn: Callable[[jax.Array], Params],
                   schedule: Schedule, train_images, config: TrainConfig, scores,
                   sample_fn: Callable[[Params, jax.Array], jax.Array], sample_keys,
                   originals, *, seed: int, ks: Sequence[int] = (10, 50, 100),
                   random_seed: int = 0, strategy: str = "map", chunk_size: int | None = None,
                   checkpointer: Checkpointer | None = None,
                   control_checkpointer: Checkpointer | None = None,
                   data_range: float = 2.0, progress: Progress | None = None,
                   sample_cond=None, null_cond=None) -> CounterfactualResult:
  """Retrains without each query's top-k (and k random) examples and regenerates.

  All 2·len(ks)·Q retrainings use the same ``seed`` — the seed of the model that
  generated ``originals`` — so they share its initialisation and noise stream
  (module docstring). They run as one ``train_many``, or, with ``control_dir``,
  as two: the attributed removals (``checkpointer``) and the random controls
  (``control_checkpointer``, shared by every method with the same Q, N, ks, random_seed,
  recipe and seed; a finished one is restored, not retrained). Each member trains
  alone under the ``"map"`` strategy, so the split changes no number.

  Args:
    apply_fn, init_fn: the model.
    schedule: the noise schedule.
    train_images: the full training set [N, H, W, C], or the conditional pairs
      ``(images, cond)``.
    config: the recipe of the original model.
    scores: τ for the queries, [Q, N] (positive = proponent).
    sample_fn: ``sample_fn(params, key) -> image [H, W, C]``: the sampler, run
      from one key (for the original, ``originals[q] = sample_fn(θ, keys[q])``).
    sample_keys: one PRNG key per query: typed keys [Q] or their key data
      (``jax.random.key_data``) [Q, ...].
    originals: the samples of the original model [Q, H, W, C].
    seed: the training seed of the original model.
    ks: removal sizes, each in [1, N).
    random_seed: seed of the random control sets.
    strategy, chunk_size: ``train_many``'s member axis.
    checkpointer: resumable training (``train_many``; e.g.
      ``jattr.io.checkpoint.Checkpointer(dir)``).
    control_checkpointer: where the random-control models are trained or found;
      None: trained with the attributed ones in ``checkpointer``.
    data_range: SSIM's L.
    progress: passed to ``train_many`` (``jattr.progress``).
    sample_cond: for a conditional model, each query's condition [Q, ...]: the
      sampler is then ``sample_fn(params, key, cond)`` and query q is regenerated
      under its own condition.
    null_cond: passed to ``train_many`` (condition dropout of the recipe).

  Returns:
    A ``CounterfactualResult``.
  """
  data = jax.tree.map(np.asarray, train_images)
  train_images = conditioning.images(data)
  originals = np.asarray(originals)
  scores = np.asarray(scores)
  n = train_images.shape[0]
  q = originals.shape[0]
  if scores.shape != (q, n):
    raise ValueError(f"scores must be [Q={q}, N={n}] (Q from originals, N from "
                     f"train_images), got {scores.shape}")
  if originals.shape[1:] != train_images.shape[1:]:
    raise ValueError(f"originals must be [Q, *{train_images.shape[1:]}], got {originals.shape}")
  ks = tuple(int(k) for k in ks)
  if not ks:
    raise ValueError("ks is empty")
  key_data = _key_data(sample_keys)
  if key_data.shape[0] != q:
    raise ValueError(f"sample_keys must hold one key per query (Q={q}), got "
                     f"{key_data.shape[0]}")

  max_k = max(ks)
  removed = np.full((2, len(ks), q, max_k), -1, np.int64)
  masks = np.ones((2, len(ks), q, n), bool)
  for j, k in enumerate(ks):
    top, rand = removal_sets(scores, k, seed=random_seed + j)
    for kind, sets in enumerate((top, rand)):
      removed[kind, j, :, :k] = sets
      np.put_along_axis(masks[kind, j], sets, False, axis=1)
  extra = {} if null_cond is None else {"null_cond": null_cond}
  train = lambda m, d, meta: train_many(  # noqa: E731
      apply_fn, init_fn, schedule, data, m, [seed] * m.shape[0], config,
      strategy=strategy, chunk_size=chunk_size, checkpointer=d, meta=meta,
      progress=progress, **extra).state.ema_params
  if control_checkpointer is None:
    groups = [(masks.reshape(-1, n), checkpointer, {"counterfactual": list(ks)})]
  else:
    groups = [(masks[0].reshape(-1, n), checkpointer, {"counterfactual": list(ks)}),
              (masks[1].reshape(-1, n), control_checkpointer,
               {"counterfactual_control": list(ks), "random_seed": int(random_seed)})]
  regen = jax.jit(lambda p, k, *c: jax.lax.map(lambda a: sample_fn(*a), (p, k) + c))
  samples = []
  for m, d, meta in groups:
    reps = m.shape[0] // q
    keys = jax.random.wrap_key_data(jnp.tile(key_data, (reps,) + (1,) * (key_data.ndim - 1)))
    conds = () if sample_cond is None else (jax.tree.map(
        lambda c: jnp.tile(jnp.asarray(c), (reps,) + (1,) * (np.ndim(c) - 1)), sample_cond),)
    samples.append(np.asarray(regen(train(m, d, meta), keys, *conds)))
  samples = np.concatenate(samples).reshape((2, len(ks), q) + originals.shape[1:])
  ref = np.broadcast_to(originals, samples.shape)
  l2 = np.sqrt(np.sum((samples.astype(np.float64) - ref) ** 2, axis=(-3, -2, -1)))
  s = np.asarray(ssim(jnp.asarray(ref.reshape((-1,) + originals.shape[1:])),
                      jnp.asarray(samples.reshape((-1,) + originals.shape[1:])),
                      data_range=data_range)).reshape(2, len(ks), q)
  return CounterfactualResult(ks=ks, removed=removed, samples=samples, l2=l2, ssim=s)
