#!/usr/bin/env bash
# Makes a working CRIU >= 4.2 available as PREFIX/bin/criu (default
# /opt/ferry/criu). Uses the host's criu when it is >= 4.2 and can dump a
# process holding a TCP socket; otherwise installs Debian sid's criu packages
# into the private prefix (their glibc is newer than Debian 12's, so they run
# through the unpacked dynamic loader) without touching the system's apt
# configuration. See ../shared/notes/criu.md for why. Idempotent. Root required.
set -euo pipefail
PREFIX=${1:-/opt/ferry/criu}
PKGS=(criu libcompel1 libc6 libbsd0 libgnutls30t64 libnet9 libnftables1 libnl-3-200 libprotobuf-c1
  libuuid1 libmd0 libp11-kit0 libidn2-0 libunistring5 libtasn1-6 libnettle8t64 libhogweed6t64 libgmp10
  libffi8 libmnl0 libnftnl11 libxtables12 libjansson4 libedit2 libbpf1 libelf1t64 zlib1g libzstd1
  libgcc-s1 libcap2)

version_ok() { # criu binary → true when its version is >= 4.2
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^Version: *//p')
  [ -n "$v" ] && [ "$(printf '%s\n4.2\n' "$v" | sort -V | head -1)" = 4.2 ]
}

dump_works() { # criu binary → true when it can dump a process holding a TCP socket
  local criu=$1 dir pid ok=1
  dir=$(mktemp -d /tmp/ferry-criu-check.XXXXXX)
  setsid busybox nc -l -p 17999 </dev/null >/dev/null 2>&1 &
  pid=$!
  sleep 0.3
  if "$criu" dump -t "$pid" -D "$dir" --shell-job --leave-running --tcp-established -o dump.log >/dev/null 2>&1; then
    ok=0
  fi
  kill "$pid" 2>/dev/null || true
  [ $ok = 0 ] || tail -5 "$dir/dump.log" >&2 || true
  rm -rf "$dir"
  return $ok
}

if [ -x "$PREFIX/bin/criu" ] && version_ok "$PREFIX/bin/criu"; then
  echo "criu: $PREFIX/bin/criu ($("$PREFIX/bin/criu" --version | head -1))"
  exit 0
fi
mkdir -p "$PREFIX/bin"
if command -v criu >/dev/null && version_ok "$(command -v criu)" && dump_works "$(command -v criu)"; then
  ln -sf "$(command -v criu)" "$PREFIX/bin/criu"
  echo "criu: using the host's $(command -v criu)"
  exit 0
fi

work=$(mktemp -d /tmp/ferry-criu.XXXXXX)
trap 'rm -rf "$work"' EXIT
# apt downloads as the unprivileged _apt user: it must be able to write here.
chmod 755 "$work"
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/debs"
chown -R _apt "$work/lists" "$work/archives" "$work/debs" 2>/dev/null || true
echo "deb http://deb.debian.org/debian sid main" >"$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives"
  -o "Debug::NoLocking=1" -o "APT::Get::AllowUnauthenticated=false")
apt-get "${apt_opts[@]}" update -qq
(cd "$work/debs" && apt-get "${apt_opts[@]}" download -qq "${PKGS[@]}")
rm -rf "$PREFIX/root"
mkdir -p "$PREFIX/root"
for d in "$work"/debs/*.deb; do dpkg -x "$d" "$PREFIX/root"; done
lib=$PREFIX/root/usr/lib/x86_64-linux-gnu
cat >"$PREFIX/bin/criu" <<WRAP
#!/bin/sh
# CRIU from Debian sid, run through its own dynamic loader (scripts/install-criu.sh).
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$PREFIX/root/usr/sbin/criu" "\$@"
WRAP
chmod +x "$PREFIX/bin/criu"
version_ok "$PREFIX/bin/criu" || { echo "installed criu is not >= 4.2" >&2; exit 1; }
dump_works "$PREFIX/bin/criu" || { echo "installed criu cannot dump a TCP socket here" >&2; exit 1; }
echo "criu: $PREFIX/bin/criu ($("$PREFIX/bin/criu" --version | head -1)), socket dump checked"
