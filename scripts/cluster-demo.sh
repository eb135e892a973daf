#!/usr/bin/env bash
# The main job: a local Ferry cluster on this one machine. Three "hosts", each
# a network namespace with its own data dirs and two networks: a management
# network the daemons listen on, and the VPS LAN their VPSes share; each host
# runs a controller replica and an agent. Every channel is mutual
# TLS: the first replica's --init makes the cluster CA and the first admin's
# credentials; the other replicas and the agents join with single-use tokens.
# The controllers form a Raft cluster; the agents join it; VPSes are created
# across the nodes; then
# one VPS serving HTTP is live-migrated to another node while a client polls
# it, and the downtime is printed as Ferry measured it and as the client saw it;
# last, that node is drained for maintenance (its VPSes move live) and restored.
# Cleans up after itself, even when interrupted. Root required.
#   scripts/cluster-demo.sh          run it and tear it down
#   scripts/cluster-demo.sh --keep   leave it running (then: scripts/cluster-demo.sh down)
#   scripts/cluster-demo.sh down     tear down a kept cluster
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=/var/tmp/ferry-cluster
BIN=$PWD/target/release
LAN=fbrlan
MGMT=fbrmgmt
CTRL=10.87.0.11:7800,10.87.0.12:7800,10.87.0.13:7800
ADMIN=$DIR/h1/controller/pki/admin.pem

# shellcheck source=scripts/lib/teardown.sh
. scripts/lib/teardown.sh

down() {
  set +e
  pkill -f -- "$DIR/" 2>/dev/null
  sleep 0.3
  pkill -9 -f -- "$DIR/" 2>/dev/null
  # This demo's agents' VPSes, whatever their names; nobody else's.
  reap_agents "$DIR/h1/run" "$DIR/h2/run" "$DIR/h3/run"
  unmount_under "$DIR"
  for i in 1 2 3; do
    ip netns del "ferry-h$i" 2>/dev/null; ip link del "fh$i" 2>/dev/null; ip link del "fm$i" 2>/dev/null
  done
  ip link del "$LAN" 2>/dev/null; ip link del "$MGMT" 2>/dev/null
  rm -rf "$DIR"
  return 0
}

if [ "${1:-}" = down ]; then down; echo "cluster torn down"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "run as root: hosts are network namespaces, VPSes need cgroups and veths" >&2; exit 1; }
./scripts/install-deps.sh
# CRIU >= 4.2 (the host's if it dumps a TCP socket, else into /opt/ferry/criu).
./scripts/install-criu.sh
cargo build --release -q -p ferry-agent -p ferry-controller -p ferry-ctl
down
[ "${1:-}" = --keep ] || trap down EXIT
mkdir -p "$DIR"

# Two networks, each a bridge in the root namespace with one veth per host:
# - management, 10.87.0.0/24: controllers and agents listen here, ferryctl
#   (this shell, 10.87.0.1) reaches them here;
# - the VPS LAN, 10.88.0.0/16: inside each host its port is plugged into the
#   node bridge, whose address is its VPSes' gateway; VPSes of every node share
#   it, so a VPS keeps its address when it moves. The poller (10.88.0.1) is a
#   client on it.
# Each agent's host firewall keeps VPSes off their host's addresses and the
# management network (docs/security.md).
ip link add "$LAN" type bridge
ip addr add 10.88.0.1/16 dev "$LAN"
ip link set "$LAN" up
ip link add "$MGMT" type bridge
ip addr add 10.87.0.1/24 dev "$MGMT"
ip link set "$MGMT" up
for i in 1 2 3; do
  ns=ferry-h$i
  ip netns add "$ns"
  ip link add "fm$i" type veth peer name mgmt netns "$ns"
  ip link set "fm$i" master "$MGMT" up
  ip -n "$ns" addr add "10.87.0.1$i/24" dev mgmt
  ip -n "$ns" link set mgmt up
  ip link add "fh$i" type veth peer name uplink netns "$ns"
  ip link set "fh$i" master "$LAN" up
  ip -n "$ns" link add ferrybr0 type bridge
  ip -n "$ns" addr add "10.88.0.1$i/16" dev ferrybr0
  ip -n "$ns" link set ferrybr0 up
  ip -n "$ns" link set uplink master ferrybr0 up
  ip -n "$ns" link set lo up
