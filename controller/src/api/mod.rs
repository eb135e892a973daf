//! `ferry.controller.v1.ControllerService`: request checks, then a Raft write
//! ([`Member::propose`]) or a linearizable read ([`Member::read_barrier`] then
//! the local state). One module per concept; this file only routes.

mod drain;
mod events;
pub(crate) mod members;
mod migrate;
mod nodes;
mod templates;
pub mod trust;
mod vps;

use std::sync::Arc;

use ferry_proto::controller::v1 as cpb;
use ferry_proto::controller::v1::controller_service_server::ControllerService;
use tonic::{Request, Response, Status};

use crate::error::ControllerError;
use crate::host::Controller;
use crate::state::Response as Applied;

pub struct Api {
    pub ctl: Arc<Controller>,
}

type R<T> = Result<Response<T>, Status>;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The request id a client's write carries ([`ferry_proto::retry::REQUEST_ID`]).
pub(crate) fn request_id<T>(req: &Request<T>) -> Result<Option<String>, ControllerError> {
    let Some(v) = req.metadata().get(ferry_proto::retry::REQUEST_ID) else {
        return Ok(None);
    };
    let id = v
        .to_str()
        .map_err(|_| ControllerError::invalid("ferry-request-id", "not text"))?;
    crate::state::requests::check_id(id)
        .map_err(|e| ControllerError::invalid("ferry-request-id", e))?;
    Ok(Some(id.to_string()))
}

/// A client's write: if a try with the same request id was applied, its
/// answer; else `check` against linearizable state, then the write (applied
/// once per id however often it is sent). The lookup and the check read the
/// same state, so a repeat never fails a check its first try passed.
pub(crate) async fn write(
    m: &crate::member::Member,
    id: Option<String>,
    check: impl FnOnce(&crate::state::ClusterState) -> Result<(), ControllerError>,
    req: crate::state::Request,
) -> Result<Applied, ControllerError> {
    m.read_barrier().await?;
    let prior = m.sm.read(
        |a| match id.as_deref().and_then(|i| a.state.requests.get(i)) {
            Some(r) => Ok(Some(r.clone())),
            None => check(&a.state).map(|()| None),
        },
    )?;
    if let Some(r) = prior {
        return applied(r);
    }
    let req = match id {
        Some(id) => crate::state::Request::Once {
            id,
            req: Box::new(req),
        },
        None => req,
    };
    applied(m.propose(req).await?)
}

/// Turns a rejected command into its error.
pub(crate) fn applied(r: Applied) -> Result<Applied, ControllerError> {
    match r {
        Applied::Rejected { code, message } => Err(ControllerError::Rejected { code, message }),
        r => Ok(r),
    }
}

