#!/usr/bin/env bash
# Boots the test VM (scripts/install-vm.sh makes it) and runs one command in
# it, as root, in the same working dir, on the host's files (read-only) with
# the VM's own kernel. Exits with the command's status (125: the VM never
# ran it). Its output goes to stdout with the VM's console.
#   scripts/vm/run.sh [-m MIB] [-e VAR]... -- CMD [ARG...]
# -e passes the host's value of VAR. FERRY_VM_TIMEOUT (seconds, default 900)
# bounds the whole run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
vm=${FERRY_VM:-/opt/ferry/vm}
mem=3072
envs=()
while [ $# -gt 0 ]; do
  case "$1" in
    -m) mem=$2; shift 2 ;;
    -e) envs+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [-m MIB] [-e VAR]... -- CMD [ARG...]" >&2; exit 2; }
[ -s "$vm/vmlinuz" ] || { echo "no test VM in $vm: run scripts/install-vm.sh" >&2; exit 125; }
run=$(mktemp -d /tmp/ferry-vm-run.XXXXXX)
trap 'rm -rf "$run"' EXIT
printf '%q ' "$@" >"$run/cmd"
pwd >"$run/cwd"
# The VM gives itself empty /tmp, /var/tmp and /root: the host dirs under
# them that the command needs (its working dir, its binary) are kept.
exe=$1
case "$exe" in */*) exe=$(realpath -- "$exe") ;; *) exe= ;; esac
for p in "$(pwd)" $exe; do
  for d in /tmp /var/tmp /root; do
    case "$p" in "$d"/*) rest=${p#"$d"/}; echo "$d/${rest%%/*}" ;; esac
  done
done | sort -u >"$run/expose"
echo "$vm" >"$run/vm"
: >"$run/env"
for v in "${envs[@]}"; do
  [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}" >>"$run/env"
done
# Software emulation: this machine's /dev/kvm opens, but its guests hang at
# the kernel's first instructions whatever CPU model they get.
accel=(-accel tcg,thread=multi -cpu max)
timeout -s KILL "${FERRY_VM_TIMEOUT:-900}" qemu-system-x86_64 "${accel[@]}" -m "$mem" -smp "$(nproc)" \
  -nodefaults -no-user-config -display none -serial stdio -no-reboot \
  -kernel "$vm/vmlinuz" -initrd "$vm/initrd" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 ferry.stage2=$here/stage2.sh" \
  -virtfs "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap" \
  -virtfs "local,path=$run,mount_tag=ferryrun,security_model=passthrough" </dev/null || true
rc=$(cat "$run/rc" 2>/dev/null || echo 125)
exit "$rc"
