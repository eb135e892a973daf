//! The event stream: what the replicated event log holds, then (following)
//! new events as this replica applies them. Every replica has the same log,
//! so any one can serve it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::controller::v1 as cpb;
use futures::Stream;

use crate::error::ControllerError;
use crate::host::Controller;

pub type EventStream = Pin<Box<dyn Stream<Item = Result<cpb::Event, tonic::Status>> + Send>>;

fn since(ctl_sm: &crate::store::StateMachine, after: u64) -> Vec<cpb::Event> {
    ctl_sm.read(|a| {
        a.state
            .events
            .items
            .iter()
            .filter(|e| e.seq > after)
            .map(|e| cpb::Event {
                seq: e.seq,
                ts_unix_ms: e.ts_ms,
                kind: e.kind.clone(),
                subject: e.subject.clone(),
                message: e.message.clone(),
            })
            .collect()
    })
}

pub async fn watch(
    ctl: Arc<Controller>,
    r: cpb::WatchEventsRequest,
) -> Result<EventStream, ControllerError> {
    let m = ctl.member().await?;
    m.read_barrier().await?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut after = r.after_seq;
        // Applied entries move the metrics; wake on them rather than poll hard.
        let mut metrics = m.raft.metrics();
        loop {
            for e in since(&m.sm, after) {
                after = e.seq;
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            if !r.follow {
                return;
            }
            tokio::select! {
                _ = metrics.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tx.closed() => return,
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}
