#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with CPU torch first (an unpinned torch
# would pull a multi-GB CUDA build), then the project with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
# system packages the tests drive as real peers (SIP phones, a browser); each script is idempotent
for script in scripts/setup-system.sh scripts/setup-browser.sh; do
  if [ -x "$script" ]; then "$script"; fi
done
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q -U pip setuptools wheel
.venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -e ".[test]"
echo "setup done: $(.venv/bin/python -c 'import pipecat_nemotron as p; print("pipecat_nemotron", p.__version__)')"
