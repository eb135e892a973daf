//! Where the agent keeps things.
//!
//! `data_dir` (persistent, default /var/lib/ferry):
//! - `templates/<name>/rootfs`, `templates/<name>/template.json`
//! - `import/`: archives `template import --on-node` may read (`--import-dir`)
//! - `vps/<name>/config.json` (spec and network identity), `vps/<name>/upper` and `work`
//!   (the VPS's own files over its template), `vps/<name>/rootfs` (overlay mount point)
//!
//! `run_dir` (per boot, default /run/ferry/<hash of data_dir>; /run is emptied by a reboot):
//! - `<name>/launch.json`, `state.json`, `netns`, `console.log`, `monitor.log`, `stop`

use std::path::{Path, PathBuf};

/// Where agents keep migration images in RAM (a tmpfs on every systemd host).
pub const RAM_ROOT: &str = "/dev/shm/ferry";

#[derive(Debug, Clone)]
pub struct Paths {
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
}

impl Paths {
    pub fn new(data_dir: PathBuf, run_dir: PathBuf) -> Self {
        Self { data_dir, run_dir }
    }

    /// The default run dir for a data dir: several agents on one machine (tests,
    /// the local cluster) each get their own.
    pub fn default_run_dir(data_dir: &Path) -> PathBuf {
        use sha2::Digest;
        let h = sha2::Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
        PathBuf::from("/run/ferry").join(hex::encode(&h[..6]))
    }

    /// A short id for an agent, from its run dir: it names the agent's cgroup
    /// subtree, so agents sharing one kernel never collide.
    pub fn instance_id(run_dir: &Path) -> String {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(run_dir.as_os_str().as_encoded_bytes())[..6])
    }

    /// Where the agent with data dir `data_dir` keeps migration images in
    /// RAM: named after the data dir, so any agent can tell whose it is.
    pub fn ram_images_of(data_dir: &Path) -> PathBuf {
        Path::new(RAM_ROOT).join(hex::encode(data_dir.as_os_str().as_encoded_bytes()))
    }

    pub fn templates(&self) -> PathBuf {
        self.data_dir.join("templates")
    }
    pub fn template(&self, name: &str) -> PathBuf {
        self.templates().join(name)
    }
    /// Where `ImportTemplatePath` reads archives from by default.
    pub fn import(&self) -> PathBuf {
        self.data_dir.join("import")
    }
    pub fn staging(&self) -> PathBuf {
        self.data_dir.join("staging")
    }
    pub fn vps_root(&self) -> PathBuf {
        self.data_dir.join("vps")
    }
    pub fn vps(&self, name: &str) -> PathBuf {
        self.vps_root().join(name)
    }
    pub fn vps_run(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }
}
