//! A VPS is its own server: hostname, process tree, files, capabilities, masks.

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn vps_sees_only_itself() {
    bounded(120, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        let mut s = spec("iso1", None);
        s.hostname = "box.example".into();
        let v = create_started(&mut c, s).await;
        assert!(v.init_pid > 0);

        let r = exec(&mut c, "iso1", &["hostname"]).await;
        assert_eq!((r.code, r.stdout.trim()), (0, "box.example"));

        // ps: init is PID 1 and every process is the VPS's own.
        let r = exec(&mut c, "iso1", &["ps", "-o", "pid,comm"]).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        let lines: Vec<&str> = r.stdout.lines().skip(1).collect();
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["1", "init"]),
            "{}",
            r.stdout
        );
        assert!(
            lines.len() <= 4,
            "only init, httpd, ps (and sh): {}",
            r.stdout
        );
        assert!(
            !r.stdout.contains("ferry-agent") && !r.stdout.contains("cargo"),
            "{}",
            r.stdout
        );

        // A host file is invisible; the VPS's own tree is the template's.
        let marker = h.dir.join("host-secret");
        std::fs::write(&marker, "x").unwrap();
        let r = exec(&mut c, "iso1", &["ls", marker.to_str().unwrap()]).await;
        assert_ne!(r.code, 0, "host file visible inside: {}", r.stdout);
        let r = exec(&mut c, "iso1", &["cat", "/etc/inittab"]).await;
        assert!(r.stdout.contains("httpd"), "{}", r.stdout);

        // Capabilities: no SYS_MODULE (16), SYS_RAWIO (17), SYS_TIME (25); SYS_ADMIN (21) kept.
        let r = exec(&mut c, "iso1", &["grep", "CapBnd", "/proc/self/status"]).await;
        let bnd = u64::from_str_radix(r.stdout.split_whitespace().nth(1).unwrap(), 16).unwrap();
        for dropped in [2, 16, 17, 25, 33, 34, 39] {
            assert_eq!(bnd & (1 << dropped), 0, "cap {dropped} kept: {bnd:x}");
        }
        assert_ne!(bnd & (1 << 21), 0);
        // Setting the clock fails even for root (busybox date says so but exits 0).
        let r = exec(&mut c, "iso1", &["date", "-s", "2000-01-01"]).await;
        assert!(
            r.stderr.contains("not permitted"),
            "date -s inside a VPS: {} {}",
            r.stdout,
            r.stderr
        );
        let year = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 31_557_600
            + 1970;
        assert!(year > 2020, "host clock moved");

        // Masks: whichever of these the host kernel has read as empty inside.
        let mut checked = 0;
        for f in [
            "kcore",
            "sysrq-trigger",
            "keys",
            "timer_list",
            "sched_debug",
            "latency_stats",
        ] {
            if std::path::Path::new("/proc").join(f).exists() {
                let r = exec(&mut c, "iso1", &["sh", "-c", &format!("wc -c < /proc/{f}")]).await;
                assert_eq!(
                    (r.code, r.stdout.trim()),
                    (0, "0"),
                    "/proc/{f} not masked: {}",
                    r.stderr
                );
                checked += 1;
            }
        }
        assert!(checked >= 1, "no maskable /proc file on this kernel");
        let r = exec(
            &mut c,
            "iso1",
            &[
                "sh",
                "-c",
                "find /proc/acpi /sys/firmware -mindepth 1 | wc -l; touch /proc/acpi/x",
            ],
        )
        .await;
        assert_ne!(r.code, 0, "masked dir writable");
        assert_eq!(r.stdout.trim(), "0", "masked dirs not empty: {}", r.stdout);
        let r = exec(
            &mut c,
            "iso1",
            &["sh", "-c", "echo 1 > /proc/sys/kernel/sysrq"],
        )
        .await;
        assert_ne!(r.code, 0, "/proc/sys/kernel writable");
        let r = exec(
            &mut c,
            "iso1",
            &[
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward && cat /proc/sys/net/ipv4/ip_forward",
            ],
        )
        .await;
        assert_eq!(
            (r.code, r.stdout.trim()),
            (0, "1"),
            "the VPS's own net sysctls are writable: {}",
            r.stderr
        );
        let r = exec(&mut c, "iso1", &["sh", "-c", "touch /sys/x"]).await;
        assert_ne!(r.code, 0, "/sys writable");

        // A minimal /dev: the listed nodes, nothing of the host's disks.
        let r = exec(&mut c, "iso1", &["ls", "/dev"]).await;
        for n in [
            "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm",
        ] {
            assert!(
                r.stdout.split_whitespace().any(|x| x == n),
                "/dev/{n} missing: {}",
                r.stdout
            );
        }
        assert!(
            !r.stdout.contains("vda") && !r.stdout.contains("sda"),
            "{}",
            r.stdout
        );
        // A device node made inside cannot be opened (device cgroup).
        let r = exec(
            &mut c,
            "iso1",
            &["sh", "-c", "mknod /tmp/disk b 254 0 && head -c1 /tmp/disk"],
        )
        .await;
        assert_ne!(r.code, 0, "opened a block device: {}", r.stdout);

        // Init holds no descriptor of the agent's or the monitor's: only 0, 1, 2.
        let r = exec(&mut c, "iso1", &["ls", "/proc/1/fd"]).await;
        assert_eq!(
            r.stdout.split_whitespace().collect::<Vec<_>>(),
            ["0", "1", "2"],
            "{}",
            r.stdout
        );
        // And it leads its own session inside the pid namespace.
        let r = exec(&mut c, "iso1", &["cat", "/proc/1/stat"]).await;
        let after = r.stdout.rsplit_once(')').unwrap().1;
        let f: Vec<&str> = after.split_whitespace().collect();
        assert_eq!(
            (f[2], f[3]),
            ("1", "1"),
            "pgid and sid of init: {}",
            r.stdout
        );
    })
    .await;
}

