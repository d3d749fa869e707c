"""EK-FAC: K-FAC's eigenbasis with eigenvalues refitted to the GGN (George et al. 2018).

K-FAC (``jattr.curvature.kfac``) approximates a layer's GGN block by A ⊗ G. Its
eigenvectors are Q_A ⊗ Q_G and its eigenvalues s_A,i s_G,j. EK-FAC keeps the
eigenvectors and replaces the eigenvalues by the exact second moments of the GGN
rows in that basis: with a layer's row γ_r laid out as a matrix M_r [d_in(+1), d_out]
(``kfac.to_block_matrix``; in the d_out × d_in convention for W it is Q_Gᵀ ∇W Q_A,
transposed),

    Λ_ij = 1/(N K) Σ_r ((Q_Aᵀ M_r Q_G)_ij)²,
    G_block ≈ (Q_A ⊗ Q_G) diag(Λ) (Q_A ⊗ Q_G)ᵀ.

Λ_ij = (q_A,i ⊗ q_G,j)ᵀ G_block (q_A,i ⊗ q_G,j) is the diagonal of the true block
in K-FAC's basis, so EK-FAC is the best approximation with that eigenbasis in
Frobenius norm: ‖G_block − EKFAC‖_F ≤ ‖G_block − KFAC‖_F, always. Unlike K-FAC it
does not assume activations and output gradients are independent, and it needs no
choice between "expand" and "reduce" for weight-shared layers beyond the basis:
the rows M_r are the true per-example (per-draw, per-output) gradients, summed over
positions. K-FAC's diagonal blocks (parameters outside dense and conv layers) get
the exact GGN diagonal.

``fit_ekfac`` takes K-FAC's eigenbases (``fit_kfac``, which eigendecomposes its
factors) and runs one extra pass over the training data with per-example GGN rows
(``jattr.curvature.ggn.ggn_sqrt_grads``, built on ``jattr.grads.per_example``).

State convention: ``fit_ekfac`` (expensive: one per-example-gradient pass) returns
an ``EkfacState``; ``ekfac_inverse_vp`` (cheap) applies
(Q diag(Λ + λ) Qᵀ)⁻¹ block by block.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattr.curvature.ggn import (DEFAULT_ESTIMATION_MODE, EstimationMode, accumulate_sqrt_grads,
                                 check_damping)
from jattr.curvature.kfac import (DEFAULT_DAMPING_FACTOR, DiagBlock, KfacState, check_vector,
                                  default_block_damping, from_block_matrix, to_block_matrix)
from jattr.diffusion.draws import Draws
from jattr.diffusion.schedules import Schedule
from jattr.progress import Progress
from jattr.types import ApplyFn, Parameterization, Params
from jattr.wrt import Selector, restrict


class EkfacBlock(NamedTuple):
  """One eigenvalue-corrected Kronecker block.

  Attributes:
    a_eigvecs: Q_A, [d_in(+1), d_in(+1)], from K-FAC's A.
    g_eigvecs: Q_G, [d_out, d_out], from K-FAC's G.
    eigvals: Λ, [d_in(+1), d_out], Λ_ij the eigenvalue of q_A,i ⊗ q_G,j.
  """

  a_eigvecs: jax.Array
  g_eigvecs: jax.Array
  eigvals: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EkfacState:
  """The fitted EK-FAC curvature.

  Attributes:
    blocks: one ``EkfacBlock`` (Kronecker layers) or ``kfac.DiagBlock`` (the exact
      GGN diagonal of K-FAC's diagonal blocks) per block.
    layout: the K-FAC state's static layout.
  """

  blocks: tuple
  layout: tuple = dataclasses.field(metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class _EigenbasisSquares:
  """``reduce_fn`` of ``fit_ekfac``: per Kronecker block Σ_r (Q_Aᵀ M_r Q_G)², per
  diagonal leaf Σ_r γ_r² (hashable by its layout: refits reuse the compiled pass)."""

  layout: tuple

  def __call__(self, rows, bases):
    leaves = jax.tree.leaves(rows)
    out = []
    for lay, basis in zip(self.layout, bases):
      if lay.kind == "kronecker":
        qa, qg = basis
        m = to_block_matrix(lay, leaves)
        out.append(jnp.sum(jnp.square(jnp.einsum("ai,rab,bj->rij", qa, m, qg)), axis=0))
      else:
        out.append(tuple(jnp.sum(jnp.square(leaves[i]), axis=0) for i in lay.leaf_indices))
    return tuple(out)


def fit_ekfac(apply_fn: ApplyFn, params: Params, schedule: Schedule, x0, draws: Draws,
              kfac_state: KfacState, *,
              estimation_mode: EstimationMode = DEFAULT_ESTIMATION_MODE,
              key: jax.Array | None = None, num_samples: int = 1,
              batch_size: int | None = None, chunk_size: int | None = None,
              parameterization: Parameterization = "eps", wrt: Selector = None,
              progress: Progress | None = None) -> EkfacState:
  """Refits K-FAC's eigenvalues to the second moments of the GGN rows.

  Args:
    apply_fn, params, schedule: as in ``fit_kfac``.
    x0: training images [N, H, W, C] (the same as K-FAC's).
    draws: the K fixed (t, ε) draws (the same as K-FAC's).
    kfac_state: from ``fit_kfac``; its eigenbases are kept.
    estimation_mode: how G is factored into rows (``ggn.ESTIMATION_MODES``);
      ``"ggn_exact"`` costs D rows per example-draw.
    key, num_samples: of the sampled modes.
    batch_size: examples per pass (memory: batch_size·K·rows·P).
    chunk_size: rows per ``vmap`` inside a pass.
    parameterization: only ``"fisher_empirical"`` uses it.
    wrt: the parameter selection (``jattr.wrt``): the same as ``fit_kfac``'s.
    progress: called after each batch with examples done, stage ``"ekfac"``
      (``jattr.progress``).

  Returns:
    An ``EkfacState``.
  """
  if not isinstance(kfac_state, KfacState):
    raise TypeError("kfac_state must be a KfacState from fit_kfac, got "
                    f"{type(kfac_state).__name__}")
  apply_fn, params = restrict(apply_fn, params, wrt)
  layout = kfac_state.layout
  check_vector(layout, params, name="params")
  bases = tuple((b.a_eigvecs, b.g_eigvecs) if lay.kind == "kronecker" else None
                for lay, b in zip(layout, kfac_state.blocks))

  stats = accumulate_sqrt_grads(
      _EigenbasisSquares(layout), bases, apply_fn, params, schedule, x0, draws,
      estimation_mode=estimation_mode, key=key, num_samples=num_samples, batch_size=batch_size, chunk_size=chunk_size,
      parameterization=parameterization, progress=progress, desc="ekfac")
  blocks = tuple(
      EkfacBlock(basis[0], basis[1], s) if lay.kind == "kronecker" else DiagBlock(tuple(s))
      for lay, basis, s in zip(layout, bases, stats))
  return EkfacState(blocks, layout)


def ekfac_inverse_vp(state: EkfacState, v: Params, damping: float | None = None, *,
                     damping_factor: float = DEFAULT_DAMPING_FACTOR) -> Params:
  """(Q diag(Λ) Qᵀ + λ I)⁻¹ v block by block, Q = Q_A ⊗ Q_G.

  Args:
    state: from ``fit_ekfac``.
    v: a params-shaped vector (no batch axis).
    damping: λ ≥ 0 for every block; ``None`` uses 0.1 × mean(Λ) per block.
    damping_factor: the 0.1 of the default (used only when ``damping`` is None).

  Returns:
    The preconditioned vector, shaped like ``v``.
  """
  return _apply(state, v, damping, inverse=True, damping_factor=damping_factor)


def ekfac_matvec(state: EkfacState, v: Params) -> Params:
  """(Q diag(Λ) Qᵀ) v block by block; undamped."""
  return _apply(state, v, 0.0, inverse=False)


def ekfac_eigenvalues(state: EkfacState) -> tuple[jax.Array, ...]:
  """The eigenvalues Λ of each block, flattened (the diagonal for diagonal blocks)."""
  return tuple(blk.eigvals.ravel() if lay.kind == "kronecker"
               else jnp.concatenate([d.ravel() for d in blk.diag])
               for lay, blk in zip(state.layout, state.blocks))


def _apply(state: EkfacState, v: Params, damping, inverse: bool,
           damping_factor: float = DEFAULT_DAMPING_FACTOR) -> Params:
  check_damping(damping)
  leaves = check_vector(state.layout, v)
  out = list(leaves)
  for lay, blk, eig in zip(state.layout, state.blocks, ekfac_eigenvalues(state)):
    lam = default_block_damping(eig, damping_factor) if damping is None else damping
    if lay.kind == "kronecker":
      m = blk.a_eigvecs.T @ to_block_matrix(lay, leaves) @ blk.g_eigvecs
      m = m / (blk.eigvals + lam) if inverse else m * blk.eigvals
      from_block_matrix(lay, blk.a_eigvecs @ m @ blk.g_eigvecs.T, out)
    else:
      for i, d in zip(lay.leaf_indices, blk.diag):
        out[i] = leaves[i] / (d + lam) if inverse else leaves[i] * d
  return jax.tree.unflatten(jax.tree.structure(v), out)
