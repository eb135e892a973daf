//! gRPC message size limits, one place for every server and client: a peer
//! cannot make a daemon buffer more than these for one message, and no daemon
//! sends more than its peer takes.

/// `AgentService`: a migration chunk (a batch of 1 MiB blocks), an archive
/// chunk, a listing.
pub const AGENT_MESSAGE: usize = 16 << 20;
/// `ControllerService`: specs, listings, events.
pub const CONTROLLER_MESSAGE: usize = 16 << 20;
/// `RaftService`: a snapshot is sent as one message.
pub const RAFT_MESSAGE: usize = 256 << 20;

use tonic::transport::Channel;

use crate::agent::v1::agent_service_client::AgentServiceClient;
use crate::controller::v1::controller_service_client::ControllerServiceClient;
use crate::controller::v1::raft_service_client::RaftServiceClient;

/// An agent client with the agent's limits.
pub fn agent_client(ch: Channel) -> AgentServiceClient<Channel> {
    AgentServiceClient::new(ch)
        .max_decoding_message_size(AGENT_MESSAGE)
        .max_encoding_message_size(AGENT_MESSAGE)
}

/// A controller client with the controller's limits, over a channel or any
/// other transport (ferryctl's, which fails over between replicas).
pub fn controller_client<T>(ch: T) -> ControllerServiceClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    ControllerServiceClient::new(ch)
        .max_decoding_message_size(CONTROLLER_MESSAGE)
        .max_encoding_message_size(CONTROLLER_MESSAGE)
}

/// A Raft client with Raft's limits.
pub fn raft_client(ch: Channel) -> RaftServiceClient<Channel> {
    RaftServiceClient::new(ch)
        .max_decoding_message_size(RAFT_MESSAGE)
        .max_encoding_message_size(RAFT_MESSAGE)
}
