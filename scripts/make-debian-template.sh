#!/usr/bin/env bash
# Builds a Debian template archive with debootstrap, ready for
#   ferryctl template import debian12 OUT.tar.zst
#   ferryctl vps create d1 --template debian12 --stop-signal SIGPWR --ip ... --start
# Usage: make-debian-template.sh OUT.tar.zst [SUITE] [MIRROR]
# The VPS boots sysvinit (/sbin/init). What is changed for life in a VPS:
#  - no gettys (a VPS has no ttys; they would respawn for ever);
#  - SIGPWR shuts down (powerfail -> init 0), so `vps stop` is a clean shutdown;
#  - no /etc/hostname, so the boot scripts keep the hostname Ferry sets.
set -euo pipefail
out=${1:?usage: make-debian-template.sh OUT.tar.zst [SUITE] [MIRROR]}
suite=${2:-bookworm}
mirror=${3:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
work=$(mktemp -d /var/tmp/ferry-debootstrap.XXXXXX)
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include=sysvinit-core,iproute2,procps,iputils-ping,netbase \
  "$suite" "$work/root" "$mirror" >"$work/log" 2>&1 || { tail -20 "$work/log" >&2; exit 1; }
root=$work/root
sed -i -E 's/^([0-9]+:[0-9]+:respawn:\/sbin\/getty.*)/#\1/' "$root/etc/inittab"
grep -q '^p0::powerfail' "$root/etc/inittab" || echo 'p0::powerfail:/sbin/init 0' >>"$root/etc/inittab"
rm -f "$root/etc/hostname"
: >"$root/etc/resolv.conf"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" --numeric-owner --xattrs -cf - . | zstd -q -T0 -3 >"$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(du -h "$out" | cut -f1))"
