//! The Ferry node agent: runs VPSes (system containers) on one node.
//!
//! # Layout
//! - [`authz`]: who may call what (mutual TLS), and who may drive a migration.
//! - [`service`]: the gRPC `ferry.agent.v1.AgentService`, a thin layer over [`vps::Agent`].
//! - [`vps`]: the VPS lifecycle, one file per step (create, start, stop, destroy,
//!   set, exec, console, query), start-up adoption of running VPSes, and both
//!   ends of a migration (out, in, recovery, post-copy, images in RAM).
//! - [`runtime`]: the per-VPS monitor process, the clone of init into its
//!   namespaces, the in-VPS filesystem (pivot_root, /dev, masks), capabilities
//!   and seccomp, and entering a VPS for exec.
//! - [`cgroup`]: per-VPS cgroups on v1 and v2 behind one interface.
//! - [`net`]: bridge, persistent netns and veth through rtnetlink.
//! - [`userns`]: an unprivileged VPS's user namespace on the host side (its
//!   bound namespace files, the idmapped view of its template).
//! - [`template`]: safe archive import and the built-in busybox template.
//! - [`criu`]: checkpoint/restore through CRIU's RPC (`criu swrk`), probe and
//!   kernel cache at start, the lazy-pages daemon.
//! - [`cluster`]: joining a controller and heartbeating to it (`--controller`).
//! - [`rcu`]: expedited RCU grace periods while a VPS is frozen.
//! - [`spec`]: validation of wire specs into stored configs.
//! - [`paths`], [`error`].

pub mod authz;
pub mod cgroup;
pub mod cluster;
pub mod criu;
pub mod error;
pub mod net;
pub mod paths;
pub mod rcu;
pub mod runtime;
pub mod service;
pub mod spec;
pub mod template;
pub mod userns;
pub mod vps;
