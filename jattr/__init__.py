"""jattr: training-data attribution for diffusion models, in JAX.

Subpackages load on first use (``import jattr; jattr.diffusion.linear(1000)``), so
``import jattr`` itself stays cheap.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("bench", "cli", "curvature", "data", "devices", "diffusion", "eval", "features",
                "grads", "host_memory", "io", "layer_registry", "layers", "methods", "models",
                "progress", "runs", "train", "types", "wrt")


def __getattr__(name: str):
  if name in _SUBPACKAGES:
    return importlib.import_module(f"jattr.{name}")
  raise AttributeError(f"module 'jattr' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_SUBPACKAGES])
