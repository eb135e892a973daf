//! The VPS's filesystem view, built inside its new mount namespace just before
//! init runs: the rootfs (the overlay the agent mounted) becomes `/` through
//! pivot_root, with /proc, a read-only /sys, a minimal /dev and the usual masks.
//! Nothing here is visible on the host: it all lives in the VPS's mount namespace.

use std::os::unix::fs::symlink;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

type R<T> = Result<T, String>;

fn m(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> R<()> {
    mount(src, target, fstype, flags, data)
        .map_err(|e| format!("mount {} on {}: {e}", src.unwrap_or("-"), target.display()))
}

/// Sets `p`'s mode exactly (creation honours the umask).
fn chmod(p: &Path, mode: u32) -> R<()> {
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        p,
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(|e| format!("chmod {}: {e}", p.display()))
}

fn ensure_dir(p: &Path) -> R<()> {
    if !p.is_dir() {
        std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
    }
    Ok(())
}

/// The device nodes of the minimal /dev. A privileged VPS's are made with
/// mknod ([`DEVICES`]); an unprivileged VPS may not make device nodes (that
/// needs CAP_MKNOD on the host), so the host's own are bound in.
pub const HOST_DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Device nodes of the minimal /dev: name, major, minor.
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Files of /proc that expose or reach the host kernel: hidden behind /dev/null.
const MASKED_FILES: &[&str] = &[
    "proc/kcore",
    "proc/keys",
    "proc/timer_list",
    "proc/sched_debug",
    "proc/latency_stats",
    "proc/sysrq-trigger",
];
/// Directories hidden behind an empty read-only dir ([`MASK_DIR`]).
const MASKED_DIRS: &[&str] = &["proc/acpi", "proc/scsi", "sys/firmware"];
/// The empty dir in the VPS's /dev that masks them.
const MASK_DIR: &str = ".ferry-mask";
/// Made read-only (the VPS's own /proc/sys/net stays writable).
const READONLY: &[&str] = &["proc/irq", "proc/bus", "proc/fs"];

/// Builds the mounts under `root` and pivots into it. Runs in the VPS's init
/// before exec, inside the new mount namespace. `userns`: init is in the
/// VPS's user namespace, still with the host's uid 0 (unmapped there): it
/// becomes the VPS's root once the rootfs is reached, before it makes anything.
pub fn enter_rootfs(root: &Path, userns: bool) -> R<()> {
    let nodev_nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // Nothing we mount may leak back to the host.
    m(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    m(
        Some(root.to_str().ok_or("rootfs path is not UTF-8")?),
        root,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    // From here on paths are relative to the rootfs: the VPS's root cannot
    // walk the agent's 0700 data dir to it.
    std::env::set_current_dir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    if userns {
        become_vps_root()?;
    }
    let root = Path::new(".");

    let proc = root.join("proc");
    ensure_dir(&proc)?;
    m(
        Some("proc"),
        &proc,
        Some("proc"),
        nodev_nosuid | MsFlags::MS_NOEXEC,
        None,
    )?;
    let sys = root.join("sys");
    ensure_dir(&sys)?;
    m(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        nodev_nosuid | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        None,
    )?;

    setup_dev(root, userns)?;
    mask(root)?;

    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    // The old root is stacked under the new one at "/": detach it.
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detaching the old root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// setresgid/setresuid to 0 inside the user namespace (host `base`), with
/// no supplementary groups. The capabilities held in the namespace stay.
pub(super) fn become_vps_root() -> R<()> {
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    let (g, u) = (nix::unistd::Gid::from_raw(0), nix::unistd::Uid::from_raw(0));
    nix::unistd::setresgid(g, g, g).map_err(|e| format!("setresgid 0: {e}"))?;
    nix::unistd::setresuid(u, u, u).map_err(|e| format!("setresuid 0: {e}"))
}

fn setup_dev(root: &Path, userns: bool) -> R<()> {
    let dev = root.join("dev");
    ensure_dir(&dev)?;
    m(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=4m"),
    )?;
    if userns {
        for name in HOST_DEVICES {
            let p = dev.join(name);
            std::fs::File::create(&p).map_err(|e| format!("creating {}: {e}", p.display()))?;
            let host = format!("/dev/{name}");
            m(Some(&host), &p, None, MsFlags::MS_BIND, None)?;
        }
    } else {
        for (name, major, minor) in DEVICES {
            let p = dev.join(name);
            mknod(
                &p,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o666),
                makedev(*major, *minor),
            )
            .map_err(|e| format!("mknod {}: {e}", p.display()))?;
            // mknod honours the umask; make the mode exact.
            chmod(&p, 0o666)?;
        }
    }
    let pts = dev.join("pts");
    ensure_dir(&pts)?;
    m(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    let shm = dev.join("shm");
    ensure_dir(&shm)?;
    m(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=65536k"),
    )?;
    let mq = dev.join("mqueue");
    ensure_dir(&mq)?;
    m(
        Some("mqueue"),
        &mq,
        Some("mqueue"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(link)).map_err(|e| format!("symlink /dev/{link}: {e}"))?;
    }
    Ok(())
}

fn mask(root: &Path) -> R<()> {
    let null = root.join("dev/null");
    for f in MASKED_FILES {
        let p = root.join(f);
        if p.exists() {
            m(
                Some(null.to_str().unwrap_or("/dev/null")),
                &p,
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        }
    }
    // The masked dirs show one empty, read-only dir of the VPS's own /dev
    // tmpfs, bound over each. To CRIU that is a bind of a mount it dumps
    // anyway; an empty tmpfs of their own (the usual mask) costs CRIU a tar
    // at every dump and an untar at every restore, ~4 ms each inside a
    // migration's freeze. Remounted writable by the VPS's root, it writes
    // into its own /dev, as it would into its own tmpfs.
    let masked: Vec<_> = MASKED_DIRS
        .iter()
        .map(|d| root.join(d))
        .filter(|p| p.is_dir())
        .collect();
    if !masked.is_empty() {
        let empty = root.join("dev").join(MASK_DIR);
        std::fs::create_dir(&empty).map_err(|e| format!("mkdir {}: {e}", empty.display()))?;
        chmod(&empty, 0o555)?;
        for p in masked {
            m(Some(path_str(&empty)?), &p, None, MsFlags::MS_BIND, None)?;
            remount_ro(&p)?;
        }
    }
    // /proc/sys read-only but for net: bind net first, then a recursive bind of
    // /proc/sys over itself carries it along, and only the top gets remounted ro.
    let sys = root.join("proc/sys");
    let net = sys.join("net");
    m(Some(path_str(&net)?), &net, None, MsFlags::MS_BIND, None)?;
    m(
        Some(path_str(&sys)?),
        &sys,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    remount_ro(&sys)?;
    for d in READONLY {
        let p = root.join(d);
        if p.exists() {
            m(
                Some(path_str(&p)?),
                &p,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )?;
            remount_ro(&p)?;
        }
    }
    Ok(())
}

/// Remounts the bind mount at `p` read-only, nosuid, nodev, noexec.
fn remount_ro(p: &Path) -> R<()> {
    m(
        None,
        p,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None,
    )
}

fn path_str(p: &Path) -> R<&str> {
    p.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", p.display()))
}
