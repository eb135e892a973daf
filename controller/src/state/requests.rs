//! Writes that carry a client's request id ([`super::Request::Once`]): the
//! first one applies, any later one with the same id answers the first's
//! result and changes nothing. A client whose replica died before it
//! answered retries on another replica with the same id and learns what
//! happened, instead of a spurious "already exists" (or a second copy).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::Response;

/// How many answered ids are kept: a client retries within seconds, and
/// this many writes take far longer than that even at full speed.
pub const KEPT: usize = 4096;

/// The longest request id taken (ferryctl sends 32 hex digits).
pub const MAX_ID_LEN: usize = 64;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RequestLog {
    answers: BTreeMap<String, Response>,
    /// Ids oldest first, to forget the oldest.
    order: VecDeque<String>,
}

impl RequestLog {
    /// The answer the write with this id got, if it was applied.
    pub fn get(&self, id: &str) -> Option<&Response> {
        self.answers.get(id)
    }

    pub fn record(&mut self, id: String, r: Response) {
        if self.answers.contains_key(&id) {
            return;
        }
        self.order.push_back(id.clone());
        self.answers.insert(id, r);
        while self.order.len() > KEPT {
            if let Some(old) = self.order.pop_front() {
                self.answers.remove(&old);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Checks a request id from the wire: 1 to [`MAX_ID_LEN`] letters, digits,
/// `-` or `_`.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("1 to {MAX_ID_LEN} characters"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("only letters, digits, '-' and '_'".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_answers() {
        let mut l = RequestLog::default();
        for i in 0..KEPT + 10 {
            l.record(format!("r{i}"), Response::Ok);
        }
        assert_eq!(l.len(), KEPT);
        assert!(l.get("r0").is_none());
        assert!(l.get("r9").is_none());
        assert_eq!(l.get("r10"), Some(&Response::Ok));
        assert_eq!(l.get(&format!("r{}", KEPT + 9)), Some(&Response::Ok));
    }

    #[test]
    fn first_answer_stays() {
        let mut l = RequestLog::default();
        l.record("a".into(), Response::Ok);
        l.record("a".into(), Response::Revoked(3));
        assert_eq!(l.get("a"), Some(&Response::Ok));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("0123456789abcdef0123456789abcdef").is_ok());
        assert!(check_id("").is_err());
        assert!(check_id(&"a".repeat(MAX_ID_LEN + 1)).is_err());
        assert!(check_id("a/b").is_err());
        assert!(check_id("a b").is_err());
    }
}
