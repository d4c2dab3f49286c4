//! Who is asking: API keys map to owners, and every thread and run belongs to one owner.
//!
//! With no keys configured everyone is the owner `local` (and the binary refuses to listen beyond
//! loopback). Browsers cannot set headers on `EventSource` or WebSocket requests, so the key may
//! also come as `?access_token=`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sluice_protocol::ErrorCode;

use crate::AppState;
use crate::error::ApiError;

/// The owner every request is made as when no keys are configured.
pub const LOCAL_OWNER: &str = "local";

/// API keys: key → owner.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    by_key: HashMap<String, String>,
}

impl ApiKeys {
    /// Parses `owner:key,owner:key`. Errors name the bad entry's position, never the key.
    pub fn parse(spec: &str) -> Result<ApiKeys, String> {
        let mut keys = ApiKeys::default();
        for (i, pair) in spec
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .enumerate()
        {
            let (owner, key) = pair
                .split_once(':')
                .filter(|(o, k)| !o.trim().is_empty() && !k.trim().is_empty())
                .ok_or_else(|| format!("API key entry #{} is not `owner:key`", i + 1))?;
            keys.insert(owner.trim(), key.trim());
        }
        Ok(keys)
    }

    pub fn insert(&mut self, owner: &str, key: &str) {
        self.by_key.insert(key.to_string(), owner.to_string());
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    fn owner_of(&self, key: &str) -> Option<&str> {
        self.by_key.get(key).map(String::as_str)
    }
}

/// The authenticated owner of a request.
pub struct Owner(pub String);

impl FromRequestParts<Arc<AppState>> for Owner {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if state.keys.is_empty() {
            return Ok(Owner(LOCAL_OWNER.to_string()));
        }
        let from_header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let from_query = parts
            .uri
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("access_token=")));
        let Some(key) = from_header.or(from_query) else {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "missing API key: send `Authorization: Bearer <key>`",
            ));
        };
        match state.keys.owner_of(key) {
            Some(owner) => Ok(Owner(owner.to_string())),
            None => Err(ApiError::new(ErrorCode::Unauthorized, "unknown API key")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_errors_do_not_echo_secrets() {
        let keys = ApiKeys::parse(" alice:k1, bob:k2 ,").expect("valid");
        assert_eq!(keys.owner_of("k1"), Some("alice"));
        assert_eq!(keys.owner_of("k2"), Some("bob"));
        let err = ApiKeys::parse("alice:k1,secretwithoutowner").expect_err("invalid");
        assert!(err.contains("#2") && !err.contains("secret"), "{err}");
    }
}
