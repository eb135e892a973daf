//! Stop and restart: SIGTERM to init, a grace period, then SIGKILL; then the
//! VPS's kernel objects are released.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{Agent, Status};
use crate::error::{AgentError, IoContext, Result};
use crate::runtime::{Phase, RuntimeState, STOP_MARKER};

pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
const KILL_WAIT: Duration = Duration::from_secs(10);

impl Agent {
    #[tracing::instrument(skip(self))]
    pub async fn stop(&self, name: &str, timeout: Duration, force: bool) -> Result<()> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        self.refuse_arriving(name)?;
        self.stop_locked(name, timeout, force).await
    }

    pub(super) async fn stop_locked(
        &self,
        name: &str,
        timeout: Duration,
        force: bool,
    ) -> Result<()> {
        let rec = self.record(name)?;
        let run = self.paths.vps_run(name);
        let state = match self.status(name) {
            Status::Stopped(_) => return self.teardown(name).await,
            Status::Running(s) | Status::Stopping(s) => s,
        };
        std::fs::write(run.join(STOP_MARKER), b"")
            .at("writing stop marker", run.join(STOP_MARKER))?;
        if !force {
            // The template's init decides what means "shut down".
            let sig = Signal::try_from(rec.config.stop_signal).unwrap_or(Signal::SIGTERM);
            signal_init(&state, sig);
            if self.wait_stopped(name, timeout).await {
                return self.finish_stop(name, &state).await;
            }
            tracing::warn!(?timeout, ?sig, "init did not stop in time; killing");
        }
        signal_init(&state, Signal::SIGKILL);
        if !self.wait_stopped(name, KILL_WAIT).await {
            return Err(AgentError::Internal(format!(
                "VPS {name} did not die after SIGKILL"
            )));
        }
        self.finish_stop(name, &state).await
    }

    pub(super) async fn wait_stopped(&self, name: &str, within: Duration) -> bool {
        let end = Instant::now() + within;
        loop {
            let run = self.paths.vps_run(name);
            let st = RuntimeState::read(&run);
            let init_gone = st.as_ref().is_none_or(|s| !s.init_alive());
            let monitor_done = st
                .as_ref()
                .is_none_or(|s| s.phase == Phase::Stopped || !s.monitor_alive());
            if init_gone && monitor_done {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish_stop(&self, name: &str, before: &RuntimeState) -> Result<()> {
        let run = self.paths.vps_run(name);
        // A VPS whose monitor was gone leaves no final state: write one.
        let st = RuntimeState::read(&run).unwrap_or_else(|| before.clone());
        if st.phase != Phase::Stopped {
            let mut st = st;
            st.phase = Phase::Stopped;
            st.stop_reason = "stopped".into();
            let _ = st.write(&run);
        }
        self.teardown(name).await?;
        tracing::info!("stopped");
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    pub async fn restart(
        self: &std::sync::Arc<Self>,
        name: &str,
        timeout: Duration,
        force: bool,
    ) -> Result<()> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        self.refuse_arriving(name)?;
        self.stop_locked(name, timeout, force).await?;
        self.start_locked(name).await
    }
}

fn signal_init(state: &RuntimeState, sig: Signal) {
    if state.init_alive() {
        let _ = kill(Pid::from_raw(state.init_pid), sig);
    }
}
