"""Randomly corrupted config files and store sidecars fed to the CLI, in-process.

Three valid documents are corrupted, with a fixed seed, in every way a file gets
damaged or mistyped: keys renamed (typos, at the top and nested), required keys
deleted, values of the wrong type, values out of range, the text truncated, garbage
bytes inserted. Each corrupted file goes to the command that reads it:

    a RunConfig JSON               jattr train --config BAD --out OUT
    an LDS experiment config       jattr lds --config BAD --cache-root OUT/cache
                                             --results OUT/results.json
    a feature store's store.json   jattr score --train-store BAD --query-store GOOD
                                               --out OUT/scores.npz

and every one must end with exit status 2 and one line ``jattr CMD: error: …`` that
names the file or the corrupted key, no traceback, nothing under OUT, and no file
anywhere else in the tree changed (hashed before and after). The valid documents
themselves are accepted (checked first), so what is refused is the corruption.
Everything is refused before any training or scoring: the test takes seconds.
"""

import copy
import dataclasses
import hashlib
import json
import pathlib
import random
import shutil

import pytest

from jattr import cli
from jattr.bench import lds_cache, load_config
from jattr.bench.drivers import BootstrapConfig, CounterfactualConfig, ExperimentConfig
from jattr.diffusion import Schedule
from jattr.models import UNetConfig
from jattr.runs import AttributionConfig, RunConfig
from jattr.train import TrainConfig

from reliability_test import TINY, TINY_LDS, _store

SEED = 20240601
SHOW = False  # print every refusal (pytest -s)
COUNTS = {"rename": 14, "nested_typo": 10, "wrong_type": 18, "truncate": 8, "garbage": 8}
"""Random corruptions per document and kind (deletions and out-of-range values are
listed in full below, per document)."""

WRONG = {int: ["48", 4.5, True, [1], {}], float: ["0.5", True, [0.5], {}],
         str: [5, True, ["x"], {}], bool: [1, "true", []], list: ["x", 5, {}, True],
         dict: ["x", 5, [], True], type(None): [True, {}, []]}
"""Replacements no field of that value's type accepts (bool is not an int; None-valued
fields are optional strings or integers, which refuse booleans, objects and lists)."""

VALID_NAMES = {f.name for cls in (RunConfig, UNetConfig, TrainConfig, AttributionConfig,
                                  lds_cache.LdsSpec, Schedule, ExperimentConfig,
                                  BootstrapConfig, CounterfactualConfig)
               for f in dataclasses.fields(cls)} | {"preset", "kind", "num_steps", "eta",
                                                    "clip_x0"}

RUN_DELETE = [("model", "image_shape")]
RUN_RANGE = [(("num_train",), 0), (("num_train",), -3), (("num_train",), 10 ** 7),
             (("train", "num_steps"), 0), (("train", "batch_size"), 0),
             (("train", "ema_decay"), 1.5), (("attribution", "proj_dim"), 0),
             (("attribution", "num_draws"), 999), (("attribution", "chunk_size"), 0),
             (("num_timesteps",), 0), (("model", "base_channels"), 0),
             (("model", "num_groups"), 3), (("model", "image_shape", 0), 0),
             (("dataset",), "digitz"), (("sampler",), "ddpn"), (("subset_seed",), -1),
             (("train", "learning_rate"), float("inf")), (("attribution", "measurement"), "x")]
LDS_DELETE = [("spec",), ("spec", "sampler", "kind")]
LDS_RANGE = [(("spec", "num_train"), 0), (("spec", "alpha"), 1.5), (("spec", "alpha"), 0.0),
             (("spec", "num_validation"), 0), (("spec", "num_draws"), 0),
             (("spec", "num_subsets"), 0), (("spec", "train", "num_steps"), 0),
             (("spec", "schedule", "num_timesteps"), 0), (("spec", "sampler", "num_steps"), 0),
             (("spec", "model", "base_channels"), 0), (("spec", "model", "num_groups"), 3),
             (("spec", "model", "preset"), "digit"), (("spec", "dataset"), "digitz"),
             (("spec", "draw_timesteps"), "unifrom"), (("bootstrap", "confidence"), 1.0),
             (("strategy",), "mapp"), (("methods",), ["nope"]), (("query_chunk",), 0),
             (("counterfactual", "ks"), []), (("spec", "sampler", "kind"), "dim")]
