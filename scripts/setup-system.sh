#!/usr/bin/env bash
# System packages the SIP tests use: sipp (Debian `sip-tester`) and baresip as real peers,
# iproute2 for `ip link set lo up` inside `unshare -n`. Idempotent: installs only what is
# missing and runs `apt-get update` only when a package has no install candidate.
set -euo pipefail
packages=(sip-tester baresip-core iproute2)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup-system: already installed: ${packages[*]}"
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache policy "${missing[@]}" 2>/dev/null | grep -q "Candidate: [0-9]"; then
    $sudo apt-get update -q
fi
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "setup-system: installed ${missing[*]}"
