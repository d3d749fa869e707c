"""Package layout: no package attribute hides a submodule of the same name."""

import importlib
import pkgutil

import jattr


def test_no_reexport_shadows_a_submodule():
  # `from jattr.methods import influence` once returned a re-exported function
  # instead of the module and broke CI; every package is checked here.
  shadowed = []
  for info in pkgutil.walk_packages(jattr.__path__, "jattr."):
    if info.name.endswith("__main__"):  # importing it runs the CLI
      continue
    module = importlib.import_module(info.name)
    parent, _, leaf = info.name.rpartition(".")
    attr = getattr(importlib.import_module(parent), leaf, None)
    if attr is not module:
      shadowed.append(f"{parent}.{leaf} is {type(attr).__name__}")
  assert not shadowed, shadowed
