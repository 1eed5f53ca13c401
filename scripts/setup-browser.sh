#!/usr/bin/env bash
# Install Debian's Chromium for the headless-browser WebRTC test (tests/test_webrtc_browser.py).
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (or sudo) and apt.
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    echo "setup-browser: $CHROMIUM already installed ($("$CHROMIUM" --version 2>/dev/null || echo '?'))"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "setup-browser: need root or sudo to apt-get install chromium" >&2; exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q || true
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-liberation
"$CHROMIUM" --version
