//! Join tokens: `ferry1.<CA fingerprint>.<secret>`. The fingerprint lets the
//! joiner check the controller before it sends anything; the secret, 32
//! random bytes, proves the joiner was invited. Controllers keep only the
//! secret's SHA-256, in Raft, with its expiry, and take it once.

use sha2::{Digest, Sha256};

const PREFIX: &str = "ferry1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the CA certificate, hex.
    pub ca_fingerprint: String,
    /// Hex.
    pub secret: String,
}

impl JoinToken {
    /// A fresh token for the CA with `ca_fingerprint`.
    pub fn generate(ca_fingerprint: &str) -> Result<JoinToken, String> {
        let mut b = [0u8; 32];
        super::transport::provider()
            .secure_random
            .fill(&mut b)
            .map_err(|e| format!("no randomness: {e:?}"))?;
        Ok(JoinToken {
            ca_fingerprint: ca_fingerprint.to_string(),
            secret: hex::encode(b),
        })
    }

    /// What the controllers keep: the secret's SHA-256, hex.
    pub fn secret_hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}.{}.{}", self.ca_fingerprint, self.secret)
    }
}

impl std::str::FromStr for JoinToken {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || "not a Ferry join token (ferry1.<CA fingerprint>.<secret>)".to_string();
        let mut it = s.trim().split('.');
        let (Some(PREFIX), Some(fp), Some(secret), None) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(bad());
        };
        let hex64 = |x: &str| x.len() == 64 && x.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex64(fp) || !hex64(secret) {
            return Err(bad());
        }
        Ok(JoinToken {
            ca_fingerprint: fp.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_junk_is_refused() {
        let t = JoinToken::generate(&"ab".repeat(32)).unwrap();
        let back: JoinToken = t.to_string().parse().unwrap();
        assert_eq!(back, t);
        assert_ne!(
            t.secret,
            JoinToken::generate(&"ab".repeat(32)).unwrap().secret
        );
        for junk in [
            "",
            "ferry1.x.y",
            "ferry2.aa.bb",
            &format!("ferry1.{}.{}.x", "a".repeat(64), "b".repeat(64)),
        ] {
            assert!(junk.parse::<JoinToken>().is_err(), "{junk}");
        }
    }
}
