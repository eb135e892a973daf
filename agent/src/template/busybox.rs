//! The built-in `busybox` template, made from the host's static busybox
//! (Debian's busybox-static). Its init runs `/etc/init.d/rcS` and keeps an
//! httpd serving `/var/www` on port 80, so a fresh VPS answers HTTP.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{install, tree_usage, unix_now, TemplateMeta};
use crate::error::{AgentError, IoContext, Result};
use crate::paths::Paths;

pub const NAME: &str = "busybox";

const INITTAB: &str = "\
::sysinit:/etc/init.d/rcS
::respawn:/usr/sbin/httpd -f -p 80 -h /var/www
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
";

const RCS: &str = "#!/bin/sh
# Ferry busybox VPS boot script.
mkdir -p /tmp /var/www /var/run /root
chmod 1777 /tmp
hostname > /var/www/index.html
for f in /etc/rc.d/*.sh; do [ -x \"$f\" ] && \"$f\"; done
echo \"booted $(hostname)\"
";

/// Creates the template if it is missing and a static busybox exists at `busybox`.
/// Returns whether the template is present afterwards.
pub fn ensure_busybox(paths: &Paths, busybox: &Path) -> Result<bool> {
    if paths.template(NAME).join(super::META_FILE).exists() {
        return Ok(true);
    }
    if !busybox.exists() {
        return Ok(false);
    }
    let staged = paths
        .staging()
        .join(format!("busybox-{}", std::process::id()));
    let _ = super::remove_tree(&staged);
    let res = build(paths, busybox, &staged);
    if res.is_err() {
        let _ = super::remove_tree(&staged);
    }
    res.map(|_| true)
}

fn build(paths: &Paths, busybox: &Path, staged: &Path) -> Result<()> {
    let root = staged.join("rootfs");
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc/init.d",
        "etc/rc.d",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "var/www",
        "var/run",
    ] {
        std::fs::create_dir_all(root.join(d)).at("creating", root.join(d))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .at("chmod", root.join("tmp"))?;
    let bin = std::fs::read(busybox).at("reading", busybox)?;
    let mut hash = Sha256::new();
    hash.update(&bin);
    std::fs::write(root.join("bin/busybox"), &bin).at("writing", root.join("bin/busybox"))?;
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )
    .at("chmod", root.join("bin/busybox"))?;
    let out = std::process::Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| AgentError::io(format!("running {} --list-full", busybox.display()), e))?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let link = root.join(applet);
        if applet.is_empty() || applet == "bin/busybox" || link.exists() {
            continue;
        }
        symlink("/bin/busybox", &link).at("linking applet", &link)?;
    }
    let files: &[(&str, &str, u32)] = &[
        ("etc/inittab", INITTAB, 0o644),
        ("etc/init.d/rcS", RCS, 0o755),
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
            0o644,
        ),
        (
            "etc/group",
            "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
            0o644,
        ),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n", 0o600),
        ("etc/hosts", "127.0.0.1 localhost\n", 0o644),
        ("etc/resolv.conf", "", 0o644),
    ];
    for (p, text, mode) in files {
        let path = root.join(p);
        std::fs::write(&path, text).at("writing", &path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
            .at("chmod", &path)?;
        hash.update(p.as_bytes());
        hash.update(text.as_bytes());
    }
    let (size, count) = tree_usage(&root);
    let meta = TemplateMeta {
        name: NAME.into(),
        size_bytes: size,
        sha256: hex::encode(hash.finalize()),
        source: format!("builtin: {}", busybox.display()),
        imported_unix: unix_now(),
        file_count: count,
    };
    install(paths, staged, &meta, false).map(|_| ())
}