#[tonic::async_trait]
impl ControllerService for Api {
    async fn cluster_status(
        &self,
        _: Request<cpb::ClusterStatusRequest>,
    ) -> R<cpb::ClusterStatusResponse> {
        let m = self.ctl.member().await?;
        let mut st = m.status();
        st.drains = m.sm.read(|a| {
            a.state
                .drains
                .values()
                .filter(|d| d.state == crate::state::drain::DrainState::Running)
                .map(|d| drain::to_pb(&a.state, d, Some(&self.ctl)))
                .collect()
        });
        Ok(Response::new(st))
    }
    async fn add_member(
        &self,
        req: Request<cpb::AddMemberRequest>,
    ) -> R<cpb::ClusterStatusResponse> {
        Ok(Response::new(
            members::add(&self.ctl, req.into_inner()).await?,
        ))
    }
    async fn remove_member(
        &self,
        req: Request<cpb::RemoveMemberRequest>,
    ) -> R<cpb::ClusterStatusResponse> {
        Ok(Response::new(
            members::remove(&self.ctl, req.into_inner()).await?,
        ))
    }
    async fn register_node(&self, req: Request<cpb::RegisterNodeRequest>) -> R<cpb::Node> {
        trust::node_speaks_for(req.extensions().get(), &req.get_ref().name)?;
        Ok(Response::new(
            nodes::register(&self.ctl, req.into_inner()).await?,
        ))
    }
    async fn list_nodes(&self, _: Request<cpb::ListNodesRequest>) -> R<cpb::ListNodesResponse> {
        Ok(Response::new(nodes::list(&self.ctl).await?))
    }
    async fn get_node(&self, req: Request<cpb::GetNodeRequest>) -> R<cpb::Node> {
        Ok(Response::new(
            nodes::get(&self.ctl, &req.into_inner().name).await?,
        ))
    }
    async fn cordon_node(&self, req: Request<cpb::CordonNodeRequest>) -> R<cpb::Node> {
        let id = request_id(&req)?;
        Ok(Response::new(
            nodes::cordon(&self.ctl, id, req.into_inner()).await?,
        ))
    }
    async fn drain_node(&self, req: Request<cpb::DrainNodeRequest>) -> R<cpb::DrainNodeResponse> {
        Ok(Response::new(
            drain::drain(&self.ctl, req.into_inner()).await?,
        ))
    }
    async fn restore_node(
        &self,
        req: Request<cpb::RestoreNodeRequest>,
    ) -> R<cpb::DrainNodeResponse> {
        Ok(Response::new(
            drain::restore(&self.ctl, req.into_inner()).await?,
        ))
    }
    async fn get_drain(&self, req: Request<cpb::GetDrainRequest>) -> R<cpb::Drain> {
        Ok(Response::new(
            drain::get(&self.ctl, &req.into_inner().node).await?,
        ))
    }
    async fn cancel_drain(&self, req: Request<cpb::CancelDrainRequest>) -> R<cpb::Drain> {
        Ok(Response::new(
            drain::cancel(&self.ctl, &req.into_inner().node).await?,
        ))
    }
    async fn heartbeat(&self, req: Request<cpb::HeartbeatRequest>) -> R<cpb::HeartbeatResponse> {
        trust::node_speaks_for(req.extensions().get(), &req.get_ref().node)?;
        nodes::heartbeat(&self.ctl, req.into_inner()).await?;
        let revoked = self
            .ctl
            .member()
            .await?
            .sm
            .read(|a| a.state.security.revoked.iter().cloned().collect());
        Ok(Response::new(cpb::HeartbeatResponse { revoked }))
    }
    async fn start_vps(&self, req: Request<cpb::SetDesiredRequest>) -> R<cpb::ClusterVps> {
        let id = request_id(&req)?;
        Ok(Response::new(
            vps::set_desired(
                &self.ctl,
                id,
                &req.into_inner().name,
                crate::state::Desired::Running,
            )
            .await?,
        ))
    }
    async fn stop_vps(&self, req: Request<cpb::SetDesiredRequest>) -> R<cpb::ClusterVps> {
        let id = request_id(&req)?;
        Ok(Response::new(
            vps::set_desired(
                &self.ctl,
                id,
                &req.into_inner().name,
                crate::state::Desired::Stopped,
            )
            .await?,
        ))
    }
    async fn create_vps(&self, req: Request<cpb::CreateVpsRequest>) -> R<cpb::ClusterVps> {
        let id = request_id(&req)?;
        Ok(Response::new(
            vps::create(&self.ctl, id, req.into_inner()).await?,
        ))
    }
    async fn get_vps(&self, req: Request<cpb::GetVpsRequest>) -> R<cpb::ClusterVps> {
        Ok(Response::new(
            vps::get(&self.ctl, &req.into_inner().name).await?,
        ))
    }
    async fn list_vps(&self, req: Request<cpb::ListVpsRequest>) -> R<cpb::ListVpsResponse> {
        Ok(Response::new(vps::list(&self.ctl, req.into_inner()).await?))
    }
    async fn update_vps(&self, req: Request<cpb::UpdateVpsRequest>) -> R<cpb::ClusterVps> {
        let id = request_id(&req)?;
        Ok(Response::new(
            vps::update(&self.ctl, id, req.into_inner()).await?,
        ))
    }
    type WatchEventsStream = events::EventStream;
    type MigrateVpsStream = migrate::MigrationStream;

    async fn migrate_vps(&self, req: Request<cpb::MigrateVpsRequest>) -> R<Self::MigrateVpsStream> {
        Ok(Response::new(
            migrate::migrate(&self.ctl, req.into_inner()).await?,
        ))
    }
    async fn decide_migration(
        &self,
        req: Request<cpb::DecideMigrationRequest>,
    ) -> R<cpb::DecideMigrationResponse> {
        let caller = req
            .extensions()
            .get::<ferry_proto::tls::Identity>()
            .cloned();
        trust::node_in_migration(&self.ctl, caller.as_ref(), req.get_ref()).await?;
        Ok(Response::new(
            migrate::decide(&self.ctl, req.into_inner()).await?,
        ))
    }

