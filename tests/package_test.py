"""Package layout: no package attribute hides a submodule of the same name."""

import importlib
import pkgutil

import jattr

OPTIONAL_EXTRAS = {"kfac_jax": "kfac"}
"""Packages of the optional extras (pyproject.toml): a jattr module that imports one
is checked only where its extra is installed (.ci/run's pinned-stack stage)."""


def test_no_reexport_shadows_a_submodule():
  # `from jattr.methods import influence` once returned a re-exported function
  # instead of the module and broke CI; every package is checked here.
  shadowed = []
  for info in pkgutil.walk_packages(jattr.__path__, "jattr."):
    if info.name.endswith("__main__"):  # importing it runs the CLI
      continue
    try:
      module = importlib.import_module(info.name)
    except ModuleNotFoundError as e:
      if e.name in OPTIONAL_EXTRAS:  # e.g. jattr.curvature.kfac_jax_backend, no kfac extra
        continue
      raise
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


def test_no_package_file_is_git_ignored():
  # A `runs/` pattern in .gitignore once hid jattr/runs/__init__.py: the package worked
  # here and failed to import in every fresh clone.
  import pathlib
  import shutil
  import subprocess

  root = pathlib.Path(jattr.__file__).resolve().parents[1]
  if not (root / ".git").exists() or shutil.which("git") is None:
    return  # an installed copy, not a checkout: nothing can be ignored
  files = [str(p.relative_to(root)) for p in (root / "jattr").rglob("*.py")
           if "__pycache__" not in p.parts]
  out = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=root,
                       capture_output=True, text=True)
  assert out.stdout.strip() == "", f"git ignores package files: {out.stdout.split()}"
