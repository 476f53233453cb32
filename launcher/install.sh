#!/usr/bin/env bash
# Install everything gptforge needs on a fresh Debian/Ubuntu machine: Debian packages, a virtual
# environment in .venv, PyTorch 2.13.0 (the CUDA build where an NVIDIA GPU is present, else the CPU build)
# and gptforge itself (editable, with test tools).
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
# PyTorch 2.13.0: the CUDA build where an NVIDIA GPU is present, else the CPU build (GPTFORGE_TORCH=cuda|cpu
# decides instead; GPTFORGE_TORCH_INDEX names the wheel index of the CUDA build). Pinned before gptforge:
# a bare "torch" requirement would pull whatever build the index serves.
TORCH_VERSION=2.13.0
want=${GPTFORGE_TORCH:-auto}
if [ "$want" = auto ]; then
  if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then want=cuda; else want=cpu; fi
fi
case "$want" in
  cuda|cpu) ;;
  *) echo "install.sh: GPTFORGE_TORCH must be cuda, cpu or auto, got '$want'" >&2; exit 2 ;;
esac
have=$(.venv/bin/python -c "import torch; print('cuda' if torch.version.cuda else 'cpu')" 2>/dev/null || echo none)
if [ "$have" != "$want" ]; then
  [ "$have" = none ] || .venv/bin/python -m pip -q uninstall -y torch >>"$LOG" 2>&1
  if [ "$want" = cuda ]; then
    pip_install "torch==$TORCH_VERSION" --index-url "${GPTFORGE_TORCH_INDEX:-https://download.pytorch.org/whl/cu130}" \
      --extra-index-url https://pypi.org/simple
    .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
      || { echo "install.sh: the torch installed from ${GPTFORGE_TORCH_INDEX:-https://download.pytorch.org/whl/cu130}" \
                "is not a CUDA build; set GPTFORGE_TORCH_INDEX to your CUDA version's index" >&2; exit 1; }
  else
    pip_install "torch==$TORCH_VERSION"
  fi
fi
echo "install.sh: torch $(.venv/bin/python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
pip_install -e ".[test]"
.venv/bin/python -c "import gptforge.launcher.cli, torch, deepspeed, megatron.core, sentencepiece, mlflow" 2>/dev/null \
  || { echo "install.sh: gptforge or one of its dependencies failed to import" >&2; exit 1; }
