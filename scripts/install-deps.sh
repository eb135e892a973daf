#!/usr/bin/env bash
# Installs what Ferry needs on a fresh Debian 12 machine (as root). Idempotent:
# does nothing when everything is present.
#   busybox-static  the built-in busybox template
#   iproute2        `ip`, used by the tests and the demo to make test hosts (netns)
#   util-linux      nsenter, to run an agent inside a test host's netns
#   curl            HTTP checks from the host side
#   debootstrap     building the Debian template
#   runc, rsync     the peers the benchmarks measure against
#   python3         test and bench clients (a TCP connection held across a move)
#   nftables        `nft`: the agent's host firewall keeps VPSes off the host's addresses
#   btrfs-progs     disk quotas: each VPS's own files on a btrfs of its size (grown live)
set -euo pipefail
"$(dirname "$0")/apt-ensure.sh" busybox-static iproute2 util-linux curl debootstrap runc rsync \
  ca-certificates zstd python3 nftables btrfs-progs
command -v cargo >/dev/null || { echo "cargo is missing: install a Rust toolchain (rustup)" >&2; exit 1; }
# Kernel bits the agent uses.
modprobe overlay 2>/dev/null || true
grep -qw overlay /proc/filesystems || { echo "the kernel has no overlayfs" >&2; exit 1; }
