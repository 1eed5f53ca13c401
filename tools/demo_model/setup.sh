#!/usr/bin/env bash
# Install espeak-ng (the synthesiser used for the demo model's corpus) if missing.
set -euo pipefail
if command -v espeak-ng >/dev/null 2>&1; then
  echo "espeak-ng present: $(command -v espeak-ng)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get install -y espeak-ng || { $SUDO apt-get update && $SUDO apt-get install -y espeak-ng; }