/// Root in a VPS plants a setuid-root shell in its own files; a host user
/// (nobody) tries to run it from the VPS's upper dir on the host, and to read
/// the VPS's files and run state. The data dir and run dir are root's alone.
#[tokio::test(flavor = "multi_thread")]
async fn host_users_cannot_reach_a_vps_s_files() {
    bounded(120, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        create_started(&mut c, spec("isosuid", None)).await;
        let r = exec(
            &mut c,
            "isosuid",
            &[
                "sh",
                "-c",
                "cp /bin/busybox /suidsh && chmod 4755 /suidsh && echo secret > /root/note",
            ],
        )
        .await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        let upper = h.data_dir().join("vps/isosuid/upper");
        let planted = upper.join("suidsh");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&planted)
            .expect("the planted file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o4000, 0o4000, "the plant is setuid root");
        for d in [h.data_dir(), h.run_dir()] {
            let m = std::fs::metadata(&d).expect("dir").permissions().mode();
            assert_eq!(m & 0o777, 0o700, "{} is {:o}", d.display(), m & 0o777);
        }
        let as_nobody = |cmd: &str| {
            std::process::Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .args(["/bin/sh", "-c", cmd])
                .output()
                .expect("setpriv")
        };
        let out = as_nobody(&format!("{} sh -c 'id -u'", planted.display()));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            !out.status.success() && !text.contains('0'),
            "nobody ran the VPS's setuid shell: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "{out:?}"
        );
        let out = as_nobody(&format!("cat {}/root/note", upper.display()));
        assert!(!out.status.success(), "nobody read a VPS's file: {out:?}");
        let out = as_nobody(&format!("ls {}", h.run_dir().display()));
        assert!(!out.status.success(), "nobody listed the run dir: {out:?}");
    })
    .await;
}

/// Root in a VPS tries what reaches the host kernel as a whole: BPF, system-
/// wide perf, the kernel keyring, userfaultfd, kcmp, module loading, kexec.
/// The same probe run on the host shows those calls work there.
#[tokio::test(flavor = "multi_thread")]
async fn a_vps_cannot_reach_the_host_kernel() {
    bounded(120, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        create_started(&mut c, spec("isokern", None)).await;
        let bin = h.dir.join("probe");
        build_probe("syscalls", &bin);
        let host = std::process::Command::new(&bin)
            .output()
            .expect("probe on the host");
        let host = probe_results(&String::from_utf8_lossy(&host.stdout));
        for call in [
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "userfaultfd",
            "kcmp",
        ] {
            assert_ne!(
                host.get(call).map(String::as_str),
                Some("EPERM"),
                "{call} is refused on the host already: the probe proves nothing ({host:?})"
            );
        }
        assert_kernel_calls_refused(&mut c, &h, "isokern", &bin).await;
    })
    .await;
}

