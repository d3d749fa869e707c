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


def test_subpackages_are_attributes_of_the_package():
  # `import jattr; jattr.diffusion` raised AttributeError once: subpackages now load
  # on first attribute access. A fresh interpreter, so nothing was imported before.
  import subprocess
  import sys

  names = sorted(info.name for info in pkgutil.iter_modules(jattr.__path__)
                 if info.name != "__main__")
  code = ("import jattr, types\n"
          f"for name in {names!r}:\n"
          "  assert isinstance(getattr(jattr, name), types.ModuleType), name\n"
          "print(jattr.diffusion.linear(10).num_timesteps)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "10"
  assert set(names) == set(jattr._SUBPACKAGES)
