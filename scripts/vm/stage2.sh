#!/bin/sh
# The test VM's second stage, PID 1 on the host's root (read-only over 9p):
# gives the VM its own writable /run, /tmp, /var/tmp, /root and /dev/shm,
# its kernel's modules, the same hybrid cgroup layout as the host (v1
# controllers, a cgroup2 mount at unified; FERRY_VM_CGROUP=v2 passed with
# run.sh -e: one cgroup2 hierarchy instead), then runs the command that
# scripts/vm/run.sh left in the shared run dir and powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
run=/run/ferry-vm
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p $run
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 ferryrun $run
# Host dirs under those that get a tmpfs below and that the command needs
# (run.sh lists them): held aside, then put back in place.
i=0
while read -r top; do
  mkdir -p /run/ferry-expose/$i
  mount --bind "$top" /run/ferry-expose/$i
  i=$((i + 1))
done <$run/expose
mkdir -p /dev/shm
for d in /tmp /var/tmp /root /dev/shm; do mount -t tmpfs -o mode=1777 tmpfs $d; done
i=0
while read -r top; do
  mkdir -p "$top"
  mount --move /run/ferry-expose/$i "$top"
  i=$((i + 1))
done <$run/expose
chmod 700 /root
mkdir -p /dev/pts
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
# The host's root has no modules for this kernel: modprobe reads them from
# the unpacked package, for the kernel's own requests too (CRIU's socket
# diag modules, tun, nftables).
cat >/run/ferry-modprobe <<EOS
#!/bin/sh
exec /sbin/modprobe -d $(cat $run/vm)/root "\$@"
EOS
chmod 755 /run/ferry-modprobe
echo /run/ferry-modprobe >/proc/sys/kernel/modprobe
. $run/env
if [ "${FERRY_VM_CGROUP:-hybrid}" = v2 ]; then
  # Most production hosts: one cgroup2 hierarchy with the controllers on.
  mount -t cgroup2 cgroup2 /sys/fs/cgroup
  echo "+cpu +cpuset +memory +io +pids" >/sys/fs/cgroup/cgroup.subtree_control
else
  mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
  for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
    mkdir /sys/fs/cgroup/$c
    mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
  done
  mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
  mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
  mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
fi
/run/ferry-modprobe -a overlay veth bridge
ip link set lo up
hostname ferry-vm
cd "$(cat $run/cwd)" || cd /
sh $run/cmd </dev/null >/dev/console 2>&1
echo $? >$run/rc
sync
echo o >/proc/sysrq-trigger
while :; do :; done
