"""Every ```python block of README.md and docs/*.md runs.

Each file's python blocks are executed in order in one namespace (later blocks build
on earlier ones, as a reader running them in one session would), starting from a
fresh namespace per file, inside a temporary working directory. One test case per
block, named ``<file>-<index>-L<line>``; a case first runs any earlier block of its
file that has not run yet, so ``-k`` can select one block. A block that must not run
(a signature, pseudo-code, a command line) belongs in a non-python fence (```text,
```bash), never in a python one: nothing here is skipped.

The examples are written small (a tiny model, few steps, few examples) so that the
whole file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import traceback

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHON_LANGS = ("python", "py", "python3")

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclasses.dataclass(frozen=True)
class Block:
  path: pathlib.Path
  line: int        # 1-based line of the opening fence
  lang: str        # first word of the info string, lower case ("" when none)
  code: str


def fenced_blocks(path: pathlib.Path) -> list[Block]:
  """The fenced code blocks of a Markdown file (CommonMark fences, not nested)."""
  lines = path.read_text(encoding="utf-8").splitlines()
  blocks, i = [], 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    fence, info = m.group("fence"), m.group("info").strip()
    start, body, i = i, [], i + 1
    while i < len(lines):
      close = _FENCE.match(lines[i])
      if (close and close.group("fence")[0] == fence[0]
          and len(close.group("fence")) >= len(fence) and not close.group("info").strip()):
        break
      body.append(lines[i])
      i += 1
    else:
      raise ValueError(f"{path.name}:{start + 1}: fence {fence!r} is never closed")
    indent = len(m.group("indent"))  # CommonMark: strip up to the fence's indentation
    code = "\n".join(b[min(indent, len(b) - len(b.lstrip(" "))):] for b in body)
    blocks.append(Block(path, start + 1, info.split()[0].lower() if info else "", code + "\n"))
    i += 1
  return blocks


def python_blocks(path: pathlib.Path) -> list[Block]:
  return [b for b in fenced_blocks(path) if b.lang in PYTHON_LANGS]


def _rel(path: pathlib.Path) -> str:
  return path.relative_to(REPO).as_posix()


CASES = [(path, index, block) for path in DOC_FILES
         for index, block in enumerate(python_blocks(path))]


@dataclasses.dataclass
class _FileRun:
  namespace: dict
  workdir: pathlib.Path
  done: int = 0                 # blocks executed so far, in order
  failed: int | None = None     # index of the block that raised, if any


_RUNS: dict[pathlib.Path, _FileRun] = {}


def _execute(run: _FileRun, block: Block, index: int) -> None:
  name = f"{_rel(block.path)}, python block {index} (line {block.line})"
  # Line numbers in tracebacks are those of the Markdown file.
  code = compile("\n" * block.line + block.code, name, "exec")
  cwd = os.getcwd()
  os.chdir(run.workdir)
  try:
    exec(code, run.namespace)  # pylint: disable=exec-used
  except BaseException:
    run.failed = index
    raise
  finally:
    os.chdir(cwd)
    run.done = max(run.done, index + 1)


@pytest.mark.parametrize(
    "path,index,block", CASES,
    ids=[f"{_rel(p)}-{i}-L{b.line}" for p, i, b in CASES])
def test_python_block_runs(path, index, block, tmp_path_factory):
  run = _RUNS.get(path)
  if run is None:
    run = _RUNS[path] = _FileRun(
        namespace={"__name__": "__docs__"},
        workdir=tmp_path_factory.mktemp(re.sub(r"\W", "_", _rel(path))))
  blocks = python_blocks(path)
  for j in range(run.done, index):  # earlier blocks this one builds on
    try:
      _execute(run, blocks[j], j)
    except Exception:  # pylint: disable=broad-except
      pytest.fail(f"earlier block {j} (line {blocks[j].line}) of {_rel(path)} failed:\n"
                  f"{traceback.format_exc()}")
  if run.failed is not None and run.failed < index:
    j = run.failed
    pytest.fail(f"earlier block {j} (line {blocks[j].line}) of {_rel(path)} failed; "
                "this block builds on it")
  _execute(run, block, index)


def test_docs_have_python_blocks():
  """The collection above found the examples (a parser bug would make it vacuous)."""
  assert any(p.name == "README.md" for p, _, _ in CASES)
  assert len(CASES) >= 5, [f"{_rel(p)}:{b.line}" for p, _, b in CASES]


@pytest.mark.parametrize("path", DOC_FILES, ids=[_rel(p) for p in DOC_FILES])
def test_every_fence_names_its_language(path):
  """An unlabelled fence could hide python from the runner: every fence says what it is."""
  unlabelled = [b.line for b in fenced_blocks(path) if not b.lang]
  assert not unlabelled, f"{_rel(path)}: fences without a language at lines {unlabelled}"


def test_fence_parser(tmp_path):
  text = ("intro\n```python\nif x:\n  y = 1\n```\n\n```text\nnot code\n```\n"
          "````python\n```\ninner = 2\n````\n  ```py\n  y = 3\n    z = 4\n  ```\n")
  path = tmp_path / "sample.md"
  path.write_text(text, encoding="utf-8")
  blocks = fenced_blocks(path)
  assert [(b.line, b.lang) for b in blocks] == [(2, "python"), (7, "text"), (10, "python"),
                                               (14, "py")]
  assert blocks[0].code == "if x:\n  y = 1\n"
  assert blocks[2].code == "```\ninner = 2\n"
  assert blocks[3].code == "y = 3\n  z = 4\n"