STORE_DELETE = [(k,) for k in ("format", "version", "num_rows", "dim", "chunk_rows", "dtype",
                               "config", "complete_chunks")] + [
    ("config", k) for k in ("model", "measurement", "draws", "projection", "dataset")] + [
    ("config", "model", "params_sha256"), ("config", "measurement", "name"),
    ("config", "measurement", "kwargs"), ("config", "draws", "num_draws"),
    ("config", "draws", "timesteps"), ("config", "draws", "seed"),
    ("config", "projection", "dim"), ("config", "projection", "kind"),
    ("config", "projection", "seed"), ("config", "projection", "block_size"),
    ("config", "dataset", "name"), ("config", "dataset", "num"),
    ("config", "dataset", "examples_sha256")]
STORE_RANGE = [(("num_rows",), 0), (("num_rows",), 7), (("dim",), 5), (("chunk_rows",), 0),
               (("version",), 2), (("format",), "x"), (("dtype",), "float64"),
               (("complete_chunks",), [0, 0]), (("complete_chunks",), [5]),
               (("complete_chunks",), [0]), (("config", "projection", "kind"), "x"),
               (("config", "draws", "num_draws"), 0), (("config", "measurement", "name"), "x"),
               (("config", "projection", "block_size"), 0),
               (("config", "projection", "seed"), 1), (("config", "model", "params_sha256"), "0")]


# ---------------------------------------------------------------------------------
# Corruptions
# ---------------------------------------------------------------------------------


def _nodes(doc, prefix=()):
  """(path, value) of every node below the root."""
  items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
  for k, v in items:
    yield prefix + (k,), v
    yield from _nodes(v, prefix + (k,))


def _parent(doc, path):
  for k in path[:-1]:
    doc = doc[k]
  return doc


