# Teardown helpers the demo scripts share (sourced). They touch only what
# the named agents made: nothing of another agent on this host.

# reap_agents RUN_DIR...: kills every task in the cgroups of the agents with
# these run dirs (each agent's cgroup parent is named after its run dir, see
# agent/src/paths.rs), so every VPS of theirs goes, whatever its name; then
# removes those cgroups, deepest first.
reap_agents() {
  local run inst c p
  for run in "$@"; do
    inst=$(printf %s "$run" | sha256sum | cut -c1-12)
    for c in /sys/fs/cgroup/*/ferry/"$inst"; do
      [ -d "$c" ] || continue
      for p in $(find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null); do
        kill -9 "$p" 2>/dev/null
      done
    done
  done
  sleep 0.2
  for run in "$@"; do
    inst=$(printf %s "$run" | sha256sum | cut -c1-12)
    for c in /sys/fs/cgroup/*/ferry/"$inst"; do
      [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null
    done
  done
  return 0
}

# unmount_under DIR: lazily unmounts everything mounted under DIR, deepest
# first, each mount point once.
unmount_under() {
  grep -o " $1/[^ ]*" /proc/self/mountinfo | sort -ru | while read -r m; do
    umount -l "$m" 2>/dev/null
  done
  return 0
}
