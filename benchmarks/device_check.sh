#!/usr/bin/env bash
# The one prepared accelerator check (issue: many devices). Usage, from the repository
# root on a machine with a GPU and jax[cuda] installed:
#
#     bash benchmarks/device_check.sh OUT_DIR
#
# Writes OUT_DIR/device_check.json (benchmarks/device_check.py: the 30M UNet at 32x32,
# featurize at K = 1 and 10 with k = 4096 against one batched gradient, a K-FAC fit,
# train_many vmap vs map members per hour at M = 8 and 32) and OUT_DIR/nvidia-smi.txt.
# Sized to finish in under 8 minutes on one GPU; a 7.5-minute timeout keeps it so.
set -euo pipefail
out="${1:?usage: bash benchmarks/device_check.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
(nvidia-smi || true) > "$out/nvidia-smi.txt" 2>&1
"$py" -c 'import jax; print("jax", jax.__version__, jax.devices())' | tee "$out/jax.txt"
timeout 450 "$py" benchmarks/device_check.py "$out" 2>&1 | tee "$out/device_check.log"