def _typo(name: str, rng: random.Random) -> str:
  for _ in range(100):
    i = rng.randrange(len(name))
    op = rng.choice(("drop", "double", "swap", "letter"))
    if op == "drop":
      new = name[:i] + name[i + 1:]
    elif op == "double":
      new = name[:i] + name[i] + name[i:]
    elif op == "swap" and i + 1 < len(name):
      new = name[:i] + name[i + 1] + name[i] + name[i + 2:]
    else:
      new = name[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + name[i + 1:]
    if new and new != name and new not in VALID_NAMES:
      return new
  raise AssertionError(f"no typo of {name!r}")


def _mutable(path) -> bool:
  return "comment" not in path  # free text: anything goes


def corruptions(doc: dict, delete, out_of_range, rng: random.Random):
  """``(kind, key, text or bytes)`` for every corruption of ``doc``."""
  def dump(d):
    return json.dumps(d, indent=1)

  keyed = [(p, v) for p, v in _nodes(doc) if isinstance(p[-1], str) and _mutable(p)]
  leaves = [(p, v) for p, v in _nodes(doc) if _mutable(p)]
  for kind, pool in (("rename", keyed), ("nested_typo", [x for x in keyed if len(x[0]) >= 2])):
    for _ in range(COUNTS[kind]):
      path, _ = rng.choice(pool)
      d = copy.deepcopy(doc)
      parent = _parent(d, path)
      new = _typo(path[-1], rng)
      parent[new] = parent.pop(path[-1])
      yield kind, new, dump(d)
  for path in delete:
    d = copy.deepcopy(doc)
    del _parent(d, path)[path[-1]]
    yield "delete", str(path[-1]), dump(d)
  for _ in range(COUNTS["wrong_type"]):
    path, value = rng.choice(leaves)
    d = copy.deepcopy(doc)
    _parent(d, path)[path[-1]] = rng.choice(WRONG[type(value)])
    yield "wrong_type", str(path[-1]), dump(d)
  for path, value in out_of_range:
    d = copy.deepcopy(doc)
    _parent(d, path)[path[-1]] = value
    yield "out_of_range", str(path[-1]), dump(d)
  text = dump(doc)
  for _ in range(COUNTS["truncate"]):
    yield "truncate", None, text[:rng.randrange(len(text.rstrip()) - 1)]
  raw = text.encode()
  for _ in range(COUNTS["garbage"]):
    at = rng.randrange(len(raw))
    junk = bytes([0xFF]) + bytes(rng.randrange(256) for _ in range(rng.randrange(4)))
    yield "garbage", None, raw[:at] + junk + raw[at:]


# ---------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------


def _tree(root: pathlib.Path, skip: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*"))
          if p.is_file() and not (p == skip or skip in p.parents)}


def _write(path: pathlib.Path, content) -> None:
  path.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.fixture
def lds_doc(tmp_path):
  base = json.loads((pathlib.Path(__file__).parents[1] / "experiments" / "digits_lds" /
                     "config_digits.json").read_text())
  doc = {**base, "spec": lds_cache.LdsSpec.from_dict(TINY_LDS["spec"]).to_dict(),
         "methods": ["random"], "cache_root": str(tmp_path / "out" / "cache"),
         "results": str(tmp_path / "out" / "results.json")}
  doc["counterfactual"] = {**doc["counterfactual"],
                           "results": str(tmp_path / "out" / "counterfactual.json")}
  return doc


def test_corrupted_inputs_are_refused_and_nothing_changes(tmp_path, capsys, monkeypatch, lds_doc):
  monkeypatch.chdir(tmp_path)
  rng = random.Random(SEED)
  out = tmp_path / "out"
  good, query = _store(tmp_path / "good"), _store(tmp_path / "query", "samples")
  run_doc = RunConfig.from_json(TINY).to_json()
  store_doc = json.loads((good / "store.json").read_text())
  bad = tmp_path / "bad"

  # The documents themselves are valid: what is refused below is the corruption.
  RunConfig.from_json(run_doc)
  _write(tmp_path / "lds.json", json.dumps(lds_doc))
  load_config(tmp_path / "lds.json")
  assert cli.main(["score", "--train-store", str(good), "--query-store", str(query),
                   "--out", str(out / "scores.npz")]) == 0
  shutil.rmtree(out)
  capsys.readouterr()

  targets = {
      "run": (run_doc, RUN_DELETE, RUN_RANGE, tmp_path / "bad.json",
              lambda f: ["train", "--config", f, "--out", out / "run", "--quiet"]),
      "lds": (lds_doc, LDS_DELETE, LDS_RANGE, tmp_path / "bad_lds.json",
              lambda f: ["lds", "--config", f, "--cache-root", out / "cache",
                         "--results", out / "results.json"]),
      "store": (store_doc, STORE_DELETE, STORE_RANGE, bad / "store.json",
                lambda f: ["score", "--train-store", bad, "--query-store", query,
                           "--out", out / "scores.npz"]),
  }
  tried: dict[str, dict[str, int]] = {}
  shown: list[str] = []
  for name, (doc, delete, out_of_range, path, argv) in targets.items():
    for kind, key, content in corruptions(doc, delete, out_of_range, rng):
      if name == "store":
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(good, bad)
      _write(path, content)
      before = _tree(tmp_path, out)
      code = cli.main([str(a) for a in argv(path)])
      err = capsys.readouterr().err
      what = f"{name}/{kind} {key!r}: {err!r}"
      assert code == 2, what
      assert "Traceback" not in err, what
      lines = err.strip().splitlines()
      assert len(lines) == 1 and lines[0].startswith(f"jattr {argv(path)[0]}: error: "), what
      assert str(path.parent if name == "store" else path) in lines[0] or (
          key is not None and key in lines[0]), what
      assert not out.exists(), what
      assert _tree(tmp_path, out) == before, what
      tried.setdefault(name, {}).setdefault(kind, 0)
      tried[name][kind] += 1
      shown.append(f"{name}/{kind}: {lines[0]}")
  total = sum(sum(k.values()) for k in tried.values())
  if SHOW:
    print("\n".join(shown))
  print(f"fuzz: {total} corrupted inputs refused: {tried}")
  assert total >= 150
