"""Gradient features: seeded random projections, dense and structured (Kronecker)."""

from jattr.features.projection import ProjectionConfig
from jattr.features.projection import block_matrix
from jattr.features.projection import featurize
from jattr.features.projection import project
from jattr.features.projection import project_grads_fn
from jattr.features.projection import projection_matrix
from jattr.layers import Conv
from jattr.layers import Dense
from jattr.features.structured import StructuredConfig
from jattr.layers import apply_layer
from jattr.features.structured import layer_projections
from jattr.layers import plain_layer
from jattr.features.structured import structured_featurize
from jattr.features.structured import structured_features_fn
from jattr.features.structured import structured_layout
