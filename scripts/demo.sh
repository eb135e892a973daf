#!/usr/bin/env bash
# The main job: a one-node Ferry demo. Starts an agent on a "host" (its own
# network namespace and data dir), creates two VPSes from the built-in busybox
# template, and shows them serving HTTP to each other and to the host.
# Cleans up after itself, even when interrupted. Root required.
#   scripts/demo.sh          run the demo and tear it down
#   scripts/demo.sh --keep   leave it running (then: scripts/demo.sh down)
#   scripts/demo.sh down     tear down a kept demo
set -euo pipefail
cd "$(dirname "$0")/.."
NS=ferry-demo
DIR=/var/tmp/ferry-demo
SOCK=$DIR/agent.sock
BIN=$PWD/target/release

# shellcheck source=scripts/lib/teardown.sh
. scripts/lib/teardown.sh

down() {
  set +e
  if [ -S "$SOCK" ]; then
    for v in $("$BIN/ferryctl" --agent "unix:$SOCK" vps ls -o json 2>/dev/null | grep '"name"' | cut -d'"' -f4); do
      "$BIN/ferryctl" --agent "unix:$SOCK" vps destroy "$v" --force >/dev/null 2>&1
    done
  fi
  pkill -f -- "--data-dir $DIR/data" 2>/dev/null
  pkill -9 -f -- "$DIR/run" 2>/dev/null
  # This demo's agent's VPSes, whatever their names; nobody else's.
  reap_agents "$DIR/run"
  unmount_under "$DIR"
  rm -rf "$DIR"
  ip netns del "$NS" 2>/dev/null
  return 0
}

if [ "${1:-}" = down ]; then down; echo "demo torn down"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "run as root: VPSes need namespaces, cgroups and veths" >&2; exit 1; }
./scripts/install-deps.sh
# CRIU >= 4.2 (the host's if it dumps a TCP socket, else into /opt/ferry/criu).
./scripts/install-criu.sh
cargo build --release -q -p ferry-agent -p ferry-ctl
down
[ "${1:-}" = --keep ] || trap down EXIT
mkdir -p "$DIR"
ip netns add "$NS"
ip -n "$NS" link set lo up
nsenter --net=/run/netns/$NS -- "$BIN/ferry-agent" --insecure-dev --listen "unix:$SOCK" --data-dir "$DIR/data" \
  --run-dir "$DIR/run" --bridge ferrybr0 --bridge-cidr 10.77.0.1/16 >"$DIR/agent.log" 2>&1 &
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
ctl() { echo "\$ ferryctl $*" >&2; "$BIN/ferryctl" --agent "unix:$SOCK" "$@"; }

ctl template ls
ctl vps create demo-web1 --ip 10.77.0.11 --cpu 500m --memory 128M --start
ctl vps create demo-web2 --ip 10.77.0.12 --cpu 500m --memory 128M --start
sleep 0.5
ctl vps ls
echo; echo "demo-web1 fetches from demo-web2 (10.77.0.12):"
ctl vps exec demo-web1 -- wget -qO- http://10.77.0.12/
echo "demo-web2 fetches from demo-web1 (10.77.0.11):"
ctl vps exec demo-web2 -- wget -qO- http://10.77.0.11/
echo "the host fetches from demo-web1:"
nsenter --net=/run/netns/$NS -- curl -s -m 3 http://10.77.0.11/
echo; echo "inside demo-web1, init is PID 1 and nothing of the host is visible:"
ctl vps exec demo-web1 -- ps
echo; ctl vps show demo-web1
echo; ctl vps logs demo-web1
if [ "${1:-}" = --keep ]; then
  echo; echo "left running. Try: $BIN/ferryctl --agent unix:$SOCK vps ls; tear down with: scripts/demo.sh down"
fi
