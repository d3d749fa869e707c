"""The linear datamodeling score (LDS), its noise ceiling, and honest model selection.

Setup (docs/evaluation.md). M subsets S_j of the N training examples, each of size
round(α·N), are drawn once (``subset_masks``). A model is trained on each subset with
S seed replicates — replicate r gives every subset model seed r (common random
numbers: within a replicate, models differ only by their data). The measurement
of query q under the model of subset j and replicate r is

    y[q, j, r] = 1/K Σ_k ℓ(θ_{S_j, r}; x_q, t_k, ε_k)            (``measure_loss``)

with the K fixed draws (t_k, ε_k) shared by every model and query. A score matrix
τ[q, i] (queries × training examples) predicts the measurements additively,

    ŷ[q, j] = Σ_{i ∈ S_j} τ[q, i]                                (``subset_sums``)

Sign convention (jattr-wide, see ``jattr.methods.influence``): a positive τ[q, i]
marks a *proponent*, a training example whose presence lowers the query's loss.
So ŷ predicts the negated loss, and the LDS of τ is the mean over queries of the
Spearman correlation, across the M subsets, of ŷ[q, ·] with the negated
seed-averaged measurement −ȳ[q, ·], ȳ[q, ·] = 1/S Σ_r y[q, ·, r]:

    LDS = 1/Q Σ_q ρ_spearman(−ȳ[q, ·], ŷ[q, ·])                  (``lds``)

with a percentile bootstrap interval over queries (``bootstrap_ci``). A query
whose prediction is constant across subsets has no ranking and scores 0.
Equivalently, ρ(ȳ[q, ·], Σ_{i∉S_·} τ[q, i]): the loss against the summed scores
of the *removed* examples, the form kronfluence's and D-TRAK's evaluations use.

Noise ceiling (``noise_ceiling``). The seeds are split into two disjoint halves
A = {0..⌊S/2⌋−1} and B = {⌊S/2⌋..2⌊S/2⌋−1}, and

    ceiling = 1/Q Σ_q ρ_spearman(mean_{r∈A} y[q, ·, r], mean_{r∈B} y[q, ·, r]),

the agreement of two independent retrainings, each averaging ⌊S/2⌋ seeds (two
single seeds when S = 2). It needs S ≥ 2. ȳ averages all S seeds and so is less
noisy than either half; the Spearman–Brown step-up 2c/(1 + c) of the mean
split-half ceiling c estimates the reliability of the full average
(``spearman_brown``), reported beside the split-half ceiling.

Measurements are in ``jattr.eval.measure``; validation-only selection of a method's
hyper-parameters in ``jattr.eval.selection``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jattr.eval.spearman import spearman



# ---------------------------------------------------------------------------------
# Subsets and predictions
# ---------------------------------------------------------------------------------


def subset_size(num_examples: int, alpha: float) -> int:
  """|S_j| = round(α·N), at least 1 and at most N − 1 (so subsets differ)."""
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  if num_examples < 2:
    raise ValueError(f"num_examples must be >= 2, got {num_examples}")
  return int(min(max(round(alpha * num_examples), 1), num_examples - 1))


def subset_masks(num_examples: int, num_subsets: int = 64, alpha: float = 0.5,
                 seed: int = 0) -> np.ndarray:
  """M random subsets of exactly round(α·N) examples each, as membership masks.

  Row j keeps the examples holding the |S_j| smallest of N i.i.d. uniforms, i.e. a
  uniformly random subset of that size, all rows drawn at once.

  Args:
    num_examples: N.
    num_subsets: M.
    alpha: the subset fraction α.
    seed: integer seed for ``np.random.default_rng``.

  Returns:
    Boolean masks [M, N], each row with exactly round(α·N) True entries.
  """
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  size = subset_size(num_examples, alpha)
  u = np.random.default_rng(seed).random((num_subsets, num_examples))
  order = np.argsort(u, axis=1)
  masks = np.zeros((num_subsets, num_examples), bool)
  np.put_along_axis(masks, order[:, :size], True, axis=1)
  return masks


def subset_sums(scores, masks) -> np.ndarray:
  """Additive predictions ŷ[q, j] = Σ_{i∈S_j} τ[q, i] = (τ Mᵀ)[q, j].

  Args:
    scores: τ, [Q, N].
    masks: boolean membership [M, N].

  Returns:
    ŷ, float64 [Q, M].
  """
  scores = np.asarray(scores, np.float64)
  masks = np.asarray(masks)
  if masks.ndim != 2 or masks.dtype != bool:
    raise ValueError(f"masks must be boolean [M, N], got {masks.dtype} {masks.shape}")
  if scores.ndim != 2 or scores.shape[1] != masks.shape[1]:
    raise ValueError(f"scores must be [Q, N={masks.shape[1]}] (N from masks), got {scores.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"scores must be finite; got {int(np.sum(~np.isfinite(scores)))} "
                     f"non-finite entries")
  return scores @ masks.T.astype(np.float64)


def _check_y(y, num_subsets: int | None = None) -> np.ndarray:
  y = np.asarray(y, np.float64)
  if y.ndim == 2:
    y = y[..., None]
  if y.ndim != 3:
    raise ValueError(f"y must be measurements [Q, M] or [Q, M, S], got shape {y.shape}")
  if num_subsets is not None and y.shape[1] != num_subsets:
    raise ValueError(f"y must have M={num_subsets} subsets on axis 1, got shape {y.shape}")
  return y


# ---------------------------------------------------------------------------------
# Scores and intervals
# ---------------------------------------------------------------------------------


class LdsResult(NamedTuple):
  """A per-query correlation, its mean and a bootstrap interval over queries.

  Attributes:
    per_query: float64 [Q].
    mean: the mean over queries.
    ci_low, ci_high: the percentile bootstrap interval of the mean.
    confidence: the interval's coverage (e.g. 0.95).
  """

  per_query: np.ndarray
  mean: float
  ci_low: float
  ci_high: float
  confidence: float

  def to_dict(self) -> dict:
    return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "confidence": self.confidence, "num_queries": int(self.per_query.shape[0]),
            "per_query": [float(v) for v in self.per_query]}

  @classmethod
  def from_dict(cls, d: dict) -> "LdsResult":
    """Inverse of ``to_dict`` (results records are JSON)."""
    return cls(np.asarray(d["per_query"], np.float64), float(d["mean"]), float(d["ci_low"]),
               float(d["ci_high"]), float(d["confidence"]))

  def __str__(self) -> str:
    return f"{self.mean:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


def bootstrap_ci(values, *, num_resamples: int = 10000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of ``values``.

  Draws ``num_resamples`` resamples of the Q values with replacement (all at
  once, from ``np.random.default_rng(seed)``), and returns the (1−c)/2 and
  (1+c)/2 quantiles of their means.

  Args:
    values: [Q] per-query numbers.
    num_resamples: B.
    confidence: c in (0, 1).
    seed: integer seed; the same seed gives the same interval.

  Returns:
    ``(low, high)``.
  """
  values = np.asarray(values, np.float64).reshape(-1)
  if values.size == 0:
    raise ValueError("values is empty: need at least one query")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  if num_resamples < 1:
    raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
  idx = np.random.default_rng(seed).integers(0, values.size, (num_resamples, values.size))
  means = values[idx].mean(axis=1)
  lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
  return float(lo), float(hi)