/// runc's CVE-2016-9962, tried on `vps exec`: a racer inside the VPS seizes
/// (ptrace) every new process it sees while `vps exec` runs commands. It may
/// catch the commands (VPS processes like its own), never the helper while it
/// still holds the host's capabilities (SYS_MODULE, which no VPS process has).
#[tokio::test(flavor = "multi_thread")]
async fn nothing_in_a_vps_catches_the_exec_helper() {
    bounded(180, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        create_started(&mut c, spec("isorace", None)).await;
        let bin = h.dir.join("racer");
        build_probe("racer", &bin);
        let rootfs = h.data_dir().join("vps/isorace/rootfs");
        std::fs::copy(&bin, rootfs.join("racer")).expect("copying the racer into the VPS");
        spawn_in(&mut c, "isorace", "/racer 15 /racer.out").await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        for i in 0..40 {
            let cmd = if i % 4 == 0 { "sleep 0.2" } else { "true" };
            let r = exec(&mut c, "isorace", &["sh", "-c", cmd]).await;
            assert_eq!(r.code, 0, "{}", r.stderr);
        }
        let out = std::fs::read_to_string(rootfs.join("racer.out")).unwrap_or_default();
        const SYS_MODULE: u64 = 1 << 16;
        let privileged: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("caught "))
            .filter(|l| {
                l.split_whitespace()
                    .last()
                    .and_then(|c| u64::from_str_radix(c, 16).ok())
                    .is_some_and(|caps| caps & SYS_MODULE != 0)
            })
            .collect();
        assert!(
            privileged.is_empty(),
            "caught with host capabilities: {privileged:?}\n{out}"
        );
        assert!(
            out.lines().any(|l| l.starts_with("caught ")),
            "the racer caught nothing at all: it proves nothing\n{out}"
        );
        let helper = out.lines().filter(|l| l.contains(" ferry-agent")).count();
        eprintln!("the racer saw the helper {helper} times:\n{out}");
    })
    .await;
}

/// Root in a VPS mounts its own cgroup filesystems and tries to raise its
/// memory and pids limits and to grant itself every device, then to read a
/// host block device (a loop device holding a marker). Its tasks live in a
/// leaf below the cgroup that carries the limits: the writes it may make
/// change nothing that binds, and the device grant is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_vps_cannot_raise_its_limits_or_grant_itself_devices() {
    bounded(180, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        let mut s = spec("isocg", None);
        let l = s.limits.as_mut().expect("limits");
        l.memory_bytes = 64 << 20;
        l.pids = 64;
        create_started(&mut c, s).await;
        let dirs = h.cgroup_dirs("isocg");
        let v1 = dirs.iter().any(|d| d.to_string_lossy().contains("/memory/"));
        if !v1 {
            eprintln!("this host's cgroups are v2: the v2 half runs in the test VM's suite");
            return;
        }
        // A host loop device with a marker on it.
        let img = h.dir.join("disk.img");
        std::fs::write(&img, [b"FERRY-HOST-DISK".as_slice(), &[0u8; 4096]].concat()).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "{out:?}");
        let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        struct Detach(String);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
            }
        }
        let _detach = Detach(loopdev.clone());
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&loopdev).expect("loop device").rdev();
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        // The host reads the marker: the device works.
        let head = std::fs::read(&loopdev).map(|b| b[..15].to_vec()).unwrap_or_default();
        assert_eq!(head, b"FERRY-HOST-DISK");

        let r = exec(
            &mut c,
            "isocg",
            &[
                "sh",
                "-c",
                &format!(
                    "mkdir -p /cgm /cgd /cgp; \
                     mount -t cgroup -o memory none /cgm; \
                     mount -t cgroup -o devices none /cgd; \
                     mount -t cgroup -o pids none /cgp; \
                     echo 1073741824 > /cgm/memory.limit_in_bytes; echo mem=$?; \
                     echo max > /cgp/pids.max; echo pids=$?; \
                     echo a > /cgd/devices.allow; echo dev=$?; \
                     mknod /blk b {major} {minor}; \
                     dd if=/blk bs=15 count=1 2>/dev/null; echo \" read=$?\""
                ),
            ],
        )
        .await;
        eprintln!("{}\n{}", r.stdout, r.stderr);
        assert!(r.stdout.contains("dev=1"), "the device grant went through: {}", r.stdout);
        assert!(
            !r.stdout.contains("FERRY-HOST-DISK"),
            "the VPS read the host's disk: {}",
            r.stdout
        );
        // The limits that bind are where they were.
        let mem = dirs
            .iter()
            .find(|d| d.to_string_lossy().contains("/memory/"))
            .expect("memory cgroup");
        let limit: u64 = std::fs::read_to_string(mem.join("memory.limit_in_bytes"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(limit, 64 << 20);
        let pids = dirs
            .iter()
            .find(|d| d.to_string_lossy().contains("/pids/"))
            .expect("pids cgroup");
        assert_eq!(std::fs::read_to_string(pids.join("pids.max")).unwrap().trim(), "64");
        // And bind: 128 MiB do not fit whatever the VPS wrote.
        let r = exec(
            &mut c,
            "isocg",
            &[
                "sh",
                "-c",
                "awk 'BEGIN { s = \"x\"; while (length(s) < 134217728) s = s s; print length(s) }'; echo rc=$?",
            ],
        )
        .await;
        assert!(!r.stdout.contains("134217728"), "128 MiB fit in a 64 MiB VPS: {}", r.stdout);
        let v = get(&mut c, "isocg").await;
        assert_eq!(v.spec.unwrap().limits.unwrap().memory_bytes, 64 << 20);
    })
    .await;
}
