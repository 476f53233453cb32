#!/usr/bin/env bash
# The test suite: install (see launcher/install.sh), then every test on CPU (gloo for multi-process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launcher/install.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
