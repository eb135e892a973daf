#!/usr/bin/env bash
# The test command: installs what is needed, then runs every test (unit tests,
# and the integration tests that start real agents and VPSes: root required).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the tests create namespaces, cgroups and veths" >&2; exit 1; }
./scripts/install-deps.sh
# CRIU >= 4.2 (the host's if it dumps a TCP socket, else into /opt/ferry/criu).
./scripts/install-criu.sh
# A VM whose kernel tracks dirty memory, for pre-copy where this host's
# kernel cannot (qemu, Debian's stock kernel unpacked into /opt/ferry/vm).
./scripts/install-vm.sh
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=4
