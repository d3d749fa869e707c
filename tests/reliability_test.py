"""Nothing lost, nothing silently wrong: every case of docs/reliability.md, through the CLI.

Each test runs ``jattr.cli.main`` in-process on a tiny run (an untrained 8×8 UNet
saved as a finished run: no training) and checks three things: exit status 2, one
line on stderr (``jattr CMD: error: …``) naming the flag, key or path, and no file
written or changed (the tree is hashed before and after).

Read-only directories are simulated: the directory is ``chmod 0o555``; where that
does not stop writes (the tests run as root, for whom mode bits do not apply)
``os.access`` is patched to answer as the mode bits say, which is what jattr's guard
checks. Disk full is simulated by making orbax's save raise tensorstore's ENOSPC
error (and, where the machine allows mounting a tiny tmpfs, by a real full disk).
"""

import copy
import errno
import gc
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jattr import cli
from jattr.data import Dataset
from jattr.features.projection import ProjectionConfig
from jattr.io import checkpoint, guard
from jattr.io.feature_store import FeatureStore, feature_config
from jattr.io.lock import DirectoryLock, InUseError
from jattr.models import UNetConfig
from jattr.runs import RunConfig, model_fns, sample_run, train_run
from jattr.runs import run as run_module
from jattr.train import TrainConfig, init_state, make_optimizer

TINY = {
    "dataset": "digits", "num_train": 6, "num_timesteps": 20,
    "model": {"image_shape": [8, 8, 1], "base_channels": 8, "channel_mults": [1],
              "num_groups": 4, "conv_impl": "xla"},
    "train": {"num_steps": 2, "batch_size": 4, "segment_steps": 1},
    "num_samples": 2,
    "attribution": {"num_draws": 2, "proj_dim": 8, "chunk_size": 4, "top_k": 2},
}
TINY_LDS = {
    "name": "tiny", "cache_root": "cache", "methods": ["random"], "strategy": "map",
    "query_chunk": 4, "bootstrap": {"num_resamples": 10, "confidence": 0.9, "seed": 0},
    "spec": {"dataset": "digits", "num_train": 16, "num_validation": 3, "num_test": 3,
             "num_generated": 2, "model": {"preset": "digits", "base_channels": 8,
                                           "channel_mults": [1, 1], "attn_resolutions": [],
                                           "num_groups": 4},
             "schedule": {"kind": "linear", "num_timesteps": 20},
             "train": {"num_steps": 2, "batch_size": 4, "segment_steps": 1},
             "num_subsets": 2, "num_seeds": 1, "num_draws": 2,
             "sampler": {"kind": "ddim", "num_steps": 2}},
}


# ---------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------


def tree_hash(root: pathlib.Path, skip: tuple[pathlib.Path, ...] = ()) -> dict:
  """path -> sha256 of every file (and every directory, as "dir") under ``root``."""
  out = {}
  for p in sorted(root.rglob("*")):
    if any(p == s or s in p.parents for s in skip):
      continue
    out[str(p.relative_to(root))] = ("dir" if p.is_dir() else
                                     hashlib.sha256(p.read_bytes()).hexdigest())
  return out


def refused(argv, capsys, *, names=()) -> str:
  """Runs ``jattr ARGV``; asserts exit 2 and one error line naming each of ``names``."""
  code = cli.main([str(a) for a in argv])
  err = capsys.readouterr().err
  assert code == 2, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert "Traceback" not in err, err
  assert len(lines) == 1 or (lines[-1].startswith("jattr ") and lines[0].startswith("usage:")), err
  assert lines[-1].startswith(f"jattr {argv[0]}: error: "), err
  for name in names:
    assert str(name) in lines[-1], (name, err)
  return lines[-1]


def settle(threads: set) -> None:
  """Waits for the threads started since ``threads`` and collects garbage: orbax's
  writers and abandoned reads report late, and must do it inside the test."""
  for t in set(threading.enumerate()) - threads:
    t.join(timeout=5)
  gc.collect()


