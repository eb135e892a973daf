//! The server side of Raft between replicas (`ferry.controller.v1.RaftService`).

use std::sync::Arc;

use ferry_proto::controller::v1 as cpb;
use ferry_proto::controller::v1::raft_service_server::RaftService;
use tonic::{Request, Response, Status};

use crate::host::Controller;
use crate::state::Request as Command;

pub struct RaftServer {
    pub ctl: Arc<Controller>,
}

fn decode<T: serde::de::DeserializeOwned>(p: &cpb::RaftPayload) -> Result<T, Status> {
    serde_json::from_slice(&p.json)
        .map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<cpb::RaftPayload>, Status> {
    serde_json::to_vec(v)
        .map(|json| Response::new(cpb::RaftPayload { json }))
        .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl RaftService for RaftServer {
    async fn append_entries(
        &self,
        req: Request<cpb::RaftPayload>,
    ) -> Result<Response<cpb::RaftPayload>, Status> {
        let m = self.ctl.member().await?;
        encode(&m.raft.append_entries(decode(req.get_ref())?).await)
    }

    async fn vote(
        &self,
        req: Request<cpb::RaftPayload>,
    ) -> Result<Response<cpb::RaftPayload>, Status> {
        let m = self.ctl.member().await?;
        encode(&m.raft.vote(decode(req.get_ref())?).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<cpb::RaftPayload>,
    ) -> Result<Response<cpb::RaftPayload>, Status> {
        let m = self.ctl.member().await?;
        encode(&m.raft.install_snapshot(decode(req.get_ref())?).await)
    }

    async fn propose(
        &self,
        req: Request<cpb::RaftPayload>,
    ) -> Result<Response<cpb::RaftPayload>, Status> {
        let m = self.ctl.member().await?;
        let cmd: Command = decode(req.get_ref())?;
        encode(&m.propose_local(cmd).await)
    }

    async fn read_index(
        &self,
        _: Request<cpb::ReadIndexRequest>,
    ) -> Result<Response<cpb::ReadIndexResponse>, Status> {
        let m = self.ctl.member().await?;
        let index = m.local_read_index().await.map_err(Status::unavailable)?;
        Ok(Response::new(cpb::ReadIndexResponse { index }))
    }

    async fn adopt(
        &self,
        req: Request<cpb::AdoptRequest>,
    ) -> Result<Response<cpb::AdoptResponse>, Status> {
        let r = req.into_inner();
        self.ctl.adopt(r.id, r.addr).await?;
        Ok(Response::new(cpb::AdoptResponse {}))
    }
}
