//! API keys: `Authorization: Bearer <key>` on every ingest API (HTTP, OpenAI, WebSocket, gRPC
//! metadata), checked against keys configured as SHA-256 digests, each naming its tenant. The
//! key's tenant is the request's tenant (`X-Tenant` and a submit's `tenant` are then ignored).
//! With no keys configured every request is accepted and `X-Tenant` names the tenant, as on a
//! laptop; the service logs which mode it runs in.
//!
//! Keys are given as lines (or comma-separated entries) `<sha256 hex of the key> <tenant>` in
//! `--api-keys-file` and/or `--api-keys` (`MILLRACE_API_KEYS`); `#` starts a comment. The
//! digest of a key: `printf %s "$KEY" | sha256sum`. Only digests are held, so a leaked
//! configuration does not leak keys.
use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// The tenant a request's key names, put into its extensions by the authenticating layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTenant(pub String);

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("API key entry {entry:?}: expected `<64 hex digits of sha256> <tenant>`")]
    BadEntry { entry: String },
}

/// The configured keys: SHA-256 digest → tenant. Empty means keys are off.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    tenants: HashMap<[u8; 32], String>,
}

impl ApiKeys {
    /// The keys of `file` (if given) and of `inline` entries.
    pub fn load(file: Option<&Path>, inline: &str) -> Result<Self, KeysError> {
        let mut text = inline.replace(',', "\n");
        if let Some(path) = file {
            let read = std::fs::read_to_string(path)
                .map_err(|source| KeysError::Read { path: path.display().to_string(), source })?;
            text.push('\n');
            text.push_str(&read);
        }
        Self::parse(&text)
    }

    fn parse(text: &str) -> Result<Self, KeysError> {
        let mut tenants = HashMap::new();
        for line in text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()) {
            let bad = || KeysError::BadEntry { entry: line.to_owned() };
            let (digest, tenant) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
            let digest: [u8; 32] = hex::decode(digest).ok().and_then(|d| d.try_into().ok()).ok_or_else(bad)?;
            let tenant = tenant.trim();
            if tenant.is_empty() || tenant.contains(char::is_whitespace) {
                return Err(bad());
            }
            tenants.insert(digest, tenant.to_owned());
        }
        Ok(Self { tenants })
    }

    pub fn enabled(&self) -> bool {
        !self.tenants.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// The tenant of a request whose `Authorization` value is `authorization`: `None` when keys
    /// are off; refused when they are on and the key is missing or unknown.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Option<KeyTenant>, ApiError> {
        if !self.enabled() {
            return Ok(None);
        }
        let key = authorization
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .ok_or(ApiError::MissingApiKey)?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.tenants.get(&digest).map(|t| Some(KeyTenant(t.clone()))).ok_or(ApiError::InvalidApiKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    #[test]
    fn keys_name_their_tenants_and_are_held_hashed() {
        let keys =
            ApiKeys::parse(&format!("{} acme  # the acme team\n\n{} globex", digest("k1"), digest("k2"))).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.authenticate(Some("Bearer k1")).unwrap(), Some(KeyTenant("acme".into())));
        assert_eq!(keys.authenticate(Some("Bearer k2")).unwrap(), Some(KeyTenant("globex".into())));
        assert!(matches!(keys.authenticate(Some("Bearer k3")), Err(ApiError::InvalidApiKey)));
        assert!(matches!(keys.authenticate(None), Err(ApiError::MissingApiKey)));
        assert!(matches!(keys.authenticate(Some("Basic k1")), Err(ApiError::MissingApiKey)));
    }

    #[test]
    fn without_keys_every_request_passes_and_bad_entries_are_refused() {
        assert_eq!(ApiKeys::default().authenticate(None).unwrap(), None);
        for bad in ["abc acme", &format!("{} ", digest("k")), &digest("k")] {
            assert!(ApiKeys::parse(bad).is_err(), "{bad}");
        }
        let inline = format!("{} a,{} b", digest("x"), digest("y"));
        assert_eq!(ApiKeys::load(None, &inline).unwrap().len(), 2);
    }
}