def write_json(path: pathlib.Path, doc) -> pathlib.Path:
  path.write_text(json.dumps(doc))
  return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A run directory with an untrained tiny UNet saved as a finished run, and samples."""
  run = tmp_path_factory.mktemp("tiny") / "run"
  run.mkdir()
  cfg = RunConfig.from_json(TINY)
  (run / "config.json").write_text(json.dumps(cfg.to_json(), indent=2))
  _, init_fn = model_fns(cfg)
  state = init_state(init_fn(jax.random.key(0)), make_optimizer(cfg.train))
  checkpoint.save(run / "checkpoints", cfg.train.num_steps, state, {})
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
  np.savez(run / "samples.npz", x=x, seed=0, sampler="ddpm")
  np.save(run / "train_indices.npy", np.arange(6))
  return run


@pytest.fixture
def run_copy(tiny_run, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(tiny_run, dst)
  return dst


def _store(path: pathlib.Path, dataset: str = "digits") -> pathlib.Path:
  proj = ProjectionConfig(dim=4, kind="rademacher", seed=0)
  config = feature_config(params_hash="0" * 64, measurement="square_norm", num_draws=2,
                          timesteps="uniform", draw_seed=0, projection=proj, dataset=dataset,
                          num_examples=6, examples_hash="1" * 64,
                          model_info={"schedule": "linear", "num_timesteps": 20},
                          dataset_info={"split": "train"})
  store = FeatureStore.open(path, config, num_rows=6, dim=4, chunk_rows=3)
  rng = np.random.default_rng(0)
  for i in store.missing_chunks():
    store.write_chunk(i, rng.normal(size=(3, 4)))
  return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  root = tmp_path_factory.mktemp("stores")
  return _store(root / "train"), _store(root / "query", "samples")


@pytest.fixture
def read_only(monkeypatch):
  """``read_only(path)``: makes ``path`` a read-only directory (see the module docstring)."""
  made = []

  def make(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    made.append(path)
    if os.access(path, os.W_OK):  # root: simulate what the mode bits mean for other users
      real = os.access

      def access(p, mode, *args, **kwargs):
        p = pathlib.Path(p).absolute()
        if mode & os.W_OK and any(p == m.absolute() or m.absolute() in p.parents
                                  for m in made):
          return False
        return real(p, mode, *args, **kwargs)

      monkeypatch.setattr(os, "access", access)
    return path

  yield make
  for path in made:
    path.chmod(0o755)


# ---------------------------------------------------------------------------------
# Data lost
# ---------------------------------------------------------------------------------


def test_sample_num_0_and_negative_keep_the_runs_samples(run_copy, capsys):
  before = tree_hash(run_copy)
  for num in ("0", "-1"):
    refused(["sample", "--run", run_copy, "--num", num], capsys, names=["--num", num])
  assert tree_hash(run_copy) == before
  with pytest.raises(ValueError, match="num = 0"):
    sample_run(run_copy, num=0)
  assert tree_hash(run_copy) == before


def test_train_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
  cfg = write_json(tmp_path / "t.json", TINY)
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "losses.csv").write_text("my own numbers\n")
  before = tree_hash(tmp_path)
  refused(["train", "--config", cfg, "--out", mine, "--quiet"], capsys,
          names=[mine, "not a jattr run directory", "losses.csv"])
  # A config.json that jattr did not write does not make a run either.
  write_json(mine / "config.json", {"num_train": 6})
  before = tree_hash(tmp_path)
  refused(["train", "--config", cfg, "--out", mine, "--quiet"], capsys,
          names=[mine, "not a jattr run directory"])
  assert tree_hash(tmp_path) == before


def test_score_out_an_existing_directory_writes_nothing(stores, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  out = tmp_path / "scores"
  out.mkdir()
  before = tree_hash(tmp_path)
  train, query = stores
  refused(["score", "--train-store", train, "--query-store", query, "--out", out], capsys,
          names=[out, "is a directory"])
  assert tree_hash(tmp_path) == before  # no .scores.tmp-PID.npz left anywhere
  # A file that is not a score file is not replaced either; a score file is.
  other = tmp_path / "other.npz"
  np.savez(other, x=np.zeros(3))
  before = tree_hash(tmp_path)
  refused(["score", "--train-store", train, "--query-store", query, "--out", other], capsys,
          names=[other, "not a jattr score file"])
  assert tree_hash(tmp_path) == before
  good = tmp_path / "good.npz"
  for _ in range(2):
    assert cli.main(["score", "--train-store", str(train), "--query-store", str(query),
                     "--out", str(good)]) == 0
  assert np.load(good)["tau"].shape == (6, 6)


def test_outputs_of_other_commands_are_refused_when_not_their_own(tiny_run, tmp_path, capsys):
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  before = tree_hash(tmp_path)
  refused(["featurize", "--run", tiny_run, "--out", foreign, "--quiet"], capsys,
          names=[foreign, "not a jattr feature store"])
  refused(["fit-curvature", "--run", tiny_run, "--out", foreign, "--quiet"], capsys,
          names=[foreign, "not a jattr curvature directory"])
  for cmd in (["influence", "--curvature", tmp_path / "none"], ["mucs"]):
    refused([*cmd, "--run", tiny_run, "--out", foreign], capsys, names=[foreign, "directory"])
  assert tree_hash(tmp_path) == before


# ---------------------------------------------------------------------------------
# Tracebacks instead of errors: config files
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, names", [
    (lambda d: d["train"].update(num_step=4), ["train.num_step", "did you mean 'train.num_steps'"]),
    (lambda d: d["model"].update(base_chanels=8),
     ["model.base_chanels", "did you mean 'model.base_channels'"]),
    (lambda d: d.update(num_train="48"), ['num_train = "48"', "expected null or an integer"]),
    (lambda d: d["train"].update(num_steps=4.5), ["train.num_steps = 4.5", "an integer"]),
    (lambda d: d.update(num_train=True), ["num_train = true"]),
    (lambda d: d.update(num_steps=4), ["did you mean 'train.num_steps'"]),
    (lambda d: d["attribution"].update(chunk_size=0), ["attribution.chunk_size = 0", ">= 1"]),
    (lambda d: d["model"].pop("image_shape"), ["model.image_shape is missing"]),
    (lambda d: d.update(dataset="digit"), ["did you mean 'digits'"]),
    (lambda d: d["train"].update(learning_rate=float("nan")), ["NaN"]),
    (lambda d: d.update(num_train=5000), ["num_train = 5000", "1797"]),
], ids=["typo", "nested-typo", "string-int", "float-int", "bool-int", "misplaced",
        "batch-of-0", "missing", "bad-choice", "nan", "too-many"])
def test_config_file_errors_name_the_file_key_and_value(tmp_path, capsys, edit, names):
  doc = copy.deepcopy(TINY)
  edit(doc)
  path = tmp_path / "t4.json"
  path.write_text(json.dumps(doc))  # NaN is written as the (non-standard) NaN literal
  out = tmp_path / "run"
  line = refused(["train", "--config", path, "--out", out, "--quiet"], capsys, names=names)
  assert str(path) in line or "num_train = 5000" in line
  assert not out.exists()


def test_invalid_json_names_the_file(tmp_path, capsys):
  for text, what in (('{"num_train": 48, ', "line 1, column 19"), ("", "empty"),
                     (b'{"num_train": \xff}', "not UTF-8"), ("[1, 2]", "top level")):
    path = tmp_path / "bad.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(["train", "--config", path, "--out", tmp_path / "run"], capsys,
            names=[path, what])
  assert not (tmp_path / "run").exists()


def test_lds_spec_errors_name_the_key_before_any_cache(tmp_path, capsys):
  for edit, names in ((lambda d: d["spec"].update(num_train="16"), ['spec.num_train = "16"']),
                      (lambda d: d["spec"]["train"].update(num_step=2),
                       ["did you mean 'spec.train.num_steps'"]),
                      (lambda d: d["spec"]["model"].update(num_groups=3), ["spec.model"]),
                      (lambda d: d.update(methdos=["random"]), ["did you mean 'methods'"]),
                      (lambda d: d["bootstrap"].update(confidence=1.5), ["bootstrap.confidence"])):
    doc = copy.deepcopy(TINY_LDS)
    edit(doc)
    path = write_json(tmp_path / "lds.json", doc)
    refused(["lds", "--config", path, "--cache-root", tmp_path / "cache"], capsys,
            names=[path, *names])
  assert not (tmp_path / "cache").exists()


def test_truncated_store_json_names_the_file(stores, tmp_path, capsys):
  bad = tmp_path / "train"
  shutil.copytree(stores[0], bad)
  text = (bad / "store.json").read_text()
  (bad / "store.json").write_text(text[:len(text) // 2])
  refused(["score", "--train-store", bad, "--query-store", stores[1], "--out",
           tmp_path / "s.npz"], capsys, names=[bad / "store.json", "invalid JSON"])
  doc = json.loads(text)
  doc["num_rows"] = "6"
  (bad / "store.json").write_text(json.dumps(doc))
  refused(["score", "--train-store", bad, "--query-store", stores[1], "--out",
           tmp_path / "s.npz"], capsys, names=[bad / "store.json", 'num_rows = "6"'])
  assert not (tmp_path / "s.npz").exists()


# ---------------------------------------------------------------------------------
# Tracebacks instead of errors: flags and boundaries
# ---------------------------------------------------------------------------------


def test_flag_values_out_of_range(tiny_run, tmp_path, capsys):
  out = tmp_path / "out"
  refused(["train", "--num-train", "0", "--out", out], capsys, names=["--num-train", "'0'"])
  refused(["train", "--lr", "nan", "--out", out], capsys, names=["--lr", "finite"])
  refused(["sample", "--run", tiny_run, "--num", "-1"], capsys, names=["--num"])
  refused(["featurize", "--run", tiny_run, "--out", out, "--chunk-size", "0"], capsys,
          names=["--chunk-size"])
  refused(["featurize", "--run", tiny_run, "--out", out, "--proj-dim", "0"], capsys,
          names=["--proj-dim"])
  refused(["train", "--dataset", "digitz", "--out", out], capsys,
          names=["--dataset", "did you mean 'digits'"])
  assert not out.exists()


def test_featurize_of_no_samples(run_copy, tmp_path, capsys):
  np.savez(run_copy / "samples.npz", x=np.zeros((0, 8, 8, 1), np.float32))
  out = tmp_path / "store"
  refused(["featurize", "--run", run_copy, "--out", out, "--queries", "samples", "--quiet"],
          capsys, names=["holds no samples"])
  assert not out.exists()


def test_train_on_empty_data(tmp_path, monkeypatch):
  empty = Dataset(np.zeros((0, 8, 8, 1), np.float32), np.zeros((0,), np.int32), "digits")
  monkeypatch.setattr(run_module, "load_dataset", lambda *a, **k: empty)
  with pytest.raises(ValueError, match="no training images"):
    train_run(RunConfig.from_json(TINY), tmp_path / "run")
  assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------
# Operational errors: read-only, disk full, damaged checkpoint, in use
# ---------------------------------------------------------------------------------


def test_read_only_directories(tiny_run, stores, tmp_path, capsys, read_only):
  ro = read_only(tmp_path / "ro")
  cfg = write_json(tmp_path / "t.json", TINY)
  lds = write_json(tmp_path / "lds.json", TINY_LDS)
  before = tree_hash(tmp_path)
  for argv in (["train", "--config", cfg, "--out", ro / "run", "--quiet"],
               ["score", "--train-store", stores[0], "--query-store", stores[1],
                "--out", ro / "s.npz"],
               ["featurize", "--run", tiny_run, "--out", ro / "store", "--quiet"],
               ["lds", "--config", lds, "--cache-root", ro / "cache"]):
    refused(argv, capsys, names=[ro, "read-only"])
  assert tree_hash(tmp_path) == before


def test_a_write_that_fails_is_one_line_and_leaves_no_temporary(run_copy, capsys, monkeypatch):
  """Past the guard (e.g. a directory made read-only meanwhile): the write itself fails."""
  before = tree_hash(run_copy)
  real = os.replace

  def replace(src, dst, *args, **kwargs):
    if pathlib.Path(dst).parent == run_copy:
      raise PermissionError(errno.EACCES, "Permission denied", str(dst))
    return real(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, "replace", replace)
  line = refused(["sample", "--run", run_copy], capsys,
                 names=[run_copy / "samples", "Permission denied"])
  assert "writable" in line
  after = tree_hash(run_copy)
  assert {k: v for k, v in after.items() if k != ".jattr.lock"} == {
      k: v for k, v in before.items() if k != ".jattr.lock"}


def _disk_full(*args, **kwargs):
  """What orbax raises when tensorstore runs out of space, after logging it per thread."""
  logging.getLogger("absl").error("_SignalingThread.run() raised an exception: "
                                  "RESOURCE_EXHAUSTED: No space left on device")
  raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to '
                   "write 42286 bytes to file 5: No space left on device [os_error_code='28']")


def test_disk_full_during_a_checkpoint_is_one_line(tmp_path, capfd, monkeypatch):
  monkeypatch.setattr(ocp.CheckpointManager, "save", _disk_full)
  with pytest.raises(OSError) as e:
    checkpoint.save(tmp_path / "ck", 3, {"w": np.zeros(3)}, {})
  assert e.value.errno == errno.ENOSPC and str(tmp_path / "ck") in str(e.value)
  assert "ERROR:absl" not in capfd.readouterr().err
  # Through `jattr train` (its training replaced by one checkpoint save: no compiling).
  def fake_train(apply_fn, params, schedule, x, config, key, *, checkpointer, **kw):
    checkpointer.save(1, params, {})
  monkeypatch.setattr(run_module, "train", fake_train)
  cfg = write_json(tmp_path / "t.json", TINY)
  line = refused(["train", "--config", cfg, "--out", tmp_path / "run", "--quiet"], capfd,
                 names=[tmp_path / "run" / "checkpoints", "no space left on device",
                        "free some space"])
  assert len(line) < 400
  # The closed-loop reports orbax's threads send afterwards are dropped.
  sys.unraisablehook(types.SimpleNamespace(
      exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
      exc_traceback=None, err_msg=None, object=None))
  assert "Event loop" not in capfd.readouterr().err


def test_a_real_full_disk(tmp_path, capfd):
  """On a real 256 KiB tmpfs, where the machine allows mounting one (root)."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    state = {"w": np.random.default_rng(0).normal(size=(4, 256, 256)).astype(np.float32)}
    threads = set(threading.enumerate())
    with pytest.raises(OSError) as e:
      checkpoint.save(mnt / "ck", 1, state, {})
    assert e.value.errno == errno.ENOSPC
    settle(threads)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop" not in err and "ERROR:absl" not in err, err
  finally:
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_damaged_checkpoint_is_one_line(run_copy, capsys):
  threads = set(threading.enumerate())
  data = run_copy / "checkpoints" / "2" / "state" / "ocdbt.process_0" / "d"
  files = sorted(data.iterdir())
  assert files
  for f in files:
    f.write_bytes(b"garbage" * 3)
  line = refused(["sample", "--run", run_copy], capsys,
                 names=[run_copy / "checkpoints", "cannot be read", "damaged"])
  assert "TensorStore" not in line and len(line) < 800
  (run_copy / "checkpoints" / "2" / "meta" / "metadata").write_text("{")
  refused(["featurize", "--run", run_copy, "--out", run_copy.parent / "s", "--quiet"], capsys,
          names=[run_copy / "checkpoints", "cannot be read"])
  settle(threads)  # the failed reads' late reports are dropped (an unraisable would warn)
  assert not capsys.readouterr().err


