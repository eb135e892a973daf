#!/usr/bin/env bash
# Installs whichever of the Debian packages named are missing (as root) and
# leaves the rest alone. --no-recommends: only what they depend on.
#   scripts/apt-ensure.sh [--no-recommends] PKG...
set -euo pipefail
opts=()
if [ "${1:-}" = --no-recommends ]; then
  opts+=(--no-install-recommends)
  shift
fi
missing=()
for p in "$@"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ "${#missing[@]}" -gt 0 ] || exit 0
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${opts[@]}" "${missing[@]}" >/dev/null
