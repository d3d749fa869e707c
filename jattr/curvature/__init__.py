"""Curvature of the diffusion training loss: the GGN and its approximations.

Every approximation has the same split: an expensive ``fit_*`` returning a state
(a pytree the user can save) and a cheap ``*_inverse_vp(state, v, damping)``
applying (C + λ I)⁻¹ to one params-shaped vector (``damping=None``: 0.1 × the mean
eigenvalue, per block for K-FAC and EK-FAC); ``inverse_vp_fn`` dispatches on the
state. See docs/influence.md.
"""

from jattr.curvature.dense import MAX_DENSE_PARAMS
from jattr.curvature.dense import DenseState
from jattr.curvature.dense import dense_ggn
from jattr.curvature.dense import dense_hessian
from jattr.curvature.dense import dense_inverse_vp
from jattr.curvature.dense import dense_operator
from jattr.curvature.dense import dense_state
from jattr.curvature.dense import dense_state_inverse_vp
from jattr.curvature.diagonal import DiagonalState
from jattr.curvature.diagonal import diagonal_inverse_vp
from jattr.curvature.diagonal import diagonal_matvec
from jattr.curvature.diagonal import fit_diagonal
from jattr.curvature.diagonal import identity_inverse_vp
from jattr.curvature.ekfac import EkfacState
from jattr.curvature.ekfac import ekfac_eigenvalues
from jattr.curvature.ekfac import ekfac_inverse_vp
from jattr.curvature.ekfac import ekfac_matvec
from jattr.curvature.ekfac import fit_ekfac
from jattr.curvature.ggn import DEFAULT_ESTIMATION_MODE
from jattr.curvature.ggn import ESTIMATION_MODES
from jattr.curvature.ggn import check_damping
from jattr.curvature.ggn import example_draw_pairs
from jattr.curvature.ggn import ggn_matvec
from jattr.curvature.ggn import ggn_sqrt_grads
from jattr.curvature.ggn import training_loss
from jattr.curvature.inverse_vp import CURVATURE_KINDS
from jattr.curvature.inverse_vp import InverseVP
from jattr.curvature.inverse_vp import curvature_kind
from jattr.curvature.inverse_vp import inverse_vp_fn
from jattr.curvature.kfac import DEFAULT_DAMPING_FACTOR
from jattr.curvature.kfac import WEIGHT_SHARING
from jattr.curvature.kfac import KfacState
from jattr.curvature.kfac import fit_kfac
from jattr.curvature.kfac import kfac_eigenvalues
from jattr.curvature.kfac import kfac_inverse_vp
from jattr.curvature.kfac import kfac_matvec
from jattr.curvature.low_rank import LowRankState
from jattr.curvature.low_rank import fit_low_rank_ggn
from jattr.curvature.low_rank import lanczos_eigh
from jattr.curvature.low_rank import low_rank_inverse_vp
from jattr.curvature.low_rank import low_rank_matvec
from jattr.curvature.sketch import DEFAULT_SKETCH_SAMPLES
from jattr.curvature.sketch import SketchState
from jattr.curvature.sketch import fit_sketched_ggn
from jattr.curvature.sketch import sketch_inverse_vp
from jattr.curvature.sketch import sketch_scores
