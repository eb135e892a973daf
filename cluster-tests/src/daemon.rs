//! A daemon running inside a host's network namespace, and the fault verbs
//! on it: SIGKILL, restart (same flags, same data dir), SIGSTOP, SIGCONT.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct Daemon {
    pub name: String,
    bin: PathBuf,
    netns: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts `bin ARGS` in `netns` (a /run/netns path) with `env` added,
    /// logging to `log`.
    pub fn spawn(
        name: &str,
        bin: PathBuf,
        netns: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> Daemon {
        let mut d = Daemon {
            name: name.to_string(),
            bin,
            netns: netns.to_string(),
            args,
            env,
            log,
            child: None,
        };
        d.start();
        d
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("{}: {e}", self.log.display()));
        let err = log.try_clone().unwrap_or_else(|e| panic!("log: {e}"));
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns))
            .arg("--")
            .arg(&self.bin)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, as a crash would end it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same flags (after [`Daemon::kill9`]).
    pub fn restart(&mut self) {
        self.kill9();
        self.start();
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            crate::run_ok("kill", &[sig, &pid.to_string()]);
        }
    }

    /// Freezes it (SIGSTOP): its sockets stay open, nothing answers.
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    pub fn cont(&self) {
        self.signal("-CONT");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A stopped process ignores SIGTERM but not SIGKILL; CONT first so
        // its children see it go.
        self.cont();
        self.kill9();
    }
}