def test_a_directory_in_use_is_one_line(run_copy, capsys, monkeypatch):
  def busy(self):
    raise InUseError(f"run directory {self.path} is in use by PID 12345")
  monkeypatch.setattr(DirectoryLock, "acquire", busy)
  refused(["sample", "--run", run_copy], capsys, names=["in use by PID 12345"])


def test_a_failed_run_may_be_reconfigured(tmp_path, capsys, monkeypatch):
  """A run that failed before its first checkpoint is not "a different configuration"."""
  monkeypatch.setattr(ocp.CheckpointManager, "save", _disk_full)

  def fake_train(apply_fn, params, schedule, x, config, key, *, checkpointer, **kw):
    checkpointer.save(1, params, {})
    return None, np.ones(config.num_steps, np.float32)

  monkeypatch.setattr(run_module, "train", fake_train)
  out = tmp_path / "run"
  cfg = write_json(tmp_path / "a.json", TINY)
  refused(["train", "--config", cfg, "--out", out, "--quiet"], capsys, names=["no space"])
  assert (out / "config.json").exists() and checkpoint.latest_step(out / "checkpoints") is None
  monkeypatch.setattr(ocp.CheckpointManager, "save", lambda *a, **k: None)  # space again
  fixed = write_json(tmp_path / "b.json", {**TINY, "train": {**TINY["train"], "num_steps": 3}})
  assert cli.main(["train", "--config", str(fixed), "--out", str(out), "--quiet"]) == 0
  assert json.loads((out / "config.json").read_text())["train"]["num_steps"] == 3
  assert (out / "losses.csv").read_text().count("\n") == 4


