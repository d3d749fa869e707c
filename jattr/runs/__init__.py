"""Run directories and the workflows on them: train, sample, attribute, featurize,
fit curvature, influence, unlearning. The CLI and the experiment drivers call these;
the core below them neither parses flags nor decides where files go."""

from jattr.runs.config import QUERIES
from jattr.runs.config import AttributionConfig
from jattr.runs.config import RunConfig
from jattr.runs.config import load_config
from jattr.runs.curvature import CURVATURES
from jattr.runs.curvature import curvature_meta
from jattr.runs.curvature import dense_ggn_batched
from jattr.runs.curvature import fit_run_curvature
from jattr.runs.curvature import influence_run
from jattr.runs.curvature import write_influence
from jattr.runs.features import SCORE_METHODS
from jattr.runs.features import SPEC_DEFAULTS
from jattr.runs.features import featurize_run
from jattr.runs.features import query_examples
from jattr.runs.features import resolve_spec
from jattr.runs.features import score_stores
from jattr.runs.features import write_scores
from jattr.runs.mucs import load_queries
from jattr.runs.mucs import mucs_run
from jattr.runs.report import query_labels
from jattr.runs.report import read_scores
from jattr.runs.report import report_run
from jattr.runs.report_parts import label_names
from jattr.runs.report_parts import pixel_neighbours
from jattr.runs.report_parts import write_run_report
from jattr.runs.run import attribute_run
from jattr.runs.run import load_run
from jattr.runs.run import model_fns
from jattr.runs.run import sample
from jattr.runs.run import sample_run
from jattr.runs.run import train_run
from jattr.runs.run import training_data
from jattr.runs.stores import check_selection
from jattr.runs.stores import selection_record
from jattr.runs.stores import store_featurize
