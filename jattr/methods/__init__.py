"""Attribution methods: each returns a score matrix τ[q, i] (queries × train)."""

from jattr.methods.baselines import grad_cosine
from jattr.methods.baselines import grad_dot
from jattr.methods.baselines import pixel_cosine
from jattr.methods.baselines import tracin
from jattr.methods.influence import influence_scores
from jattr.methods.influence import precondition
from jattr.methods.scoring import dot_scores
from jattr.methods.scoring import tiled_scores
from jattr.methods.scoring import tiled_scores_into
from jattr.methods.trak import TrakState
from jattr.methods.trak import default_damping
from jattr.methods.trak import journey_noise
from jattr.methods.trak import journey_trak_scores
from jattr.methods.trak import trak_ensemble_score
from jattr.methods.trak import trak_fit
from jattr.methods.trak import trak_score