def test_a_trained_run_of_another_config_is_still_refused(run_copy, capsys):
  other = write_json(run_copy.parent / "o.json", {**TINY, "seed": 7})
  before = tree_hash(run_copy)
  refused(["train", "--config", other, "--out", run_copy, "--quiet"], capsys,
          names=["different configuration", "seed"])
  assert tree_hash(run_copy) == before


# ---------------------------------------------------------------------------------
# --debug, JATTR_DEBUG
# ---------------------------------------------------------------------------------


def test_debug_prints_the_traceback(tmp_path, capsys, monkeypatch):
  bad = write_json(tmp_path / "bad.json", {"datset": "digits"})
  assert cli.main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
  assert "Traceback" not in capsys.readouterr().err
  assert cli.main(["--debug", "train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.strip().splitlines()[-1].startswith("jattr train: error:")
  assert cli.main(["train", "--config", str(bad), "--out", str(tmp_path / "r"), "--debug"]) == 2
  assert "Traceback" in capsys.readouterr().err
  monkeypatch.setenv("JATTR_DEBUG", "1")
  assert cli.main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
  assert "Traceback" in capsys.readouterr().err


def test_guard_types_are_strict():
  """The type rules of jattr.io.guard on their own (bool is not an int, 4.0 is not one)."""
  for value, tp in ((True, int), (4.0, int), ("4", int), (float("inf"), float), (1, str),
                    ([8, 8], tuple[int, int, int]), (None, int), ("x", bool)):
    with pytest.raises(guard.ConfigError):
      guard.check_value(value, tp, "k")
  for value, tp in ((4, int), (4, float), (0.5, float), (None, int | None), ([8, 8, 1],
                    tuple[int, int, int]), ("eps", guard.typing.Literal["eps", "v"])):
    guard.check_value(value, tp, "k")
  assert RunConfig.from_json(RunConfig().to_json()) == RunConfig()
  with pytest.raises(ValueError, match="RunConfig: num_samples = 0"):
    RunConfig(num_samples=0)
  with pytest.raises(ValueError, match="TrainConfig.num_steps|num_steps"):
    RunConfig.from_json({"train": TrainConfig().__dict__ | {"num_steps": 0}})
  assert UNetConfig  # the nested dataclasses are what from_json checks against
