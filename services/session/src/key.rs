//! The KV key of a conversation: (tenant, user, session) encoded so that any identifier is a
//! valid key and no two triples share one.
//!
//! JetStream KV keys allow only `[-/_=.a-zA-Z0-9]`, and `.` separates subject tokens (which
//! must not be empty). Each part is written as lower-case hex of its UTF-8 bytes behind a
//! one-letter tag (`t…`, `u…`, `s…`), and the parts are joined by `.`: hex never contains `.`,
//! so the split is unambiguous (`("a.b", "c")` and `("a", "b.c")` differ), the tag keeps an
//! empty part a non-empty token, and the key decodes back to its triple. Hex doubles the size
//! of an identifier; ingest caps identifiers at 128 characters, so a key stays well under the
//! subject length NATS accepts.
use std::fmt::Write as _;

/// The session ingest assigns a request that names none.
pub const DEFAULT_SESSION: &str = "default";

/// Who a conversation belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId {
    pub tenant: String,
    pub user: String,
    pub session: String,
}

impl SessionId {
    pub fn new(tenant: &str, user: &str, session: &str) -> Self {
        Self { tenant: tenant.to_owned(), user: user.to_owned(), session: session.to_owned() }
    }

    /// As the pipeline and the API name a conversation: an empty session is ingest's default.
    pub fn resolve(tenant: &str, user: &str, session: &str) -> Self {
        Self::new(tenant, user, if session.is_empty() { DEFAULT_SESSION } else { session })
    }

    /// The KV key (see the module docs).
    pub fn key(&self) -> String {
        let mut key = String::with_capacity(3 + 2 * (self.tenant.len() + self.user.len() + self.session.len()) + 2);
        for (i, (tag, part)) in [('t', &self.tenant), ('u', &self.user), ('s', &self.session)].into_iter().enumerate() {
            if i > 0 {
                key.push('.');
            }
            key.push(tag);
            for b in part.as_bytes() {
                let _ = write!(key, "{b:02x}");
            }
        }
        key
    }

    /// The triple a key was made from; `None` for anything [`SessionId::key`] does not produce.
    pub fn from_key(key: &str) -> Option<Self> {
        let mut parts = key.split('.');
        let mut next = |tag: char| -> Option<String> {
            let hex = parts.next()?.strip_prefix(tag)?;
            if hex.len() % 2 != 0 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return None;
            }
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            String::from_utf8(bytes).ok()
        };
        let id = Self { tenant: next('t')?, user: next('u')?, session: next('s')? };
        parts.next().is_none().then_some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_kv_key(key: &str) -> bool {
        !key.is_empty()
            && !key.starts_with('.')
            && !key.ends_with('.')
            && !key.contains("..")
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
    }

    #[test]
    fn keys_are_valid_and_round_trip_whatever_the_identifiers() {
        let cases = [
            SessionId::new("t0", "alice", "default"),
            SessionId::new("", "", ""),
            SessionId::new("a.b", "c", "d"),
            SessionId::new("a", "b.c", "d"),
            SessionId::new("ten ant", "ü*>✓", "sess/ion=1"),
            SessionId::new("..", "*", ">"),
        ];
        for id in &cases {
            let key = id.key();
            assert!(valid_kv_key(&key), "{key}");
            assert_eq!(SessionId::from_key(&key).as_ref(), Some(id), "{key}");
        }
        assert_eq!(SessionId::new("t0", "alice", "default").key(), "t7430.u616c696365.s64656661756c74");
        assert_eq!(SessionId::new("", "", "").key(), "t.u.s");
    }

    #[test]
    fn different_triples_never_share_a_key() {
        let ids = [
            SessionId::new("a.b", "c", "d"),
            SessionId::new("a", "b.c", "d"),
            SessionId::new("ab", "c", "d"),
            SessionId::new("a", "bc", "d"),
            SessionId::new("a", "b", "cd"),
            SessionId::new("a", "", "bcd"),
        ];
        let mut keys: Vec<String> = ids.iter().map(SessionId::key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), ids.len());
    }

    #[test]
    fn foreign_keys_do_not_decode() {
        for key in ["", "t.u", "t.u.s.x", "x.u.s", "t0.u.s", "tzz.u.s", "tff.u.s", "t.s.u"] {
            assert_eq!(SessionId::from_key(key), None, "{key}");
        }
    }
}
