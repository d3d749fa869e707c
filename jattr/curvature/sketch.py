"""The sketched GGN: G restricted to a random k-dimensional subspace.

The dense GGN (``dense.py``) is the best curvature jattr has, and it is P × P. The
sketch keeps its structure (every cross-layer entry, no Kronecker factorisation)
but only in the span of a random projection P [P, k] — the same seeded P that
TRAK's features use (``jattr.features.ProjectionConfig``):

    G_k = Pᵀ G P = 1/(N K) Σ_r (Pᵀγ_r)(Pᵀγ_r)ᵀ        [k, k]      (``fit_sketched_ggn``)

with γ_r = J_ikᵀ u_r the square-root rows of G (``ggn.py``): every output
coordinate (``"ggn_exact"``, D rows per pair, exact) or S sampled rows per pair
(``"ggn_curvature_prop"``, u_r = √(2/(D S))·Rademacher, unbiased:
E[u uᵀ] = (2/D)·I/S per row). Each row is projected as soon as it is made and only
φ_r = Pᵀγ_r [k] is kept, so memory is one chunk of rows plus G_k, whatever N.
G_k is eigendecomposed once, G_k = V diag(s) Vᵀ.

**Scores.** The influence of training example i on a measurement m is

    τ = (Pᵀ∇m)ᵀ (G_k + λI)⁻¹ (Pᵀ∇ℓ_i) = (Vᵀφ_m)ᵀ diag(1/(s + λ)) (Vᵀφ_i)
                                                                  (``sketch_scores``)

with φ = Pᵀg the TRAK features of the gradients: TRAK's scorer with the kernel
ΦᵀΦ of N loss gradients replaced by the GGN in the same subspace. As an operator
on parameter-space vectors it is

    (G + λI)⁻¹ ≈ P (PᵀGP + λI)⁻¹ Pᵀ                         (``sketch_inverse_vp``)

**Why it converges.** By the push-through identity
P(PᵀGP + λI)⁻¹Pᵀ = PPᵀ(GPPᵀ + λI)⁻¹, and E[PPᵀ] = I for jattr's projections
(entries of variance 1/k), so as k grows PPᵀ → I (its deviation shrinks as
√(P/k)) and the sketch tends to (G + λI)⁻¹. The tests check this in float64
against ``dense_ggn``; with ``"ggn_exact"`` rows G_k equals PᵀGP exactly, and the
sampled estimate converges to it as 1/√S.

**Cost.** A row is one backward pass of one (example, draw) pair plus one
projection: N·K·S of each, against TRAK's N gradients (each over K pairs) and N
projections. The ``"sparse"`` projection makes a projection P·s scatter-adds instead
of 2·P·k flops, so the backward passes dominate. Damping: λ = ``damping_factor`` ×
the mean eigenvalue of G_k (0.1 by default, as every curvature of jattr).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jattr.curvature.ggn import (EstimationMode, accumulate_sqrt_grads, check_damping,
                                 check_estimation_mode)
from jattr.diffusion.draws import Draws
from jattr.diffusion.schedules import Schedule
from jattr.features.projection import ProjectionConfig, project
from jattr.grads.per_example import flatten_per_example
from jattr.progress import Progress
from jattr.types import ApplyFn, Parameterization, Params
from jattr.wrt import Selector, restrict

DEFAULT_SKETCH_SAMPLES = 16
"""S, sampled rows per (example, draw) pair: on the digits benchmark S = 4 reached
0.71 test LDS and S = 16 0.75, against 0.78 for the exact dense GGN
(docs/results.md)."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=["eigvals", "eigvecs"],
                   meta_fields=["projection", "num_parameters"])
@dataclasses.dataclass(frozen=True)
class SketchState:
  """G_k = Pᵀ G P = V diag(s) Vᵀ, the GGN in the span of a seeded projection.

  A pytree whose leaves are the eigenpairs; the projection (regenerated from its
  seed) and P are static.

  Attributes:
    eigvals: s [k], clipped at 0.
    eigvecs: V [k, k], columns the eigenvectors.
    projection: the ``ProjectionConfig`` of P (its ``dim`` is k).
    num_parameters: P, the length of the vectors P projects.
  """

  eigvals: jax.Array
  eigvecs: jax.Array
  projection: ProjectionConfig
  num_parameters: int

  @property
  def dim(self) -> int:
    return int(self.projection.dim)


