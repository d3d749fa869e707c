"""The one dispatcher from a fitted curvature to its damped inverse.

Every curvature of jattr is a state (a pytree) with a cheap
``*_inverse_vp(state, v, damping) = (C + λI)⁻¹ v``. ``inverse_vp_fn`` picks it by
the state's type, so influence and the CLI never inspect curvature types
themselves; ``curvature_kind`` names a state for the files that store it.

=============  =================  ===============================
kind           state              (C + λI)⁻¹ v
=============  =================  ===============================
``kfac``       ``KfacState``      ``kfac_inverse_vp``
``ekfac``      ``EkfacState``     ``ekfac_inverse_vp``
``diagonal``   ``DiagonalState``  ``diagonal_inverse_vp``
``dense``      ``DenseState``     ``dense_state_inverse_vp``
``sketch``     ``SketchState``    ``sketch_inverse_vp``
``low_rank``   ``LowRankState``   ``low_rank_inverse_vp``
(raw matrix)   [P, P] array       ``dense_inverse_vp`` (a solve)
``None``       identity           ``identity_inverse_vp``
=============  =================  ===============================
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jattr.curvature.dense import DenseState, dense_inverse_vp, dense_state_inverse_vp
from jattr.curvature.diagonal import DiagonalState, diagonal_inverse_vp, identity_inverse_vp
from jattr.curvature.ekfac import EkfacState, ekfac_inverse_vp
from jattr.curvature.ggn import check_damping
from jattr.curvature.kfac import DEFAULT_DAMPING_FACTOR, KfacState, kfac_inverse_vp
from jattr.curvature.low_rank import LowRankState, low_rank_inverse_vp
from jattr.curvature.sketch import SketchState, sketch_inverse_vp
from jattr.types import Params

InverseVP = Callable[[Params], Params]
"""``inverse_vp(v) -> (C + λ I)⁻¹ v`` for ONE params-shaped vector."""

CURVATURE_KINDS = ("kfac", "ekfac", "diagonal", "dense", "sketch", "low_rank")
"""The kinds of fitted curvature a file can hold (``curvature_kind``)."""

_STATES = ((KfacState, "kfac", kfac_inverse_vp), (EkfacState, "ekfac", ekfac_inverse_vp),
           (DiagonalState, "diagonal", diagonal_inverse_vp),
           (DenseState, "dense", dense_state_inverse_vp),
           (SketchState, "sketch", sketch_inverse_vp),
           (LowRankState, "low_rank", low_rank_inverse_vp))


def curvature_kind(state: Any) -> str:
  """``"kfac"``, ``"ekfac"``, ``"diagonal"``, ``"dense"``, ``"sketch"`` or ``"low_rank"`` for a
  fitted state.

  Raises:
    TypeError: for anything else (a raw dense matrix too: wrap it with
      ``jattr.curvature.dense_state`` to store it).
  """
  for cls, kind, _ in _STATES:
    if isinstance(state, cls):
      return kind
  raise TypeError("state must be a KfacState, EkfacState, DiagonalState, DenseState, "
                  "SketchState or LowRankState, got "
                  f"{type(state).__name__} {getattr(state, 'shape', '')}")


def inverse_vp_fn(curvature, damping: float | None = None, *,
                  damping_factor: float = DEFAULT_DAMPING_FACTOR) -> InverseVP:
  """The (C + λ I)⁻¹ of a fitted curvature, as a function of one vector.

  Args:
    curvature: ``None`` (identity: τ is the gradient dot product), a
      ``KfacState``, ``EkfacState``, ``DiagonalState``, ``DenseState``, or a dense
      [P, P] matrix (``dense_ggn`` / ``dense_hessian``; solved for every vector).
    damping: λ ≥ 0; ``None`` uses each curvature's default, 0.1 × its mean
      eigenvalue (per block for K-FAC and EK-FAC). Ignored for the identity.
    damping_factor: the 0.1 of that default (only when ``damping`` is None): the
      scale-free knob to tune on validation queries, if one tunes at all.

  Returns:
    ``inverse_vp(v) -> params-like``, a ``jax.tree_util.Partial``: a pytree whose
    leaves are the curvature's arrays, so it can be passed into ``jax.jit``
    without baking the curvature in as constants.
  """
  check_damping(damping)
  if not damping_factor > 0:
    raise ValueError(f"damping_factor must be > 0, got {damping_factor}")
  if curvature is None:
    return Partial(identity_inverse_vp, None, damping=damping)
  kw = dict(damping=damping, damping_factor=damping_factor)
  for cls, _, fn in _STATES:
    if isinstance(curvature, cls):
      return Partial(fn, curvature, **kw)
  if isinstance(curvature, (jax.Array, np.ndarray)) and curvature.ndim == 2:
    return Partial(dense_inverse_vp, jnp.asarray(curvature), **kw)
  raise TypeError(
      "curvature must be None, a KfacState, EkfacState, DiagonalState, DenseState or a dense "
      f"[P, P] matrix, got {type(curvature).__name__}")
