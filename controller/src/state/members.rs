//! Controller replicas: ids handed out once, never again.

use serde::{Deserialize, Serialize};

use super::{ClusterState, Response};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Members {
    /// The next id to hand out. The bootstrap replica is 1.
    pub next_id: u64,
}

impl Default for Members {
    fn default() -> Self {
        Self { next_id: 2 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum MemberCmd {
    /// Reserve a fresh id for a replica about to join at `addr`.
    AllocateId { addr: String, now_ms: i64 },
}

impl ClusterState {
    pub(super) fn apply_member(&mut self, c: MemberCmd) -> Response {
        match c {
            MemberCmd::AllocateId { addr, now_ms } => {
                let id = self.members.next_id;
                self.members.next_id += 1;
                self.events.push(
                    now_ms,
                    "member",
                    &id.to_string(),
                    format!("id {id} reserved for {addr}"),
                );
                Response::MemberId(id)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_never_reused() {
        let mut s = ClusterState::default();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            match s.apply_member(MemberCmd::AllocateId {
                addr: "a:1".into(),
                now_ms: 0,
            }) {
                Response::MemberId(id) => assert!(id >= 2 && seen.insert(id)),
                r => panic!("{r:?}"),
            }
        }
    }
}
