"""TRAK, D-TRAK and Journey-TRAK scores from projected gradient features.

With train features Φ = [φ_1 … φ_N]ᵀ ∈ R^{N×k} (φ_i = Pᵀ ∇_θ f(θ; x_i), see
``jattr.features.featurize``) and a query feature φ_q, the TRAK score of training
example i for query q is

    τ[q, i] = φ_qᵀ (ΦᵀΦ + λ I)⁻¹ φ_i,

the Gauss–Newton influence of x_i on x_q in the linearised (feature) model; for
diffusion there is no classification "Q" (1 − p) term (docs/trak.md). TRAK
(Park et al. 2023) uses f = loss; D-TRAK (Zheng et al. 2024) uses the same formula
with another f (``square_norm``, …) on both sides; Journey-TRAK (Georgiev et al.
2023) scores each sampling step with that step's loss.

Split as in lineax: ``trak_fit`` does the expensive, reusable work once (ΦᵀΦ, its
Cholesky factor), ``trak_score`` the cheap per-query work; an ensemble or a set of
checkpoints averages per-model scores (``trak_ensemble_score``).

With respect to a subset θ_S of the parameters (``jattr.wrt``), φ_i = Pᵀ ∇_{θ_S} f:
featurise with ``featurize(..., wrt=...)`` (the scores then need nothing more);
``journey_trak_scores`` takes ``wrt`` itself.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from jattr.diffusion import conditioning
from jattr.diffusion.checks import count_nonfinite
from jattr.diffusion.measurements import trajectory_step_measurement
from jattr.diffusion.samplers import Trajectory
from jattr.diffusion.schedules import Schedule
from jattr.features.projection import ProjectionConfig, check_finite_params, project_grads_fn
from jattr.grads.per_example import apply_chunks, in_trace
from jattr.methods.scoring import tiled_scores, tiled_scores_into
from jattr.progress import Progress
from jattr.types import ApplyFn, Parameterization, Params
from jattr.wrt import Selector, restrict

DEFAULT_RELATIVE_DAMPING = None
"""The default of ``relative_damping``: None, the effective-dimension rule
(``effective_dimension_damping``). A number c means λ = c · tr(ΦᵀΦ)/k instead."""
DEFAULT_EFFECTIVE_FRACTION = 0.25
"""ρ of the default damping: λ is chosen so that the kernel's effective dimension
Σ_j s_j/(s_j + λ) is ρ × its rank (docs/trak.md, "The default damping")."""


class TrakState(NamedTuple):
  """What ``trak_fit`` computes once per model.

  Two equivalent forms, chosen by shape (``trak_fit``): the primal one factorises
  the k×k kernel ΦᵀΦ + λI; when N < k the dual one factorises the N×N Gram
  ΦΦᵀ + λI instead, by the push-through identity

      (ΦᵀΦ + λI)⁻¹ Φᵀ = Φᵀ (ΦΦᵀ + λI)⁻¹.

  The dual form is cheaper (N³ instead of k³) and, in float32, much better
  conditioned: ΦᵀΦ has k − N zero eigenvalues, so with a small λ its rounding
  errors (≈ 1e-7 × the largest eigenvalue) swamp λ and the Cholesky factorisation
  fails; ΦΦᵀ has none.

  Attributes:
    features: Φ, the train features [N, k].
    cholesky: lower-triangular L with L Lᵀ = ΦᵀΦ + λ I, [k, k] (primal), or
      L Lᵀ = ΦΦᵀ + λ I, [N, N] with N < k (dual).
    damping: λ, a scalar.
  """

  features: jax.Array
  cholesky: jax.Array
  damping: jax.Array


def default_damping(train_features: jax.Array,
                    relative_damping: float | None = DEFAULT_RELATIVE_DAMPING) -> jax.Array:
  """The scale-free default damping λ of TRAK's kernel ΦᵀΦ.

  * ``relative_damping=None`` (the default): the effective-dimension rule,
    ``effective_dimension_damping(Φ)``.
  * a number c: λ = c · tr(ΦᵀΦ)/k = c · ‖Φ‖²_F / k, a fixed fraction of the mean
    eigenvalue of ΦᵀΦ (the form the LDS harness tunes c in).

  Both are unchanged when f (hence Φ) is rescaled by a constant.

  Args:
    train_features: Φ, [N, k].
    relative_damping: None, or c.

  Returns:
    λ, a scalar in Φ's dtype.
  """
  if relative_damping is None:
    return effective_dimension_damping(train_features)
  return relative_damping * jnp.sum(jnp.square(train_features)) / train_features.shape[1]


def kernel_eigenvalues(train_features) -> np.ndarray:
  """The eigenvalues of ΦᵀΦ that can be non-zero, in float64 on the host: those of the
  smaller of ΦΦᵀ [N, N] and ΦᵀΦ [k, k] (they share their non-zero spectrum),
  clipped at 0, ascending."""
  phi = np.asarray(train_features, np.float64)
  n, k = phi.shape
  gram = phi @ phi.T if n < k else phi.T @ phi
  return np.maximum(np.linalg.eigvalsh(gram), 0.0)


def effective_dimension(eigvals, damping):
  """d(λ) = Σ_j s_j/(s_j + λ): how many directions of the kernel λ leaves in play."""
  return np.sum(np.asarray(eigvals) / (np.asarray(eigvals) + damping))


def effective_dimension_damping(train_features,
                                fraction: float = DEFAULT_EFFECTIVE_FRACTION) -> jax.Array:
  """λ with d(λ) = ρ · r: the kernel's effective dimension a fraction ρ of its rank.

  s are the eigenvalues of ΦᵀΦ (``kernel_eigenvalues``, float64) and r their
  numerical rank (those above s_max · max(N, k) · 2⁻⁵², as ``numpy.linalg.matrix_rank``;
  min(N, k) for features in general position). d(λ) falls monotonically from r at
  λ = 0 to 0, so λ is found by bisection on log λ. Unlike a fixed fraction of the
  mean eigenvalue, this adapts to the shape of the spectrum: on the digits
  benchmark the best mean-eigenvalue factor was c = 10 for f = loss and 0.01–0.1
  for f = mean, 100–1000× apart, yet both optima sat near d(λ) = N/4
  (docs/trak.md, "The default damping"). Cost: one eigendecomposition of a
  min(N, k)² matrix on the host.

  Args:
    train_features: Φ, [N, k] (concrete: not inside ``jit``).
    fraction: ρ, in (0, 1).

  Returns:
    λ, a scalar in Φ's dtype.
  """
  if not 0 < fraction < 1:
    raise ValueError(f"fraction must be in (0, 1), got {fraction}")
  s = kernel_eigenvalues(train_features)
  top = float(s.max())
  if top == 0:
    raise ValueError("train_features are all zero: the kernel ΦᵀΦ has no scale to damp")
  rank = int(np.sum(s > top * max(np.shape(train_features)) * np.finfo(np.float64).eps))
  target = fraction * rank
  lo, hi = np.log(top) - 60.0, np.log(top) + 14.0  # d(e^lo) ≈ r, d(e^hi) ≈ 0
  for _ in range(100):
    mid = (lo + hi) / 2
    if effective_dimension(s, np.exp(mid)) > target:
      lo = mid  # λ too small: raise it
    else:
      hi = mid
  return jnp.asarray(np.exp((lo + hi) / 2), jnp.result_type(train_features))


def trak_fit(train_features: jax.Array, *, damping: float | None = None,
             relative_damping: float | None = DEFAULT_RELATIVE_DAMPING) -> TrakState:
  """Factorises the damped feature kernel ΦᵀΦ + λ I.

  Args:
    train_features: Φ, [N, k].
    damping: λ ≥ 0 explicitly; ``None`` uses ``default_damping(Φ, relative_damping)``.
      λ = 0 needs N ≥ k and Φ of full column rank.
    relative_damping: of the default damping (``default_damping``: None, the
      effective-dimension rule; c, λ = c · tr(ΦᵀΦ)/k).

  Returns:
    A ``TrakState``.

  Raises:
    ValueError: Φ is not [N, k], holds NaN or inf, or is all zero (the measurement
      does not depend on the parameters); or the damped kernel is not numerically
      positive definite.
  """
  if train_features.ndim != 2:
    raise ValueError(f"train_features must have shape [N, k], got {train_features.shape}")
  bad = count_nonfinite(train_features)
  if bad:
    raise ValueError(f"train_features hold {bad} non-finite entries (NaN or inf) out of "
                     f"{train_features.size}: featurize a model with finite parameters "
                     "(a NaN gradient, e.g. from a diverged model, is not a damping problem)")
  if not bool(jnp.any(train_features != 0)):
    raise ValueError(f"train_features are all zero ({train_features.shape}): the measurement "
                     "does not depend on the parameters (or its gradient vanishes), so there "
                     "is nothing to attribute")
  if damping is None:
    lam = default_damping(train_features, relative_damping)
  else:
    if isinstance(damping, (int, float)) and damping < 0:
      raise ValueError(f"damping must be >= 0 or None, got {damping}")
    lam = jnp.asarray(damping, train_features.dtype)
  n, k = train_features.shape
  cholesky = (_damped_cholesky(train_features.T, lam) if n < k
              else _damped_cholesky(train_features, lam))
  if not bool(jnp.all(jnp.isfinite(cholesky))):
    raise ValueError(f"ΦᵀΦ + λI is not numerically positive definite (λ = {float(lam):.3g}, "
                     f"N = {n}, k = {k}, {train_features.dtype}): increase the damping")
  return TrakState(features=train_features, cholesky=cholesky, damping=lam)


def is_dual(state: TrakState) -> bool:
  """Whether ``state`` holds the N×N (dual) factorisation."""
  return state.cholesky.shape[0] < state.features.shape[1]


@jax.jit
def _damped_cholesky(features, lam):
  """Cholesky factor of AᵀA + λI for A = ``features``."""
  gram = features.T @ features
  return jnp.linalg.cholesky(gram + lam * jnp.eye(gram.shape[0], dtype=gram.dtype))


@jax.jit
def _precondition(cholesky, query_features):
  """ψ_q = (ΦᵀΦ + λI)⁻¹ φ_q for every row, [Q, k]."""
  return jsl.cho_solve((cholesky, True), query_features.T.astype(cholesky.dtype)).T


def trak_score(state: TrakState, query_features: jax.Array, *,
               tile: tuple[int, int] = (1024, 8192), out: np.ndarray | None = None,
               progress: Progress | None = None):
  """τ[q, i] = φ_qᵀ (ΦᵀΦ + λ I)⁻¹ φ_i.

  Primal form: the queries are preconditioned once, ψ_q = (ΦᵀΦ + λ I)⁻¹ φ_q (two
  triangular solves with the Cholesky factor), then τ = Ψ Φᵀ is assembled tile by
  tile. Dual form (N < k): τ = (Φ_q Φᵀ)(ΦΦᵀ + λI)⁻¹, the kernel Φ_q Φᵀ assembled
  tile by tile and then solved against, a [Q, N] array with N < k.

  Args:
    state: from ``trak_fit``.
    query_features: [Q, k], built with the same projection (and model) as Φ.
    tile: (tile_q, tile_n) of ``jattr.methods.scoring``.
    out: optional preallocated numpy array / memmap [Q, N] to write into (the scores
      then never exist whole on the device in the primal form; the
      dual form, used only when N < k, holds the [Q, N] scores once).
    progress: called after each tile written into ``out`` (primal form), stage
      ``"scores"`` (``jattr.progress``). Without ``out``, and in the dual form, the
      scores are one compiled program with no host loop: ``progress`` is not called.

  Returns:
    τ, [Q, N] (``out`` itself when given).
  """
  k = state.features.shape[1]
  if query_features.ndim != 2 or query_features.shape[1] != k:
    raise ValueError(f"query_features must have shape [Q, k={k}], got {query_features.shape}")
  bad = 0 if in_trace(query_features) else count_nonfinite(query_features)
  if bad:
    raise ValueError(f"query_features hold {bad} non-finite values (NaN or inf); scores from "
                     "them would be NaN")
  if is_dual(state):
    kernel = tiled_scores(query_features, state.features, *tile)
    tau = _precondition(state.cholesky, kernel)
    if out is not None:
      out[...] = np.asarray(tau, out.dtype)
      return out
    return tau
  psi = _precondition(state.cholesky, query_features)
  if out is not None:
    return tiled_scores_into(out, psi, state.features, *tile, progress=progress)
  return tiled_scores(psi, state.features, *tile)


def trak_ensemble_score(models: Sequence[tuple[jax.Array, jax.Array]],
                        damping: float | None = None, *,
                        relative_damping: float | None = DEFAULT_RELATIVE_DAMPING,
                        tile: tuple[int, int] = (1024, 8192)) -> jax.Array:
  """Mean of per-model TRAK scores over an ensemble or a set of checkpoints.

      τ[q, i] = 1/M Σ_m φ_{q,m}ᵀ (Φ_mᵀ Φ_m + λ_m I)⁻¹ φ_{i,m}

  Args:
    models: M pairs (train_features [N, k_m], query_features [Q, k_m]), one per model.
    damping: λ for every model; ``None`` uses each model's own scale-free default
      (so models whose gradients differ in scale are weighted alike).
    relative_damping: of the default damping (``default_damping``).
    tile: as in ``trak_score``.

  Returns:
    τ, [Q, N].
  """
  if len(models) == 0:
    raise ValueError("models must hold at least one (train_features, query_features) pair")
  total = None
  for train_features, query_features in models:
    state = trak_fit(train_features, damping=damping, relative_damping=relative_damping)
    scores = trak_score(state, query_features, tile=tile)
    total = scores if total is None else total + scores
  return total / len(models)


@dataclasses.dataclass(frozen=True)
class _StepFeatures:
  """Chunk kernel of Journey-TRAK: φ_s = Pᵀ ∇_θ f_s for a chunk, args (θ, t_s, ε_s)."""

  step_loss: Callable
  config: ProjectionConfig

  def __call__(self, args, images):
    params, t, eps = args
    return project_grads_fn(lambda p, x: self.step_loss(p, x, t, eps), self.config)(
        params, images)


def journey_noise(key: jax.Array, step: int, shape: tuple[int, ...], dtype=jnp.float32):
  """The fixed noise ε_s of trajectory step ``step``: ``normal(fold_in(key, step))``."""
  return jax.random.normal(jax.random.fold_in(key, step), shape, dtype)


def journey_trak_scores(apply_fn: ApplyFn, params: Params, schedule: Schedule,
                        trajectory: Trajectory, steps: Sequence[int], train_images: jax.Array,
                        key: jax.Array, config: ProjectionConfig, *,
                        parameterization: Parameterization = "eps",
                        damping: float | None = None,
                        relative_damping: float | None = DEFAULT_RELATIVE_DAMPING,
                        chunk_size: int | None = None,
                        tile: tuple[int, int] = (1024, 8192),
                        wrt: Selector = None, query_cond=None) -> jax.Array:
  """Journey-TRAK: one TRAK score matrix per chosen sampling step.

  At step s (timestep t_s, sampler prediction x̂₀^(s)), with one fixed noise ε_s
  shared by every sample and every training image,

      f_s(θ; x) = 1/D ‖y − o_θ(√ᾱ_{t_s} x + √(1−ᾱ_{t_s}) ε_s, t_s)‖²,
      τ_s[b, i] = φ_s(x̂₀^(s)_b)ᵀ (Φ_sᵀ Φ_s + λ_s I)⁻¹ φ_s(x_i),

  φ_s(x) = Pᵀ ∇_θ f_s(θ; x) and Φ_s stacks φ_s(x_i) over the training set, so each
  step costs one featurisation of the training set.

  Args:
    apply_fn, params: the model that produced ``trajectory``.
    schedule: its noise schedule.
    trajectory: a recorded sampling path (``return_trajectory=True``), S steps, B samples.
    steps: indices into the trajectory's S steps (not timesteps).
    train_images: [N, H, W, C], or conditional examples ``(x0, cond)``.
    key: PRNG key of the per-step noises (``journey_noise(key, s, ...)``).
    config: the projection.
    parameterization: how the network output is read.
    damping, relative_damping: as in ``trak_fit``, per step.
    chunk_size: featurisation chunk.
    tile: as in ``trak_score``.
    wrt: the parameters θ_S the gradients are taken with respect to, the others
      held fixed (``jattr.wrt``; ``None``: all): φ_s(x) = Pᵀ ∇_{θ_S} f_s(θ; x).
    query_cond: for a conditional model, the condition [B, ...] the B samples were
      drawn with (required exactly when ``train_images`` carries a condition).

  Returns:
    τ, [len(steps), B, N].
  """
  num_steps = trajectory.t.shape[0]
  steps = [int(s) for s in steps]
  if not steps or any(not 0 <= s < num_steps for s in steps):
    raise ValueError(f"steps must be a non-empty list of indices in [0, S={num_steps}), "
                     f"got {steps}")
  image_shape = tuple(trajectory.x0_pred.shape[2:])
  train_images, train_cond = conditioning.split(train_images)
  if (train_cond is None) != (query_cond is None):
    raise ValueError("a conditional model needs the condition of the training images "
                     "((x0, cond)) and of the samples (query_cond); got only one of them")
  conditioning.check_cond(train_cond, train_images.shape[0], "train_images' cond")
  conditioning.check_cond(query_cond, trajectory.x0_pred.shape[1], "query_cond")
  if tuple(train_images.shape[1:]) != image_shape:
    raise ValueError(f"train_images must have shape [N, *{image_shape}], got "
                     f"{train_images.shape}")
  check_finite_params(params)
  apply_fn, params = restrict(apply_fn, params, wrt)
  step_loss = trajectory_step_measurement(apply_fn, schedule, parameterization=parameterization)
  kernel = _StepFeatures(step_loss, config)

  def step_features(params, images, t, eps):
    # t and eps are arguments of the one compiled chunk program, shared by every step.
    return apply_chunks(kernel, (params, t, eps), images, chunk_size=chunk_size,
                        desc="journey featurize")

  scores = []
  for s in steps:
    t = trajectory.t[s]
    eps = journey_noise(key, s, image_shape, train_images.dtype)
    train_features = step_features(params, conditioning.join(train_images, train_cond), t, eps)
    queries = trajectory.x0_pred[s].astype(train_images.dtype)
    query_features = step_features(params, conditioning.join(queries, query_cond), t, eps)
    state = trak_fit(train_features, damping=damping, relative_damping=relative_damping)
    scores.append(trak_score(state, query_features, tile=tile))
  return jnp.stack(scores)
