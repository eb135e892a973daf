//! Ferry's wire contract.
//!
//! # Layout
//! - `proto/ferry/agent/v1/agent.proto`: `ferry.agent.v1.AgentService`, the node agent
//!   (templates, VPS lifecycle, exec, console).
//! - `proto/ferry/controller/v1/controller.proto`: `ferry.controller.v1.ControllerService`,
//!   the cluster API.
//! - `proto/ferry/controller/v1/raft.proto`: Raft between controller replicas.
//!
//! - [`names`]: naming rules both sides enforce.
//! - [`ids`]: user-namespace id ranges of unprivileged VPSes.
//! - [`modes`]: migration modes by name.
//! - [`report`]: a VPS's status words in a node's heartbeat.
//! - [`tls`]: mutual TLS: the cluster CA and identities, the TLS transport,
//!   per-call authorization.
//! - [`limits`]: gRPC message size limits and clients built with them.
//! - [`retry`]: which controller calls may be sent again, and request ids.
//! - [`addr`]: service addresses (`HOST:PORT`, `unix:/path`) and connecting to them.
//!
//! Generated code is re-exported per package: [`agent::v1`], [`controller::v1`].

pub mod addr;
pub mod ids;
pub mod limits;
pub mod modes;
pub mod names;
pub mod report;
pub mod retry;
pub mod tls;

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("ferry.agent.v1");
    }
}

pub mod controller {
    pub mod v1 {
        tonic::include_proto!("ferry.controller.v1");
    }
}
