//! Ferry's migration engine.
//!
//! # Layout
//! - [`tree`]: byte-exact directory sync: manifest, plan (what changed), send,
//!   apply (every path resolved beneath the root, no symlink followed:
//!   [`tree::beneath`]), digest (verify mode). Used for the rootfs passes and to carry CRIU
//!   images, over agent-to-agent gRPC streams or into an archive.
//! - [`phases`]: the live-migration engine run by the source agent, one file
//!   per phase, with the single decision point in [`phases::commit`].
//! - [`archive`]: the checkpoint archive file (magic, version, metadata,
//!   compressed trees, checksum).
//! - [`failpoint`]: fault injection for tests (`FERRY_FAILPOINT`).

pub mod archive;
pub mod failpoint;
pub mod phases;
pub mod tree;
