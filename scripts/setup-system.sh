#!/usr/bin/env bash
# System packages the SIP tests use as real peers: sipp (Debian `sip-tester`) and baresip
# (`baresip-core`: the CLI with the g711, g722, opus, srtp, aufile and sndfile modules, no GUI bits), and Kamailio
# as a record-routing proxy hop, dispatcher and registrar (`kamailio-tls-modules`: a registrar over TLS); HAProxy in
# front of serve-riva nodes.
# Idempotent: installs only what is missing, and runs `apt-get update` only when a missing
# package has no install candidate yet. Needs root or sudo.
set -euo pipefail
packages=(sip-tester baresip-core kamailio kamailio-tls-modules haproxy)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup-system: already installed: ${packages[*]}"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
for p in "${missing[@]}"; do
    if ! apt-cache policy "$p" 2>/dev/null | grep -q "Candidate: [^(]"; then
        "${sudo[@]}" apt-get update -q
        break
    fi
done
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "setup-system: installed ${missing[*]}"
