#!/usr/bin/env bash
# The test suite: install (launcher/install.sh), start a local two-node SLURM cluster for the launcher
# tests (tests/slurm/cluster.sh, needs root), then every test on CPU (gloo for multi-process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launcher/install.sh
if [ "$(id -u)" -eq 0 ]; then
  bash tests/slurm/cluster.sh start >/dev/null
  export GPTFORGE_SLURM_CONF=${GPTFORGE_SLURM_DIR:-/tmp/gptforge-slurm}/slurm.conf
  trap 'bash tests/slurm/cluster.sh stop' EXIT
else
  echo "tests/run.sh: not root, so no local SLURM cluster: the SLURM tests will be skipped" >&2
fi
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
