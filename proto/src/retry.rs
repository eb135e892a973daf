//! Which controller calls a client may send again after it lost the answer,
//! and the request id that makes a write safe to send again.
//!
//! A write carrying [`REQUEST_ID`] is applied once: the controller answers a
//! repeat with the first try's result. Reads are always safe to repeat;
//! other writes only when they never reached a controller.

/// The gRPC metadata key of a write's request id: 1 to 64 letters, digits,
/// `-` or `_`, unique per write (ferryctl sends 128 random bits in hex).
pub const REQUEST_ID: &str = "ferry-request-id";

/// Set (to "1") on an `Unavailable` answer from a controller that did
/// nothing with the call (it is no member of a cluster yet): any call may go
/// to another replica then, even one that is never sent twice.
pub const NOT_APPLIED: &str = "ferry-not-applied";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A read: send it again anywhere.
    Always,
    /// A write the controller applies once per request id.
    WithId,
    /// A write that may have taken effect: never sent again once sent.
    Never,
}

/// What a client may do with a `ferry.controller.v1.ControllerService`
/// call, by its HTTP/2 path (`/ferry.controller.v1.ControllerService/GetVps`).
pub fn controller_call(path: &str) -> Retry {
    let Some(method) = path.strip_prefix("/ferry.controller.v1.ControllerService/") else {
        return Retry::Never;
    };
    match method {
        "ClusterStatus" | "ListNodes" | "GetNode" | "GetDrain" | "GetVps" | "ListVps"
        | "WatchEvents" | "WatchMigration" => Retry::Always,
        "CreateVps" | "DeleteVps" | "StartVps" | "StopVps" | "UpdateVps" | "CordonNode" => {
            Retry::WithId
        }
        _ => Retry::Never,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_calls() {
        let p = |m: &str| format!("/ferry.controller.v1.ControllerService/{m}");
        assert_eq!(controller_call(&p("ListVps")), Retry::Always);
        assert_eq!(controller_call(&p("CreateVps")), Retry::WithId);
        assert_eq!(controller_call(&p("MigrateVps")), Retry::Never);
        assert_eq!(controller_call(&p("Nope")), Retry::Never);
        assert_eq!(
            controller_call("/ferry.agent.v1.AgentService/ListVps"),
            Retry::Never
        );
    }
}