    async fn finish_migration(
        &self,
        req: Request<cpb::FinishMigrationRequest>,
    ) -> R<cpb::FinishMigrationResponse> {
        let caller = req
            .extensions()
            .get::<ferry_proto::tls::Identity>()
            .cloned();
        trust::node_in_move(
            &self.ctl,
            caller.as_ref(),
            &req.get_ref().name,
            &req.get_ref().migration_id,
        )
        .await?;
        Ok(Response::new(
            migrate::finish(&self.ctl, req.into_inner()).await?,
        ))
    }

    type WatchMigrationStream = migrate::WatchStream;

    async fn watch_migration(
        &self,
        req: Request<cpb::WatchMigrationRequest>,
    ) -> R<Self::WatchMigrationStream> {
        Ok(Response::new(
            migrate::watch(self.ctl.clone(), req.into_inner()).await?,
        ))
    }

    async fn watch_events(
        &self,
        req: Request<cpb::WatchEventsRequest>,
    ) -> R<Self::WatchEventsStream> {
        Ok(Response::new(
            events::watch(self.ctl.clone(), req.into_inner()).await?,
        ))
    }
    async fn delete_vps(&self, req: Request<cpb::DeleteVpsRequest>) -> R<cpb::DeleteVpsResponse> {
        let id = request_id(&req)?;
        let r = req.into_inner();
        vps::delete(&self.ctl, id, &r.name, r.force).await?;
        Ok(Response::new(cpb::DeleteVpsResponse {}))
    }
    async fn register_template(
        &self,
        req: Request<cpb::RegisterTemplateRequest>,
    ) -> R<cpb::ClusterTemplate> {
        Ok(Response::new(
            templates::register(&self.ctl, req.into_inner()).await?,
        ))
    }
    async fn list_templates(
        &self,
        _: Request<cpb::ListClusterTemplatesRequest>,
    ) -> R<cpb::ListClusterTemplatesResponse> {
        Ok(Response::new(templates::list(&self.ctl).await?))
    }
    async fn delete_template(
        &self,
        req: Request<cpb::DeleteClusterTemplateRequest>,
    ) -> R<cpb::DeleteClusterTemplateResponse> {
        Ok(Response::new(
            templates::delete(&self.ctl, &req.into_inner().name).await?,
        ))
    }
    async fn create_join_token(
        &self,
        req: Request<cpb::CreateJoinTokenRequest>,
    ) -> R<cpb::CreateJoinTokenResponse> {
        Ok(Response::new(
            trust::create_token(&self.ctl, req.into_inner()).await?,
        ))
    }
    async fn join_node(&self, req: Request<cpb::JoinRequest>) -> R<cpb::JoinResponse> {
        Ok(Response::new(
            trust::join_node(&self.ctl, req.into_inner()).await?,
        ))
    }
    async fn join_controller(&self, req: Request<cpb::JoinRequest>) -> R<cpb::JoinResponse> {
        Ok(Response::new(
            trust::join_controller(&self.ctl, req.into_inner()).await?,
        ))
    }
    async fn renew_certificate(&self, req: Request<cpb::JoinRequest>) -> R<cpb::JoinResponse> {
        let caller = req
            .extensions()
            .get::<ferry_proto::tls::Identity>()
            .cloned();
        Ok(Response::new(
            trust::renew(&self.ctl, caller.as_ref(), req.into_inner()).await?,
        ))
    }
    async fn add_user(&self, req: Request<cpb::AddUserRequest>) -> R<cpb::AddUserResponse> {
        Ok(Response::new(
            trust::add_user(&self.ctl, req.into_inner()).await?,
        ))
    }
    async fn revoke_user(
        &self,
        req: Request<cpb::RevokeUserRequest>,
    ) -> R<cpb::RevokeUserResponse> {
        Ok(Response::new(
            trust::revoke_user(&self.ctl, req.into_inner()).await?,
        ))
    }
}