@dataclasses.dataclass(frozen=True)
class _ProjectedGram:
  """The reduction of ``accumulate_sqrt_grads``: Σ_r φ_r φ_rᵀ with φ_r = Pᵀγ_r
  (hashable by its projection, so a refit reuses the compiled pass)."""

  projection: ProjectionConfig

  def __call__(self, rows, _):
    phi = project(self.projection, flatten_per_example(rows))
    return phi.T @ phi


def sketch_gram(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws,
                projection: ProjectionConfig, *,
                estimation_mode: EstimationMode = "ggn_curvature_prop",
                num_samples: int = DEFAULT_SKETCH_SAMPLES, key: jax.Array | None = None,
                batch_size: int | None = None, chunk_size: int | None = 256,
                parameterization: Parameterization = "eps",
                progress: Progress | None = None) -> jax.Array:
  """G_k = 1/(N K) Σ_r (Pᵀγ_r)(Pᵀγ_r)ᵀ [k, k], before its eigendecomposition.

  Arguments as in ``fit_sketched_ggn`` (``apply_fn`` and ``params`` already
  restricted to the selected parameters, if any).
  """
  check_estimation_mode(estimation_mode)
  if estimation_mode == "fisher_empirical":
    raise ValueError("the sketched GGN is built from GGN rows: use 'ggn_exact', "
                     "'ggn_curvature_prop' or 'fisher_gradients', not 'fisher_empirical'")
  return accumulate_sqrt_grads(
      _ProjectedGram(projection), None, apply_fn, params, schedule, x0, draws,
      estimation_mode=estimation_mode, key=key, num_samples=num_samples,
      batch_size=batch_size, chunk_size=chunk_size, parameterization=parameterization,
      progress=progress, desc="sketched GGN")


def sketch_state(gram, projection: ProjectionConfig, num_parameters: int) -> SketchState:
  """Eigendecomposes G_k once (float64 on the host, as ``dense_state``)."""
  g = np.asarray(gram, np.float64)
  k = int(projection.dim)
  if g.shape != (k, k):
    raise ValueError(f"gram must be [k, k] = [{k}, {k}] for this projection, got {g.shape}")
  s, v = np.linalg.eigh((g + g.T) / 2)
  return SketchState(np.maximum(s, 0.0), v, projection, int(num_parameters))


def fit_sketched_ggn(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws,
                     projection: ProjectionConfig, *,
                     estimation_mode: EstimationMode = "ggn_curvature_prop",
                     num_samples: int = DEFAULT_SKETCH_SAMPLES, key: jax.Array | None = None,
                     batch_size: int | None = None, chunk_size: int | None = 256,
                     parameterization: Parameterization = "eps",
                     progress: Progress | None = None, wrt: Selector = None) -> SketchState:
  """The sketched GGN G_k = PᵀGP of the training loss, eigendecomposed (module docstring).

  Args:
    apply_fn, params, schedule: as in ``jattr.curvature.ggn``.
    x0: the N training examples (images, or ``(images, cond)``).
    draws: the K fixed (t, ε) draws.
    projection: P; use the projection of the features it will score (``sketch_scores``
      takes φ = Pᵀg made with the same config). ``"sparse"`` is the cheap choice for
      large P.
    estimation_mode: ``"ggn_curvature_prop"`` (S Rademacher rows per pair, the
      default), ``"fisher_gradients"`` (S Gaussian rows) or ``"ggn_exact"`` (D rows per
      pair, exact: for small outputs and tests).
    num_samples: S of the sampled modes.
    key: PRNG key of the sampled modes (``None``: a fixed key 0).
    batch_size: examples per pass (each with all K draws); ``chunk_size``: rows per
      ``vmap`` inside a pass, so memory is chunk_size × P for the rows.
    parameterization: the loss's; G does not depend on it.
    progress: called after each batch (``jattr.progress``).
    wrt: the parameters θ_S of G (``jattr.wrt``; ``None``: all). P then projects
      ∇_{θ_S}, as ``featurize(..., wrt=)`` does.

  Returns:
    A ``SketchState``.
  """
  apply_fn, params = restrict(apply_fn, params, wrt)
  num_params = ravel_pytree(params)[0].size
  gram = sketch_gram(apply_fn, params, schedule, x0, draws, projection,
                     estimation_mode=estimation_mode, num_samples=num_samples, key=key,
                     batch_size=batch_size, chunk_size=chunk_size,
                     parameterization=parameterization, progress=progress)
  return sketch_state(gram, projection, num_params)


