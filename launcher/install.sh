#!/usr/bin/env bash
# Install everything gptforge needs on a fresh Debian/Ubuntu machine: Debian packages, a virtual
# environment in .venv, the CPU build of PyTorch 2.13.0 and gptforge itself (editable, with test tools).
# Safe to re-run: installed pieces are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real text: the Python docs (quickstart; HTML pages for the corpus tests) and multilingual fortunes
# (language ID tests).
DEBIAN_PACKAGES=(python3.11-doc fortunes fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-ru)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
LOG=.venv/install.log
pip_install() {  # quiet unless it fails
  .venv/bin/python -m pip --disable-pip-version-check -q install "$@" >>"$LOG" 2>&1 \
    || { echo "install.sh: pip install $* failed; last lines of $LOG:" >&2; tail -n 30 "$LOG" >&2; exit 1; }
}
: >"$LOG"
pip_install --upgrade pip
# Pin the CPU build first: a bare "torch" requirement would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
pip_install -e ".[test]"
.venv/bin/python -c "import gptforge.launcher.cli, torch, deepspeed, megatron.core, sentencepiece, mlflow" 2>/dev/null \
  || { echo "install.sh: gptforge or one of its dependencies failed to import" >&2; exit 1; }
