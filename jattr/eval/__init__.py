"""Evaluation of attribution: LDS with its noise ceiling, counterfactual retraining, SSIM.

The functions named like their modules (``lds``, ``counterfactual``, ``spearman``,
``ssim``) are not re-exported here: a package attribute of the same name as a
submodule hides the module (``from jattr.eval import lds`` would return the
function). Call them as ``jattr.eval.lds.lds`` etc.; tests/package_test.py checks.
"""

from jattr.eval.counterfactual import CounterfactualResult
from jattr.eval.counterfactual import removal_sets
from jattr.eval.lds import LdsResult
from jattr.eval.lds import MethodReport
from jattr.eval.lds import Queries
from jattr.eval.lds import QuerySet
from jattr.eval.lds import bootstrap_ci
from jattr.eval.lds import lds_per_query
from jattr.eval.lds import measure_loss
from jattr.eval.lds import measure_members
from jattr.eval.lds import member_measure_fn
from jattr.eval.lds import noise_ceiling
from jattr.eval.lds import results_table
from jattr.eval.lds import select_and_evaluate
from jattr.eval.lds import spearman_brown
from jattr.eval.lds import split_halves
from jattr.eval.lds import subset_masks
from jattr.eval.lds import subset_size
from jattr.eval.lds import subset_sums
from jattr.eval.lds import summarize
from jattr.eval.spearman import pearson
from jattr.eval.spearman import rankdata
