#!/usr/bin/env bash
# Makes a test VM available under PREFIX (default /opt/ferry/vm): Debian 12's
# stock kernel (which has soft-dirty memory tracking, CONFIG_MEM_SOFT_DIRTY,
# unlike some hosts' kernels) and a small initramfs that mounts the host's
# root read-only over 9p. scripts/vm/run.sh boots it under qemu (KVM when
# /dev/kvm works) and runs one command inside: this is how the tests check
# pre-copy migration on a host whose own kernel cannot track dirty memory.
# Idempotent. Root required. The kernel is unpacked, never installed.
set -euo pipefail
PREFIX=${1:-/opt/ferry/vm}
# qemu without its GUI and firmware recommends; kmod for the VM's modprobe
# and depmod, cpio for the initramfs.
"$(dirname "$0")/apt-ensure.sh" --no-recommends qemu-system-x86 kmod cpio busybox-static
if [ -s "$PREFIX/vmlinuz" ] && [ -s "$PREFIX/initrd" ] && [ -s "$PREFIX/release" ]; then
  echo "vm: $PREFIX (kernel $(cat "$PREFIX/release"))"
  exit 0
fi

work=$(mktemp -d /tmp/ferry-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
kernel_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
pkg=$(kernel_pkg)
if [ -z "$pkg" ]; then
  # A fresh machine may have no package lists yet.
  apt-get update -qq
  pkg=$(kernel_pkg)
fi
[ -n "$pkg" ] || { echo "no Debian kernel package (linux-image-amd64) in the package lists" >&2; exit 1; }
(cd "$work" && apt-get download -qq "$pkg" 2>/dev/null)
rm -rf "$PREFIX.new"
mkdir -p "$PREFIX.new/root"
dpkg-deb -x "$work"/linux-image-*.deb "$PREFIX.new/root"
release=$(ls "$PREFIX.new/root/lib/modules")
grep -q '^CONFIG_MEM_SOFT_DIRTY=y' "$PREFIX.new/root/boot/config-$release" ||
  { echo "$pkg has no soft-dirty tracking" >&2; exit 1; }
depmod -b "$PREFIX.new/root" "$release"
cp "$PREFIX.new/root/boot/vmlinuz-$release" "$PREFIX.new/vmlinuz"

# The initramfs: busybox, the modules that reach the host's root over 9p, and
# scripts/vm/init.
ird="$work/initrd"
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,mods}
cp /bin/busybox "$ird/bin/busybox"
mods=$(for m in virtio_pci 9pnet_virtio 9p; do
  modprobe -d "$PREFIX.new/root" -S "$release" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
done | awk '!seen[$0]++')
: >"$ird/mods/order"
for m in $mods; do
  cp "$m" "$ird/mods/"
  basename "$m" >>"$ird/mods/order"
done
install -m 755 "$(dirname "$0")/vm/init" "$ird/init"
(cd "$ird" && find . | cpio -o -H newc --quiet) | gzip -1 >"$PREFIX.new/initrd"
echo "$release" >"$PREFIX.new/release"
rm -rf "$PREFIX"
mv "$PREFIX.new" "$PREFIX"
echo "vm: $PREFIX (kernel $release)"
