"""The package's layering, read from the import graph with ``ast``.

    types, progress, host_memory < layers < data < diffusion < models < grads
      < features < curvature < train < methods < eval        (the core: pure)
      < io                                                    (leaves on disk)
      < runs, bench                                           (workflows; peers)
      < cli                                                   (argparse only)

Each layer imports only layers below it (or itself). The core imports no argparse
or tqdm and writes no files; ``io`` takes only types and constants from the core
(and ``curvature_kind``, which names a state for the file that stores it); argparse
lives in ``jattr/cli`` alone; no function-level imports but of optional
dependencies, marked with a comment saying why; no private name imported across
packages, and none at all by ``benchmarks/`` and ``experiments/``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jattr"

RANKS = {"types": 0, "progress": 0, "host_memory": 0, "wrt": 0, "devices": 0, "layers": 1,
         "layer_registry": 1, "data": 2, "diffusion": 3,
         "models": 4, "grads": 5, "features": 6, "curvature": 7, "train": 8, "methods": 9,
         "eval": 10, "io": 11, "runs": 12, "bench": 12, "cli": 13, "__main__": 14}
CORE = {name for name, rank in RANKS.items() if rank <= RANKS["eval"]}
IO_MAY_CALL = {"curvature_kind"}
WRITE_CALLS = {"savez", "savez_compressed", "write_text", "write_bytes", "tofile", "mkdir",
               "replace", "rename", "rmtree", "copyfile", "to_csv"}
WRITE_OWNERS = {"np", "numpy", "os", "shutil", "pathlib"}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
  """``jattr.curvature.kfac`` -> ``curvature``; None for the package root."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[0] == "jattr" else None


class _Imports(ast.NodeVisitor):
  """Every import of a file: (line, target module, imported names, at top level?)."""

  def __init__(self, module: str, is_package: bool):
    self.module, self.is_package = module, is_package
    self.found: list[tuple[int, str, list[str], bool]] = []
    self.depth = 0

  def _scoped(self, node):
    self.depth += 1
    self.generic_visit(node)
    self.depth -= 1

  visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scoped

  def visit_Import(self, node):
    for alias in node.names:
      self.found.append((node.lineno, alias.name, [], self.depth == 0))

  def visit_ImportFrom(self, node):
    if node.level:
      base = self.module.split(".")
      if not self.is_package:
        base = base[:-1]
      base = base[:len(base) - (node.level - 1)]
      target = ".".join(base + ([node.module] if node.module else []))
    else:
      target = node.module
    self.found.append((node.lineno, target, [a.name for a in node.names], self.depth == 0))


def _files(folder: pathlib.Path):
  return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: pathlib.Path):
  visitor = _Imports(_module_name(path), path.name == "__init__.py")
  visitor.visit(ast.parse(path.read_text(), str(path)))
  return visitor.found


def _jattr_target(target: str, names: list[str]) -> list[str]:
  """The jattr modules an import statement reaches (``from jattr import x`` -> jattr.x)."""
  if target == "jattr":  # subpackages; root attributes (__version__) belong to no layer
    return [f"jattr.{n}" for n in names if n in RANKS]
  return [target] if target.startswith("jattr.") else []


def test_every_module_is_in_a_known_layer():
  layers = {_layer(_module_name(p)) for p in _files(PACKAGE)} - {None}
  assert layers <= set(RANKS), f"modules outside the known layers: {layers - set(RANKS)}"


def test_each_layer_imports_only_layers_below_it():
  bad = []
  for path in _files(PACKAGE):
    own = _layer(_module_name(path))
    if own is None:
      continue
    for line, target, names, _ in _imports(path):
      for mod in _jattr_target(target, names):
        other = _layer(mod)
        if other is None or other == own:
          continue
        if other not in RANKS or RANKS[other] >= RANKS[own]:
          bad.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {mod} ({other})")
  assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_core_has_no_argparse_tqdm_or_file_writes():
  bad = []
  for path in _files(PACKAGE):
    layer = _layer(_module_name(path))
    rel = path.relative_to(ROOT)
    for line, target, names, _ in _imports(path):
      top = target.split(".")[0]
      if top == "argparse" and layer != "cli":
        bad.append(f"{rel}:{line}: argparse outside jattr/cli")
      if top == "tqdm" and layer != "cli":
        bad.append(f"{rel}:{line}: tqdm outside jattr/cli")
    if layer not in CORE:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if not isinstance(node, ast.Call):
        continue
      fn = node.func
      if isinstance(fn, ast.Name) and fn.id == "open":
        mode = node.args[1] if len(node.args) > 1 else next(
            (k.value for k in node.keywords if k.arg == "mode"), None)
        if not (isinstance(mode, ast.Constant) and set(str(mode.value)) <= {"r", "b", "t"}):
          bad.append(f"{rel}:{node.lineno}: open() for writing in the core")
      elif isinstance(fn, ast.Attribute) and fn.attr in WRITE_CALLS:
        owner = fn.value.id if isinstance(fn.value, ast.Name) else None
        if fn.attr in ("write_text", "write_bytes", "mkdir", "tofile", "to_csv") or (
            owner in WRITE_OWNERS):
          bad.append(f"{rel}:{node.lineno}: {ast.unparse(fn)}() writes files in the core")
      elif isinstance(fn, ast.Attribute) and fn.attr == "save" and isinstance(
          fn.value, ast.Name) and fn.value.id in ("np", "numpy"):
        bad.append(f"{rel}:{node.lineno}: np.save() in the core")
  assert not bad, "\n".join(bad)


