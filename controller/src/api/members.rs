//! Adding and removing controller replicas. Runs on the leader (a follower
//! passes the call on): reserve a fresh id through Raft, hand it to the new
//! replica, add it as a learner and wait for it to catch up, then promote it to
//! voter (joint consensus).

use std::collections::BTreeSet;

use ferry_proto::controller::v1 as cpb;
use ferry_proto::controller::v1::controller_service_client::ControllerServiceClient;
use openraft::{BasicNode, ChangeMembers};

use super::{applied, now_ms};
use crate::error::ControllerError;
use crate::host::Controller;
use crate::member::Member;
use crate::network::raft_client;
use crate::state::members::MemberCmd;
use crate::state::{Request, Response};

/// The leader's API client, when this replica is not the leader.
pub(crate) async fn leader_client(
    m: &Member,
) -> Result<Option<ControllerServiceClient<tonic::transport::Channel>>, ControllerError> {
    let st = m.status();
    if st.leader_id == m.id {
        return Ok(None);
    }
    if st.leader_addr.is_empty() {
        return Err(ControllerError::Unavailable("no leader elected yet".into()));
    }
    let a: ferry_proto::addr::Addr = st
        .leader_addr
        .parse()
        .map_err(ControllerError::Unavailable)?;
    let ch = ferry_proto::addr::connect_controller(&a)
        .await
        .map_err(|e| ControllerError::Unavailable(format!("leader {a}: {e}")))?;
    Ok(Some(ferry_proto::limits::controller_client(ch)))
}

pub(crate) fn from_status(s: tonic::Status) -> ControllerError {
    ControllerError::Unavailable(format!("leader: {}", s.message()))
}

pub async fn add(
    ctl: &Controller,
    req: cpb::AddMemberRequest,
) -> Result<cpb::ClusterStatusResponse, ControllerError> {
    req.addr
        .parse::<ferry_proto::addr::Addr>()
        .map_err(|e| ControllerError::invalid("addr", e))?;
    let m = ctl.member().await?;
    if let Some(mut leader) = leader_client(&m).await? {
        return leader
            .add_member(req)
            .await
            .map(|r| r.into_inner())
            .map_err(from_status);
    }
    if m.status().members.iter().any(|x| x.addr == req.addr) {
        return Err(ControllerError::Rejected {
            code: crate::state::RejectCode::AlreadyExists,
            message: format!("{} is already a member", req.addr),
        });
    }
    // Reach the new replica before writing anything.
    let mut joiner = raft_client(&req.addr)
        .await
        .map_err(|e| ControllerError::invalid("addr", e))?;
    let id = match applied(
        m.propose(Request::Member(MemberCmd::AllocateId {
            addr: req.addr.clone(),
            now_ms: now_ms(),
        }))
        .await?,
    )? {
        Response::MemberId(id) => id,
        r => return Err(ControllerError::Raft(format!("unexpected {r:?}"))),
    };
    joiner
        .adopt(cpb::AdoptRequest {
            id,
            addr: req.addr.clone(),
        })
        .await
        .map_err(|s| {
            ControllerError::Unavailable(format!("{} refused to join: {}", req.addr, s.message()))
        })?;
    m.raft
        .add_learner(id, BasicNode::new(&req.addr), true)
        .await
        .map_err(|e| ControllerError::Raft(format!("adding learner {id}: {e}")))?;
    m.raft
        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
        .await
        .map_err(|e| ControllerError::Raft(format!("promoting {id} to voter: {e}")))?;
    tracing::info!(member = id, addr = %req.addr, "member added");
    Ok(m.status())
}

pub async fn remove(
    ctl: &Controller,
    req: cpb::RemoveMemberRequest,
) -> Result<cpb::ClusterStatusResponse, ControllerError> {
    let m = ctl.member().await?;
    if let Some(mut leader) = leader_client(&m).await? {
        return leader
            .remove_member(req)
            .await
            .map(|r| r.into_inner())
            .map_err(from_status);
    }
    let st = m.status();
    if !st.members.iter().any(|x| x.id == req.id) {
        return Err(ControllerError::Rejected {
            code: crate::state::RejectCode::NotFound,
            message: format!("member {} not found", req.id),
        });
    }
    if st.members.iter().filter(|x| x.role == "voter").count() == 1
        && st
            .members
            .iter()
            .any(|x| x.id == req.id && x.role == "voter")
    {
        return Err(ControllerError::Rejected {
            code: crate::state::RejectCode::FailedPrecondition,
            message: "cannot remove the last voter".into(),
        });
    }
    m.raft
        .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([req.id])), false)
        .await
        .map_err(|e| ControllerError::Raft(format!("removing member {}: {e}", req.id)))?;
    Ok(m.status())
}
