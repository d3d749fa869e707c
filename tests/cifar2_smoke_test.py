"""The CIFAR-2 protocol driver end to end on its CPU smoke config (experiments/cifar2).

Runs ``experiments/cifar2/main.py --config config_cpu_smoke.json`` in a subprocess,
with the cache, the results and the stage record in a temporary folder and the data
from the real CIFAR-2 file (``shared_data_dir``), then checks the record: every
protocol stage timed, every method scored with finite LDS numbers, and a second run
that reuses the cache. About 2 minutes on 2 CPU cores, most of it XLA compiling; the
subprocess gets a fresh persistent compilation cache (identical programs, e.g. the
two seed replicates' training, compile once) and LLVM's -O0 (compiling dominates,
not running).
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DRIVER = REPO / "experiments" / "cifar2" / "main.py"
CONFIG = REPO / "experiments" / "cifar2" / "config_cpu_smoke.json"
STAGES = ("train", "generate", "featurize", "curvature", "lds_cache", "score",
          "counterfactual")


def _run(tmp_path, data_dir, *extra):
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  env.pop("JAX_ENABLE_X64", None)
  cmd = [sys.executable, str(DRIVER), "--config", str(CONFIG), "--data-dir", str(data_dir),
         "--cache-root", str(tmp_path / "cache"), "--results", str(tmp_path / "results.json"),
         "--no-progress", *extra]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return proc.stdout, json.loads((tmp_path / "stages.json").read_text())


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.mark.devices
def test_cifar2_smoke_config_runs_every_stage_and_gives_finite_lds(tmp_path, shared_data_dir):
  config = json.loads(CONFIG.read_text())
  out, record = _run(tmp_path, shared_data_dir)

  for stage in STAGES:
    assert stage in record["stages"], stage
    entry = record["stages"][stage]
    assert _finite(entry["wall_s"]) and entry["wall_s"] >= 0, (stage, entry)
    assert _finite(entry["cpu_s"]) and entry["cpu_s"] >= 0, (stage, entry)
    assert f"| {stage} |" in out
  for stage in ("train", "generate", "lds_cache"):  # built by this run
    assert not record["stages"][stage]["reused"] and record["stages"][stage]["wall_s"] > 0
  assert record["stages"]["featurize"]["methods"] == ["trak_K2_dim32",
                                                      "dtrak_square_norm_K2_dim128"]
  assert record["stages"]["curvature"]["methods"] == ["sketch_ggn_K2_dim32", "kfac_expand_K2",
                                                      "ekfac_expand_K2"]
  for name, m in record["methods"].items():  # the CPU split of every method was measured
    assert _finite(m["setup_cpu_s"]) and _finite(m["scoring_cpu_s"]), (name, m)

  lds = record["lds"]["lds"]
  assert sorted(lds) == sorted(config["methods"])
  for name, splits in lds.items():
    assert set(splits) == {"test", "generated"}, name
    assert all(_finite(v) and -1 <= v <= 1 for v in splits.values()), (name, splits)
  assert all(_finite(v) for v in record["lds"]["noise_ceiling"].values())
  assert "| trak_K2_dim32 |" in record["lds"]["table"]
  rows = record["counterfactual"]["summary"]
  assert [r["k"] for r in rows] == config["counterfactual"]["ks"]
  assert all(_finite(r["l2_attributed"]) and _finite(r["l2_random"]) for r in rows)

  assert record["model"]["num_params"] > 0
  assert record["presets"]["cifar"] == 4_860_995  # the protocol's UNet (docs/cifar2.md)
  assert record["presets"]["cifar_30m"] == 30_308_003

  # Resumable: a second run of the cache step trains nothing and keeps the rest.
  out, again = _run(tmp_path, shared_data_dir, "--stages", "cache")
  for stage in ("train", "generate", "lds_cache"):
    assert again["stages"][stage]["reused"], stage
    assert again["stages"][stage]["wall_s"] == pytest.approx(record["stages"][stage]["wall_s"])
  assert again["lds"]["lds"] == lds
  assert again["methods"].keys() == record["methods"].keys()
  assert [r["stages"] for r in again["runs"]] == [["cache", "lds", "counterfactual"], ["cache"]]
