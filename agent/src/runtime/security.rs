//! What a VPS's processes may do: the capability set and a seccomp filter.
//!
//! # Capabilities
//! A VPS is a system container, so its root keeps what a server's root needs for
//! its own namespaces: mounts (SYS_ADMIN), network setup in its netns (NET_ADMIN,
//! NET_RAW), users and files (CHOWN, DAC_OVERRIDE, FOWNER, SETUID, SETGID, ...),
//! mknod (MKNOD; opening devices is policed by the device cgroup). Dropped,
//! because they reach past the VPS to the host kernel or hardware: SYS_PTRACE
//! (without a user namespace it is the host's: it would let VPS root ptrace a
//! process entering the VPS with the host's capabilities; tracing the VPS's own
//! processes needs no capability), SYS_MODULE, SYS_RAWIO, SYS_TIME, SYS_PACCT, DAC_READ_SEARCH
//! (open_by_handle_at escapes a chroot), MAC_ADMIN, MAC_OVERRIDE, SYSLOG,
//! WAKE_ALARM, BLOCK_SUSPEND, AUDIT_CONTROL, AUDIT_READ, PERFMON, BPF,
//! CHECKPOINT_RESTORE, and any capability newer than this list.
//!
//! SYS_BOOT is kept on purpose: inside a pid namespace, reboot(2) does not touch
//! the host, it ends the VPS's init with SIGHUP (restart) or SIGINT (power off),
//! which is how `reboot` and `poweroff` inside a VPS work. The one host-reaching
//! use of SYS_BOOT, loading a kernel with kexec, is refused by the seccomp filter.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Capabilities a VPS keeps (numbers from linux/capability.h).
pub const KEEP_CAPS: &[u32] = &[
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    9,  // LINUX_IMMUTABLE
    10, // NET_BIND_SERVICE
    11, // NET_BROADCAST
    12, // NET_ADMIN
    13, // NET_RAW
    14, // IPC_LOCK
    15, // IPC_OWNER
    18, // SYS_CHROOT
    21, // SYS_ADMIN
    22, // SYS_BOOT (see above)
    23, // SYS_NICE
    24, // SYS_RESOURCE
    26, // SYS_TTY_CONFIG
    27, // MKNOD
    28, // LEASE
    29, // AUDIT_WRITE
    31, // SETFCAP
];

/// Removes every capability not in [`KEEP_CAPS`] from the bounding set and the
/// ambient and inheritable sets. After execve, root's permitted and effective
/// sets equal the bounding set, so this is what the VPS ends up with.
pub fn drop_capabilities() -> std::io::Result<()> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    for cap in 0..=last {
        if KEEP_CAPS.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// System calls a VPS may not make (EPERM), whatever its capabilities: they
/// reach the host kernel as a whole, not the VPS's namespaces. Docker's and
/// LXC's default denylists, less what a system container needs (`reboot`
/// ends the VPS's own init; `mount`, `unshare` and `setns` work on its own
/// namespaces; `ptrace` within its pid namespace).
const DENIED: &[libc::c_long] = &[
    // Kernel code and the running kernel.
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    // BPF programs and kprobes; perf sees the whole host (with SYS_ADMIN).
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    // The kernel keyring is not namespaced: a VPS would share root's.
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    // File handles escape a chroot or a bind mount.
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    // Stalls kernel threads on the VPS's pages (use-after-free exploits);
    // CRIU's lazy restore makes its descriptors before the VPS's filter is in.
    libc::SYS_userfaultfd,
    // The host's clock, swap, accounting, quotas and kernel log.
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_lookup_dcookie,
    // Other processes' memory policies and pages.
    libc::SYS_move_pages,
    libc::SYS_migrate_pages,
    libc::SYS_kcmp,
    libc::SYS_fanotify_init,
];

/// The same, for calls only this architecture has.
#[cfg(target_arch = "x86_64")]
const DENIED_ARCH: &[libc::c_long] = &[
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_nfsservctl,
    libc::SYS_uselib,
    libc::SYS_ustat,
    libc::SYS__sysctl,
];
#[cfg(not(target_arch = "x86_64"))]
const DENIED_ARCH: &[libc::c_long] = &[];

/// Builds the seccomp program: the calls in [`DENIED`] fail with EPERM,
/// everything else is allowed. Built before fork, installed in the child.
pub fn seccomp_program() -> Result<BpfProgram, String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    let mut rules = BTreeMap::new();
    for nr in DENIED.iter().chain(DENIED_ARCH) {
        rules.insert(*nr, vec![]);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

/// Installs the program without setting no_new_privs (seccompiler's own
/// `apply_filter` sets it, which would break setuid tools like `su` and `ping`
/// inside a system container). Allowed because the caller holds CAP_SYS_ADMIN.
pub fn install_seccomp(prog: &BpfProgram) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at a live, well-formed BPF program for the duration of
    // the call; the kernel copies it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
