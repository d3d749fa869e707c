"""The LDS / counterfactual benchmark harness: the retrained-subset cache, the method
registry and adapters, and the drivers behind ``jattr lds`` and
``jattr counterfactual``."""

from jattr.bench.drivers import build_cache
from jattr.bench.drivers import chosen_hparams
from jattr.bench.drivers import load_config
from jattr.bench.drivers import run_counterfactual
from jattr.bench.drivers import run_lds
from jattr.bench.lds_cache import LdsCache
from jattr.bench.lds_cache import LdsSpec
from jattr.bench.registry import METHODS
