//! Raft messages to other replicas over gRPC (`ferry.controller.v1.RaftService`).
//! A replica that cannot be reached is reported Unreachable, so openraft backs
//! off instead of hammering it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::controller::v1::raft_service_client::RaftServiceClient;
use ferry_proto::controller::v1::RaftPayload;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use crate::types::{NodeId, TypeConfig};

/// Hands out connections to peers. One HTTP/2 channel per peer address is
/// kept and shared (a channel multiplexes calls): openraft asks for a new
/// client for every leadership check, and dialing each time made those checks
/// miss their one-heartbeat deadline under load.
#[derive(Clone, Default)]
pub struct Network {
    channels: Arc<Mutex<HashMap<String, RaftServiceClient<Channel>>>>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Conn {
        let client = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node.addr)
            .cloned();
        Conn {
            target,
            addr: node.addr.clone(),
            client,
            cache: self.channels.clone(),
        }
    }
}

pub struct Conn {
    target: NodeId,
    addr: String,
    client: Option<RaftServiceClient<Channel>>,
    cache: Arc<Mutex<HashMap<String, RaftServiceClient<Channel>>>>,
}

/// Connects lazily; a failed connection is dropped so the next call redials.
pub async fn raft_client(addr: &str) -> Result<RaftServiceClient<Channel>, String> {
    let a: ferry_proto::addr::Addr = addr.parse()?;
    let ch = tokio::time::timeout(
        Duration::from_secs(2),
        ferry_proto::addr::connect_controller(&a),
    )
    .await
    .map_err(|_| format!("connecting to {addr} timed out"))?
    .map_err(|e| format!("connecting to {addr}: {e}"))?;
    Ok(ferry_proto::limits::raft_client(ch))
}

type Rpc =
    fn(
        RaftServiceClient<Channel>,
        RaftPayload,
    )
        -> futures::future::BoxFuture<'static, Result<tonic::Response<RaftPayload>, tonic::Status>>;

impl Conn {
    /// Drops a channel that failed, so the next call dials afresh.
    fn forget(&mut self) {
        self.client = None;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.addr);
    }

    async fn call<Req, Resp, E>(
        &mut self,
        req: &Req,
        rpc: Rpc,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if self.client.is_none() {
            let c = raft_client(&self.addr)
                .await
                .map_err(|e| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e))))?;
            self.cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(self.addr.clone(), c.clone());
            self.client = Some(c);
        }
        let client = self.client.clone().ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other("no client")))
        })?;
        let resp = match tokio::time::timeout(timeout, rpc(client, RaftPayload { json })).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                self.forget();
                let e = std::io::Error::other(format!("{}: {}", self.addr, status.message()));
                return Err(if status.code() == tonic::Code::Unavailable {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                });
            }
            Err(_) => {
                self.forget();
                return Err(RPCError::Unreachable(Unreachable::new(
                    &std::io::Error::other(format!("{} timed out", self.addr)),
                )));
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&resp.json)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(
            &rpc,
            |mut c, p| Box::pin(async move { c.append_entries(p).await }),
            option.hard_ttl(),
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(
            &rpc,
            |mut c, p| Box::pin(async move { c.install_snapshot(p).await }),
            option.hard_ttl(),
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(
            &rpc,
            |mut c, p| Box::pin(async move { c.vote(p).await }),
            option.hard_ttl(),
        )
        .await
    }
}