def paired_difference(a: LdsResult, b: LdsResult, *, num_resamples: int = 10000,
                      confidence: float = 0.95, seed: int = 0) -> LdsResult:
  """LDS(a) − LDS(b) on the same queries: the mean per-query difference and its
  bootstrap interval.

  Two methods scored on the same queries share each query's difficulty, so the
  per-query differences d_q = a_q − b_q vary much less than either score: their
  interval is the sharper test of "a and b are within noise" than two overlapping
  intervals.

  Raises:
    ValueError: a and b have different numbers of queries.
  """
  if a.per_query.shape != b.per_query.shape:
    raise ValueError(f"a paired difference needs the same queries: got {a.per_query.shape[0]} "
                     f"and {b.per_query.shape[0]} per-query values")
  return summarize(a.per_query - b.per_query, num_resamples=num_resamples,
                   confidence=confidence, seed=seed)


def summarize(per_query, *, num_resamples: int = 10000, confidence: float = 0.95,
              seed: int = 0) -> LdsResult:
  """Mean and bootstrap interval of per-query values as an ``LdsResult``."""
  per_query = np.asarray(per_query, np.float64)
  lo, hi = bootstrap_ci(per_query, num_resamples=num_resamples, confidence=confidence, seed=seed)
  return LdsResult(per_query, float(per_query.mean()), lo, hi, float(confidence))


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Spearman per row of two float64 arrays [Q, M]; NaN (constant row) becomes 0.

  Rows are centred and scaled in float64 before JAX sees them (in float32 by
  default): ranks are invariant to both, and the subset-to-subset differences,
  not the magnitudes, then set the precision (a sum of N scores can be large
  next to its spread across subsets).
  """

  def normalise(x):
    x = x - x.mean(axis=-1, keepdims=True)
    scale = np.max(np.abs(x), axis=-1, keepdims=True)
    return x / np.where(scale > 0, scale, 1.0)

  rho = spearman(jnp.asarray(normalise(a)), jnp.asarray(normalise(b)))
  return np.nan_to_num(np.asarray(rho, np.float64), nan=0.0)


def lds_per_query(scores, masks, y) -> np.ndarray:
  """ρ_spearman(−ȳ[q, ·], ŷ[q, ·]) for each query (module docstring).

  Args:
    scores: τ, [Q, N].
    masks: boolean [M, N].
    y: measurements [Q, M] or [Q, M, S] (averaged over S).

  Returns:
    float64 [Q]; 0 for a query whose prediction (or measurement) is constant.
  """
  masks = np.asarray(masks)
  y = _check_y(y, masks.shape[0] if masks.ndim == 2 else None)
  pred = subset_sums(scores, masks)
  if pred.shape[0] != y.shape[0]:
    raise ValueError(f"scores has {pred.shape[0]} queries but y has {y.shape[0]}")
  return _row_spearman(-y.mean(-1), pred)


def lds(scores, masks, y, *, num_resamples: int = 10000, confidence: float = 0.95,
        seed: int = 0) -> LdsResult:
  """The linear datamodeling score of a score matrix.

      LDS = 1/Q Σ_q ρ_spearman(−ȳ[q, ·], Σ_{i∈S_·} τ[q, i])

  Args:
    scores: τ[q, i], [Q, N]; positive for proponents (examples that lower the
      query's loss).
    masks: subset membership, boolean [M, N].
    y: measurements [Q, M] or [Q, M, S] (seed replicates are averaged).
    num_resamples, confidence, seed: the bootstrap over queries.

  Returns:
    An ``LdsResult`` (per-query ρ, mean, interval).
  """
  return summarize(lds_per_query(scores, masks, y), num_resamples=num_resamples,
                   confidence=confidence, seed=seed)


def split_halves(y) -> tuple[np.ndarray, np.ndarray]:
  """The two half-averages of the seed axis: seeds [0, S//2) and [S//2, 2·(S//2)).

  Args:
    y: [Q, M, S] with S ≥ 2.

  Returns:
    ``(y_a, y_b)``, each [Q, M].
  """
  y = _check_y(y)
  s = y.shape[-1]
  if s < 2:
    raise ValueError(f"the noise ceiling needs >= 2 seed replicates per subset, got S={s}")
  h = s // 2
  return y[..., :h].mean(-1), y[..., h:2 * h].mean(-1)


def spearman_brown(c, factor: float = 2.0):
  """Reliability of an average of ``factor`` times as many replicates: f·c / (1 + (f−1)·c)."""
  c = np.asarray(c, np.float64)
  return factor * c / (1.0 + (factor - 1.0) * c)


def noise_ceiling(y, *, num_resamples: int = 10000, confidence: float = 0.95,
                  seed: int = 0) -> LdsResult:
  """Split-half noise ceiling: ρ_spearman between the two seed halves, per query.

  Args:
    y: [Q, M, S], S ≥ 2 (see ``split_halves``).
    num_resamples, confidence, seed: the bootstrap over queries.

  Returns:
    An ``LdsResult``; identical replicates give 1, independent noise ~0.
  """
  a, b = split_halves(y)
  return summarize(_row_spearman(a, b), num_resamples=num_resamples, confidence=confidence,
                   seed=seed)
