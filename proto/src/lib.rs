//! Ferry's wire contract.
//!
//! # Layout
//! - `proto/ferry/agent/v1/agent.proto`: `ferry.agent.v1.AgentService`, the node agent
//!   (templates, VPS lifecycle, exec, console).
//!
//! - [`addr`]: service addresses (`HOST:PORT`, `unix:/path`) and connecting to them.
//!
//! Generated code is re-exported per package: [`agent::v1`].

pub mod addr;

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("ferry.agent.v1");
    }
}
