#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with CPU torch first (an unpinned torch
# would pull a multi-GB CUDA build), then the project with its test extra.
# Prints one line per stage; everything the tools say goes to .venv-setup.log, shown when a stage fails.
set -euo pipefail
cd "$(dirname "$0")/.."
log="$PWD/.venv-setup.log"
: > "$log"

stage() {  # stage "what" command...: run quietly, one line with the time it took, the log's tail on failure
    local what=$1 started=$SECONDS
    shift
    printf '%-50s' "setup: $what" >&2
    if "$@" >>"$log" 2>&1; then
        printf 'ok (%ss)\n' "$((SECONDS - started))" >&2
    else
        local status=$?
        printf 'FAILED (exit %s)\n' "$status" >&2
        echo "---- last 40 lines of $log ----" >&2
        tail -n 40 "$log" >&2
        exit "$status"
    fi
}

# system packages the tests drive as real peers (SIP phones, a browser); each script is idempotent
[ -x scripts/setup-system.sh ] && stage "system packages (SIP peers, haproxy)" scripts/setup-system.sh
[ -x scripts/setup-browser.sh ] && stage "Chromium (browser tests)" scripts/setup-browser.sh
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || stage "virtual environment (.venv)" "$python" -m venv .venv
pip=(.venv/bin/pip --disable-pip-version-check --no-input)
stage "pip, setuptools, wheel" "${pip[@]}" install -q -U pip setuptools wheel
stage "torch ${TORCH_VERSION:-2.13.0} (CPU)" "${pip[@]}" install -q "torch==${TORCH_VERSION:-2.13.0}"
stage "pipecat-nemotron and its test extra" "${pip[@]}" install -q -e ".[test]"
version=$(.venv/bin/python -c 'import pipecat_nemotron as p; print(p.__version__)' 2>>"$log") || {
    echo "setup: pipecat_nemotron does not import; see $log" >&2; tail -n 40 "$log" >&2; exit 1; }
echo "setup done: pipecat_nemotron $version (log: .venv-setup.log)"
