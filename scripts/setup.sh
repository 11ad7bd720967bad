#!/usr/bin/env bash
# Installs what building, testing and benchmarking oxvirt needs on a fresh
# Debian machine. Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t wanted < <(grep -v -E '^\s*(#|$)' scripts/apt-packages.txt)
missing=()
for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Peer programs and guest kernels, unpacked under .peer/ (never committed).
for fetch in scripts/fetch-*.sh; do
    [ -e "$fetch" ] && bash "$fetch"
done
echo "setup: done"
