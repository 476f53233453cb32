#!/usr/bin/env bash
# Training throughput and MFU of one GPU: gpt3-125m and gpt3-1.3b on synthetic tokens, bf16, seq 2048,
# blocks compiled, the largest micro-batch the planner fits; prints one JSON report (device, tokens/s,
# MFU in both conventions, CUDA memory peaks) on stdout, each run's line on stderr as it ends. Without
# CUDA: a tiny model for a few steps on the CPU (what tests/test_gpu_ready.py runs).
#   bash bench/gpu.sh [--out FILE.json] [--presets a,b] [--steps N]   (bench/gpu_train.py --help)
# Runs from a set-up checkout (.venv) or any Python with torch and PyYAML: the checkout itself is then put
# on the path as the gptforge package, so a fresh GPU machine needs no install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${GPTFORGE_PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import gptforge" 2>/dev/null; then
  link=$(mktemp -d)
  ln -s "$PWD" "$link/gptforge"
  export PYTHONPATH="$link${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch, yaml" || { echo "bench/gpu.sh: $PYTHON needs torch and PyYAML" >&2; exit 2; }
exec "$PYTHON" bench/gpu_train.py "$@"
