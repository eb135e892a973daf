//! Console: the tail of init's output.

use super::Agent;
use crate::error::Result;
use crate::runtime::CONSOLE_FILE;

pub const DEFAULT_TAIL: usize = 64 * 1024;

impl Agent {
    pub fn console(&self, name: &str, tail: usize) -> Result<Vec<u8>> {
        self.record(name)?;
        let tail = if tail == 0 {
            DEFAULT_TAIL
        } else {
            tail.min(4 << 20)
        };
        Ok(crate::runtime::console::tail(
            &self.paths.vps_run(name).join(CONSOLE_FILE),
            tail,
        ))
    }
}