done

on() { local i=$1; shift; nsenter --net=/run/netns/ferry-h$i -- "$@"; }
ctl() { echo "\$ ferryctl $*" >&2; "$BIN/ferryctl" --credentials "$ADMIN" --controller "$CTRL" "$@"; }
q() { "$BIN/ferryctl" --credentials "$ADMIN" --controller "$CTRL" "$@"; }

on 1 "$BIN/ferry-controller" --listen 10.87.0.11:7800 --data-dir "$DIR/h1/controller" \
  --init --ip-pool 10.88.1.0/24 >"$DIR/controller1.log" 2>&1 &
for _ in $(seq 100); do [ -f "$ADMIN" ] && q cluster status >/dev/null 2>&1 && break; sleep 0.1; done
echo "== mutual TLS: the cluster CA and the first admin's credentials are in $DIR/h1/controller/pki"
for i in 2 3; do
  token=$(q controller join-token --ttl 5m 2>/dev/null)
  on "$i" "$BIN/ferry-controller" --listen "10.87.0.1$i:7800" --data-dir "$DIR/h$i/controller" \
    --join "$token" --via 10.87.0.11:7800 >"$DIR/controller$i.log" 2>&1 &
  for _ in $(seq 100); do [ -f "$DIR/h$i/controller/pki/controller.pem" ] && break; sleep 0.1; done
  ctl controller add "10.87.0.1$i:7800"
done
ctl cluster status

for i in 1 2 3; do
  token=$(q node join-token --ttl 5m 2>/dev/null)
  on "$i" "$BIN/ferry-agent" --listen "10.87.0.1$i:7700" --data-dir "$DIR/h$i/agent" --run-dir "$DIR/h$i/run" \
    --bridge ferrybr0 --bridge-cidr "10.88.0.1$i/16" --uplink uplink \
    --controller "$CTRL" --node-name "node$i" --label "zone=z$i" --join "$token" >"$DIR/agent$i.log" 2>&1 &
done
for _ in $(seq 100); do
  [ "$(q node ls 2>/dev/null | grep -c ready)" = 3 ] && break; sleep 0.2
done
ctl node ls
echo "without credentials, nothing is served:"
"$BIN/ferryctl" --controller "$CTRL" node ls 2>&1 | sed 's/^/  /' || true
ctl user add demo-viewer --role viewer --out "$DIR/viewer.pem"
echo "a viewer reads, and may not change anything:"
"$BIN/ferryctl" --credentials "$DIR/viewer.pem" --controller "$CTRL" node ls | sed 's/^/  /'
"$BIN/ferryctl" --credentials "$DIR/viewer.pem" --controller "$CTRL" node cordon node1 2>&1 | sed 's/^/  /' || true

# Three web VPSes, one per node (anti-affinity), and two more where they fit best.
for n in 1 2 3; do ctl vps create "demo-web$n" --cpu 250m --memory 64M --anti-affinity web --start; done
ctl vps create demo-db --cpu 500m --memory 128M --selector zone=z2 --start
ctl vps create demo-cache --cpu 250m --memory 64M --start
for _ in $(seq 150); do
  [ "$(q vps ls 2>/dev/null | grep -c ' running ')" = 5 ] && break; sleep 0.2
done
ctl vps ls
ctl node ls

field() { q vps show "$1" -o json | grep "\"$2\"" | head -1 | cut -d'"' -f4; }
web1_ip=$(field demo-web1 ip)
echo; echo "demo-web1 serves HTTP at $web1_ip on $(field demo-web1 node):"
curl -s -m 3 "http://$web1_ip/"
echo; ctl vps show demo-db

