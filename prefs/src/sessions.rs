//! Rater sessions: rater ids the service signs, so that a caller cannot
//! make them up.
//!
//! The per-rater limits (`limits.rs`) only mean something if a rater id
//! cannot be invented at will: each new id would come with a fresh quota.
//! So the service issues them ([`Sessions::start`], under a rate limit over
//! all callers) as a random id and an HMAC-SHA256 tag over it with the
//! service's key, and every GetPair and comparison must carry one that
//! verifies ([`Sessions::verify`]). Nothing is stored per session: the key
//! is the whole state. A key from `rater_key_file` keeps sessions valid
//! across restarts and replicas; a key drawn at start-up ends them with the
//! process (the page then starts a new one).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Error;

/// Bytes of the random part of a rater id.
const ID_BYTES: usize = 12;
/// Bytes of the tag kept in a rater id (of HMAC-SHA256's 32).
const TAG_BYTES: usize = 16;
/// What every rater id starts with.
const PREFIX: &str = "r1.";

/// Issues and checks rater ids.
pub(crate) struct Sessions {
    key: Vec<u8>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.write_str("Sessions(..)")
    }
}

impl Sessions {
    /// Sessions signed with `key` (at least 16 bytes).
    pub(crate) fn new(key: Vec<u8>) -> Result<Self, String> {
        if key.len() < 16 {
            return Err(format!(
                "the rater key has {} bytes; it needs at least 16",
                key.len()
            ));
        }
        Ok(Self { key })
    }

    /// Sessions with a key drawn now: they end with the process.
    pub(crate) fn ephemeral() -> Self {
        Self {
            key: rand::random::<[u8; 32]>().to_vec(),
        }
    }

    fn tag(&self, id: &str) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(id.as_bytes());
        mac
    }

    /// A new rater id.
    pub(crate) fn start(&self) -> String {
        let id = hex::encode(rand::random::<[u8; ID_BYTES]>());
        let tag = self.tag(&id).finalize().into_bytes();
        format!("{PREFIX}{id}.{}", hex::encode(&tag[..TAG_BYTES]))
    }

    /// Passes a rater id this service issued; UNAUTHENTICATED naming
    /// `field` otherwise.
    pub(crate) fn verify(&self, field: &str, rater_id: &str) -> Result<(), Error> {
        let refused = || Error::UnknownRater {
            field: field.to_owned(),
        };
        let (id, tag) = rater_id
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('.'))
            .ok_or_else(refused)?;
        let tag = hex::decode(tag).map_err(|_| refused())?;
        if id.len() != 2 * ID_BYTES || tag.len() != TAG_BYTES {
            return Err(refused());
        }
        // Compared in constant time.
        self.tag(id)
            .verify_truncated_left(&tag)
            .map_err(|_| refused())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ids_signed_with_the_key_pass() {
        let sessions = Sessions::new(b"a key of sixteen bytes or more".to_vec()).unwrap();
        let id = sessions.start();
        assert!(id.len() <= 128, "{id}");
        sessions.verify("rater_id", &id).unwrap();
        assert_ne!(sessions.start(), id, "each session is new");

        // Made up, tampered with, or signed by another key.
        let mut tampered = id.clone().into_bytes();
        let at = PREFIX.len();
        tampered[at] = if tampered[at] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap();
        let other = Sessions::ephemeral().start();
        for bad in ["rater-1", "", "r1.", "r1.abc.def", &tampered, &other] {
            let err = sessions.verify("comparisons[0].rater_id", bad).unwrap_err();
            assert!(
                matches!(&err, Error::UnknownRater { field } if field == "comparisons[0].rater_id"),
                "{bad:?}: {err:?}"
            );
        }
        assert!(Sessions::new(b"short".to_vec()).is_err());
    }
}