def test_io_takes_only_types_and_constants_from_the_core():
  bad = []
  for path in _files(PACKAGE / "io"):
    for line, target, names, _ in _imports(path):
      for mod in _jattr_target(target, names):
        if _layer(mod) not in CORE:
          continue
        if target == "jattr" or not names:
          bad.append(f"{path.relative_to(ROOT)}:{line}: io imports the module {mod}")
          continue
        for name in names:
          if not (name[:1].isupper() or name in IO_MAY_CALL):
            bad.append(f"{path.relative_to(ROOT)}:{line}: io imports {name} from {mod} "
                       "(core compute)")
  assert not bad, "\n".join(bad)


def _comment_near(lines: list[str], line: int) -> str:
  return " ".join(lines[max(0, line - 2):line])


OPTIONAL_MODULES = {"jattr.curvature.kfac_jax_backend"}
"""jattr modules that import an optional dependency at their top (kfac-jax: the ``kfac``
extra); they may be imported only inside the function that needs them."""


def test_no_function_level_imports_but_marked_optional_dependencies():
  bad = []
  for path in _files(PACKAGE):
    lines = path.read_text().splitlines()
    for line, target, names, top in _imports(path):
      if top:
        continue
      jattr_mods = set(_jattr_target(target, names)) - OPTIONAL_MODULES
      if jattr_mods or "optional" not in _comment_near(lines, line):
        bad.append(f"{path.relative_to(ROOT)}:{line}: import {target} inside a function")
  assert not bad, ("function-level imports (allowed only for optional dependencies, with a "
                   "comment saying 'optional' and why):\n" + "\n".join(bad))


class _PrivateUse(ast.NodeVisitor):
  """``mod._name`` where ``mod`` is a name bound to a jattr module by an import."""

  def __init__(self, aliases: dict[str, str]):
    self.aliases, self.found = aliases, []

  def visit_Attribute(self, node):
    if (isinstance(node.value, ast.Name) and node.value.id in self.aliases
        and node.attr.startswith("_") and not node.attr.startswith("__")):
      self.found.append((node.lineno, self.aliases[node.value.id], node.attr))
    self.generic_visit(node)


def _private_uses(path: pathlib.Path):
  """(line, source module, private name) for every private jattr name a file uses."""
  tree = ast.parse(path.read_text())
  out, aliases = [], {}
  own = _module_name(path) if path.is_relative_to(PACKAGE) else ""
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      found = _Imports(own, path.name == "__init__.py")
      found.visit(ast.Module(body=[node], type_ignores=[]))
      (_, target, _, _), = found.found
      if not (target == "jattr" or target.startswith("jattr.")):
        continue
      for a in node.names:
        if a.name.startswith("_") and not a.name.endswith("__"):
          out.append((node.lineno, target, a.name))
        else:
          aliases[a.asname or a.name] = f"{target}.{a.name}"
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("jattr"):
          aliases[a.asname or a.name.split(".")[0]] = a.name
          if any(part.startswith("_") and part != "__main__" for part in a.name.split(".")):
            out.append((node.lineno, a.name, a.name))
  visitor = _PrivateUse(aliases)
  visitor.visit(tree)
  return out + visitor.found


def test_no_private_names_across_packages():
  bad = []
  for path in _files(PACKAGE):
    own = _layer(_module_name(path))
    for line, source, name in _private_uses(path):
      if _layer(source) != own:
        bad.append(f"{path.relative_to(ROOT)}:{line}: {name} from {source}")
  assert not bad, "private names imported across packages:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", ["benchmarks", "experiments"])
def test_scripts_use_public_names_only(folder):
  bad = [f"{p.relative_to(ROOT)}:{line}: {name} from {source}"
         for p in _files(ROOT / folder) for line, source, name in _private_uses(p)]
  assert not bad, f"private jattr names used in {folder}/:\n" + "\n".join(bad)


def test_the_checks_catch_what_they_forbid(tmp_path):
  """The rules above fire on a file that breaks each of them (so they can fail)."""
  fake = PACKAGE / "methods" / "_layering_probe.py"
  fake.write_text("import argparse\n"
                  "from jattr.io import atomic\n"
                  "from jattr.train.loop import _private\n"
                  "def f():\n"
                  "  from jattr.grads import map_chunks\n"
                  "  open('x', 'w')\n"
                  "  np.savez('x.npz')\n")
  try:
    for test in (test_each_layer_imports_only_layers_below_it,
                 test_core_has_no_argparse_tqdm_or_file_writes,
                 test_no_function_level_imports_but_marked_optional_dependencies,
                 test_no_private_names_across_packages):
      with pytest.raises(AssertionError, match="_layering_probe"):
        test()
  finally:
    fake.unlink()