def sketch_damping(state: SketchState, damping: float | None = None, *,
                   damping_factor: float = 0.1):
  """λ: ``damping``, or ``damping_factor`` × the mean eigenvalue of G_k when None."""
  check_damping(damping)
  return damping_factor * jnp.mean(state.eigvals) if damping is None else damping


def sketch_scores(state: SketchState, query_features, train_features,
                  damping: float | None = None, *, damping_factor: float = 0.1) -> jax.Array:
  """τ[q, i] = φ_qᵀ (G_k + λI)⁻¹ φ_i from TRAK features φ = Pᵀg (same projection).

  Args:
    state: ``fit_sketched_ggn``.
    query_features: Pᵀ∇m_q [Q, k] (``jattr.features.featurize`` with the state's
      projection).
    train_features: Pᵀ∇ℓ_i [N, k].
    damping, damping_factor: λ, or ``damping_factor`` × the mean eigenvalue of G_k.

  Returns:
    τ [Q, N].
  """
  k = state.dim
  for name, f in (("query_features", query_features), ("train_features", train_features)):
    if np.ndim(f) != 2 or np.shape(f)[1] != k:
      raise ValueError(f"{name} must be [rows, k = {k}] (features of the state's projection), "
                       f"got shape {np.shape(f)}")
  lam = sketch_damping(state, damping, damping_factor=damping_factor)
  v = jnp.asarray(state.eigvecs, jnp.result_type(query_features))
  s = jnp.asarray(state.eigvals, v.dtype)
  rq = jnp.asarray(query_features) @ v
  rt = jnp.asarray(train_features) @ v
  return (rq / (s + lam)) @ rt.T


def _back_project(projection: ProjectionConfig, z: jax.Array, num_params: int) -> jax.Array:
  """P z [P] for z [k]: the transpose of ``project`` (exact, for every kind of P)."""
  zeros = jnp.zeros((1, num_params), z.dtype)
  _, transpose = jax.vjp(lambda g: project(projection, g), zeros)  # linear: vjp = Pᵀ's transpose
  (back,) = transpose(z[None])
  return back[0]


def sketch_inverse_vp(state: SketchState, v: Params, damping: float | None = None, *,
                      damping_factor: float = 0.1) -> Params:
  """P (G_k + λI)⁻¹ Pᵀ v, the sketch as an operator on a params-shaped vector.

  Args:
    state: ``fit_sketched_ggn``.
    v: a params-shaped vector (``ravel_pytree`` order, as the projection of features).
    damping, damping_factor: as in ``sketch_scores``.

  Returns:
    P (G_k + λI)⁻¹ Pᵀ v, shaped like ``v``.
  """
  flat, unravel = ravel_pytree(v)
  if flat.size != state.num_parameters:
    raise ValueError(f"the sketched GGN projects P = {state.num_parameters} parameters but v "
                     f"has {flat.size}")
  lam = sketch_damping(state, damping, damping_factor=damping_factor)
  vec = jnp.asarray(state.eigvecs, flat.dtype)
  s = jnp.asarray(state.eigvals, flat.dtype)
  phi = project(state.projection, flat[None])[0]
  z = vec @ ((vec.T @ phi) / (s + lam))
  return unravel(_back_project(state.projection, z, flat.size))
