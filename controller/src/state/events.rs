//! A bounded log of what happened in the cluster, for `ferryctl events`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

pub const MAX_EVENTS: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub ts_ms: i64,
    /// "node", "vps", "member".
    pub kind: String,
    pub subject: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventLog {
    pub next_seq: u64,
    pub items: VecDeque<Event>,
}

impl EventLog {
    pub fn push(&mut self, ts_ms: i64, kind: &str, subject: &str, message: impl Into<String>) {
        self.next_seq += 1;
        self.items.push_back(Event {
            seq: self.next_seq,
            ts_ms,
            kind: kind.into(),
            subject: subject.into(),
            message: message.into(),
        });
        while self.items.len() > MAX_EVENTS {
            self.items.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stays_bounded_with_rising_sequence() {
        let mut l = super::EventLog::default();
        for i in 0..1500 {
            l.push(i, "vps", "x", "m");
        }
        assert_eq!(l.items.len(), super::MAX_EVENTS);
        assert_eq!(l.items.front().unwrap().seq, 501);
        assert_eq!(l.items.back().unwrap().seq, 1500);
    }
}
