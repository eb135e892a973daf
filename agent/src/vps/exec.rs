//! Exec: run a command inside a running VPS through the `enter` helper and
//! stream its stdout, stderr and exit code back.

use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use ferry_proto::agent::v1 as pb;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::Agent;
use crate::error::{AgentError, Result};

pub type ExecStream = Pin<Box<dyn Stream<Item = Result<pb::ExecOutput, tonic::Status>> + Send>>;

impl Agent {
    #[tracing::instrument(skip_all, fields(vps = %req.name))]
    pub async fn exec(&self, req: pb::ExecRequest) -> Result<ExecStream> {
        self.record(&req.name)?;
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(AgentError::invalid("argv", "give a command to run"));
        }
        if !self.status(&req.name).is_running() {
            return Err(AgentError::FailedPrecondition(format!(
                "VPS {} is not running",
                req.name
            )));
        }
        let mut cmd = tokio::process::Command::new(&self.cfg.self_exe);
        cmd.arg("enter").arg(self.paths.vps_run(&req.name));
        for e in &req.env {
            if !e.contains('=') {
                return Err(AgentError::invalid(
                    "env",
                    format!("{e:?} is not KEY=VALUE"),
                ));
            }
            cmd.arg("--env").arg(e);
        }
        cmd.arg("--").args(&req.argv);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| AgentError::io("starting the exec helper", e))?;
        let (tx, rx) = mpsc::channel::<Result<pb::ExecOutput, tonic::Status>>(16);
        let mut stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let timeout = (req.timeout_secs > 0).then(|| Duration::from_secs(req.timeout_secs as u64));
        let data = req.stdin;
        tokio::spawn(async move {
            if let Some(mut w) = stdin.take() {
                let _ = w.write_all(&data).await;
            }
            let out =
                stdout.map(|s| tokio::spawn(pump(s, tx.clone(), pb::exec_output::Item::Stdout)));
            let err =
                stderr.map(|s| tokio::spawn(pump(s, tx.clone(), pb::exec_output::Item::Stderr)));
            let status = match timeout {
                Some(t) => match tokio::time::timeout(t, child.wait()).await {
                    Ok(s) => s.ok(),
                    Err(_) => {
                        let _ = child.kill().await;
                        let _ = tx
                            .send(Err(tonic::Status::deadline_exceeded(format!(
                                "command killed after {t:?}"
                            ))))
                            .await;
                        return;
                    }
                },
                None => child.wait().await.ok(),
            };
            for h in [out, err].into_iter().flatten() {
                let _ = h.await;
            }
            let code = status.and_then(|s| s.code()).unwrap_or(-1);
            let _ = tx
                .send(Ok(pb::ExecOutput {
                    item: Some(pb::exec_output::Item::ExitCode(code)),
                }))
                .await;
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

async fn pump(
    mut r: impl AsyncRead + Unpin,
    tx: mpsc::Sender<Result<pb::ExecOutput, tonic::Status>>,
    wrap: fn(Vec<u8>) -> pb::exec_output::Item,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx
                    .send(Ok(pb::ExecOutput {
                        item: Some(wrap(buf[..n].to_vec())),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}