# A tenant tries the daemons of its own host: the host firewall drops it.
web1_node=$(field demo-web1 node)
h=${web1_node#node}
echo; echo "== the host firewall: root in demo-web1 tries the agent and the controller of $web1_node"
web2_ip=$(field demo-web2 ip)
answer=$("$BIN/ferryctl" --credentials "$ADMIN" --agent "10.87.0.1$h:7700" vps exec demo-web1 -- \
  timeout 4 wget -qO- "http://$web2_ip/" || true)
[ "$answer" = demo-web2 ] || { echo "demo-web1 cannot reach demo-web2: ${answer:-no answer}" >&2; exit 1; }
echo "  another VPS (demo-web2, $web2_ip) answers: $answer"
for target in "10.87.0.1$h 7700" "10.87.0.1$h 7800" "10.88.0.1$h 7700"; do
  # nc exits 1 when it cannot connect; a connection would hold it until timeout (124).
  rc=0
  "$BIN/ferryctl" --credentials "$ADMIN" --agent "10.87.0.1$h:7700" vps exec demo-web1 -- \
    timeout 4 nc -w 2 $target </dev/null >/dev/null 2>&1 || rc=$?
  if [ "$rc" = 1 ]; then echo "  ${target/ /:}: no answer (dropped)"; else
    echo "  ${target/ /:}: REACHED from a VPS (exit $rc)" >&2; exit 1; fi
done

# Live migration: demo-cache serves HTTP while a client on the LAN polls it;
# the scheduler picks the target node.
ip=$(field demo-cache ip)
from=$(field demo-cache node)
echo; echo "== live migration: demo-cache ($ip) leaves $from while a client polls it every 20 ms"
curl -s -m 3 "http://$ip/" >/dev/null || { echo "demo-cache does not answer before the move" >&2; exit 1; }
( while :; do
    if curl -s -m 0.5 -o /dev/null "http://$ip/"; then echo "$(date +%s%3N) ok"; else echo "$(date +%s%3N) fail"; fi
    sleep 0.02
  done ) >"$DIR/poll.log" 2>&1 &
poller=$!
sleep 1
ctl vps migrate demo-cache
sleep 1
kill "$poller"; wait "$poller" 2>/dev/null || true
to=$(field demo-cache node)
[ "$to" != "$from" ] || { echo "demo-cache did not move" >&2; exit 1; }
echo "demo-cache now runs on $to and answers at the same address: $(curl -s -m 3 "http://$ip/")"
awk '$2 == "ok" { if (last && $1 - last > gap) gap = $1 - last; last = $1; ok++ } $2 == "fail" { fail++ }
     END { printf "the client saw: %d answers, %d failed polls, longest gap between answers %d ms\n", ok, fail, gap }' \
  "$DIR/poll.log"
echo "(a poll caught by the freeze waits for its 0.5 s timeout: TCP would resend its SYN only after 1 s)"

# Maintenance: drain the node demo-cache moved to, then restore it. Its web
# VPS has nowhere to go (one per node: anti-affinity), so the drain moves the
# rest, live, and ends incomplete (exit 2), saying what stays and why.
echo; echo "== maintenance: drain $to, then restore it"
ctl node drain "$to" --dry-run
rc=0; ctl node drain "$to" --parallel 2 --follow || rc=$?
[ "$rc" = 2 ] || { echo "the drain of $to should end incomplete (exit 2), got $rc" >&2; exit 1; }
moved=$(field demo-cache node)
[ "$moved" != "$to" ] || { echo "demo-cache is still on $to" >&2; exit 1; }
echo "demo-cache runs on $moved now, and answers: $(curl -s -m 3 "http://$ip/")"
ctl node restore "$to" --follow
back=$(field demo-cache node)
[ "$back" = "$to" ] || { echo "demo-cache did not come back to $to" >&2; exit 1; }
echo "demo-cache is back on $to, and answers: $(curl -s -m 3 "http://$ip/")"
if [ "${1:-}" = --keep ]; then
  echo; echo "left running. Try: $BIN/ferryctl --credentials $ADMIN --controller $CTRL vps ls; tear down with: scripts/cluster-demo.sh down"
fi
