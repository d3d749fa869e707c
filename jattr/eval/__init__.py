"""Evaluation of attribution: LDS with its noise ceiling, measurements, honest
selection, counterfactual retraining, SSIM.

The functions named like their modules (``lds``, ``counterfactual``, ``spearman``,
``ssim``) are not re-exported here: a package attribute of the same name as a
submodule hides the module (``from jattr.eval import lds`` would return the
function). Call them as ``jattr.eval.lds.lds`` etc.; tests/package_test.py checks.
"""

from jattr.eval.counterfactual import CounterfactualResult
from jattr.eval.counterfactual import removal_sets
from jattr.eval.lds import LdsResult
from jattr.eval.lds import bootstrap_ci
from jattr.eval.lds import lds_per_query
from jattr.eval.lds import noise_ceiling
from jattr.eval.lds import paired_difference
from jattr.eval.lds import spearman_brown
from jattr.eval.lds import split_halves
from jattr.eval.lds import subset_masks
from jattr.eval.lds import subset_size
from jattr.eval.lds import subset_sums
from jattr.eval.lds import summarize
from jattr.eval.measure import measure_loss
from jattr.eval.measure import measure_members
from jattr.eval.measure import member_measure_fn
from jattr.eval.selection import VALIDATION
from jattr.eval.selection import MethodReport
from jattr.eval.selection import Queries
from jattr.eval.selection import QuerySet
from jattr.eval.selection import results_table
from jattr.eval.selection import select_and_evaluate
from jattr.eval.spearman import pearson
from jattr.eval.spearman import rankdata
