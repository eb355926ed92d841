//! `Idempotency-Key` on the routes that start work (`POST /v1/jobs`,
//! `POST /start`, `POST /v1/groups`).
//!
//! A key is bound to the job (or group) it started in the same store
//! transaction that records it, so a crash can leave neither without the
//! other. A request repeating a bound key within [`KEY_TTL`] gets that job
//! back (`Idempotent-Replayed: true`) and starts nothing. While a request
//! with a key is in flight, the key is claimed in memory: a second request
//! with it gets `409 idempotency_key_in_use` instead of racing the first
//! (a placed start may unbind and rebind the key between attempts, and a
//! job being started may still be refused and forgotten). Answers that
//! started nothing unbind the key with the job they recorded, so a retry
//! tries again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::ApiError;
use crate::store::{KeyRow, NewKey, SharedStore};
use crate::time::now_ms;

/// How long a key is remembered.
pub(crate) const KEY_TTL: Duration = Duration::from_secs(24 * 60 * 60);
const MAX_KEY_LEN: usize = 255;
const HEADER: &str = "idempotency-key";
/// Set on every answer that repeats an earlier request's outcome.
pub(crate) const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The request's `Idempotency-Key`, if it sent one; a malformed key is
/// refused with `400 invalid_idempotency_key` before anything else.
#[derive(Debug)]
pub(crate) struct IdempotencyKey(pub(crate) Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all(HEADER).iter();
        let Some(value) = values.next() else {
            return Ok(IdempotencyKey(None));
        };
        if values.next().is_some() {
            return Err(invalid_key("send one Idempotency-Key header, not several"));
        }
        validate(value).map(|k| IdempotencyKey(Some(k)))
    }
}

fn invalid_key(why: &str) -> ApiError {
    ApiError::bad_request("invalid_idempotency_key", format!("Idempotency-Key: {why}"))
}

/// 1 to 255 visible ASCII characters (`!` to `~`): what fits in a header
/// without quoting and reads back the same in logs.
pub(crate) fn validate(value: &HeaderValue) -> Result<String, ApiError> {
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err(invalid_key("must not be empty"));
    }
    if bytes.len() > MAX_KEY_LEN {
        return Err(invalid_key(&format!(
            "at most {MAX_KEY_LEN} characters, got {}",
            bytes.len()
        )));
    }
    if !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(invalid_key(
            "only visible ASCII characters (no spaces or control characters); a UUID is a good key",
        ));
    }
    // All ASCII: the bytes are UTF-8.
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// What a key stands for in one request: the key, and the fingerprint of
/// the route and the parsed body it came with.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) key: String,
    pub(crate) route: &'static str,
    pub(crate) body_sha256: String,
}

impl Request {
    /// Fingerprints the parsed body in its canonical form (the API's own
    /// serialization: fields in a fixed order, maps sorted, empty optional
    /// fields left out), so the same request written differently (key
    /// order, spacing, `"args": []`) is the same request.
    pub(crate) fn new<T: Serialize>(key: String, route: &'static str, body: &T) -> Self {
        let mut hash = Sha256::new();
        hash.update(route.as_bytes());
        hash.update(b"\n");
        // The request types are plain strings and maps, which always serialize.
        hash.update(serde_json::to_vec(body).unwrap_or_default());
        let body_sha256 = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Request {
            key,
            route,
            body_sha256,
        }
    }

    /// The binding to write with the record this request creates.
    pub(crate) fn binding(&self) -> NewKey {
        let now = now_ms();
        NewKey {
            key: self.key.clone(),
            route: self.route.to_owned(),
            body_sha256: self.body_sha256.clone(),
            created_at_ms: now,
            expired_before_ms: expired_before(now),
        }
    }

    /// Claims the key for this request and looks up its binding. `None`:
    /// the key is new, and the claim must be held until the request has
    /// recorded its outcome.
    pub(crate) async fn claim(
        &self,
        claims: &Arc<Claims>,
        store: &SharedStore,
    ) -> Result<Result<Claim, KeyRow>, ApiError> {
        let claim = claims.claim(&self.key).ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_in_use",
                "a request with this Idempotency-Key is still being answered; retry it in a moment",
            )
        })?;
        let Some(bound) = store
            .idempotency_key(&self.key, expired_before(now_ms()))
            .await?
        else {
            return Ok(Ok(claim));
        };
        if bound.body_sha256 != self.body_sha256 {
            let route = if bound.route == self.route {
                "a different body".to_owned()
            } else {
                format!("{} (this request is for {})", bound.route, self.route)
            };
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                format!(
                    "this Idempotency-Key was used within the last 24 h for {route}; use a new key for a new request"
                ),
            ));
        }
        Ok(Err(bound))
    }
}

fn expired_before(now: u64) -> u64 {
    now.saturating_sub(KEY_TTL.as_millis() as u64)
}

/// Keys of requests in flight.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    held: Mutex<HashSet<String>>,
}

/// A key held by one request until dropped.
#[derive(Debug)]
pub(crate) struct Claim {
    claims: Arc<Claims>,
    key: String,
}

impl Claims {
    fn claim(self: &Arc<Self>, key: &str) -> Option<Claim> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.insert(key.to_owned()).then(|| Claim {
            claims: self.clone(),
            key: key.to_owned(),
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.claims
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// Marks an answer as the replay of an earlier request's outcome.
pub(crate) fn replayed(answer: impl IntoResponse) -> Response {
    let mut response = answer.into_response();
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

/// Deletes expired keys every minute, in small batches so a start never
/// waits long for the writer, until `stop` fires.
pub(crate) async fn prune_expired(store: SharedStore, stop: CancellationToken) {
    const BATCH: u32 = 500;
    const EVERY: Duration = Duration::from_secs(60);
    loop {
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = stop.cancelled() => return,
        }
        let before = expired_before(now_ms());
        let mut pruned = 0;
        loop {
            match store.prune_idempotency_keys(before, BATCH).await {
                Ok(n) => {
                    pruned += n;
                    if n < BATCH as usize || stop.is_cancelled() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "could not prune expired idempotency keys");
                    break;
                }
            }
            // Lets waiting writers in between batches.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if pruned > 0 {
            tracing::info!(pruned, "pruned expired idempotency keys");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobcluster_proto::http::StartJob;

    fn check(value: &[u8]) -> Result<String, String> {
        let value = HeaderValue::from_bytes(value).map_err(|e| e.to_string())?;
        validate(&value).map_err(|e| {
            assert_eq!(
                (e.status, e.code.as_str()),
                (StatusCode::BAD_REQUEST, "invalid_idempotency_key")
            );
            e.message
        })
    }

    #[test]
    fn keys_are_1_to_255_visible_ascii_characters() {
        assert_eq!(check(b"a").unwrap(), "a");
        let uuid = "0b6f6c1e-8d2b-4e0a-9b1f-3c2d1e0f9a8b";
        assert_eq!(check(uuid.as_bytes()).unwrap(), uuid);
        assert!(check(b"!~:/{}\"").is_ok());
        assert!(check(&[b'k'; 255]).is_ok());
        assert!(check(&[b'k'; 256]).unwrap_err().contains("at most 255"));
        assert!(check(b"").unwrap_err().contains("empty"));
        for bad in [&b"a b"[..], b"a\tb", "é".as_bytes(), b"\x7f"] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_fingerprint_is_of_the_parsed_body_and_the_route() {
        let parsed = |json: &str| serde_json::from_str::<StartJob>(json).unwrap();
        let fp = |route, json| Request::new("k".into(), route, &parsed(json)).body_sha256;
        let a = fp("/v1/jobs", r#"{"path":"a.sh","env":{"X":"1","Y":"2"}}"#);
        assert_eq!(a.len(), 64);
        assert_eq!(
            a,
            fp(
                "/v1/jobs",
                r#"{ "env": {"Y":"2","X":"1"}, "args": [], "path": "a.sh" }"#
            )
        );
        assert_ne!(
            a,
            fp("/start", r#"{"path":"a.sh","env":{"X":"1","Y":"2"}}"#)
        );
        assert_ne!(
            a,
            fp("/v1/jobs", r#"{"path":"b.sh","env":{"X":"1","Y":"2"}}"#)
        );
    }

    #[test]
    fn a_claim_is_held_until_dropped() {
        let claims = Arc::new(Claims::default());
        let first = claims.claim("k").unwrap();
        assert!(claims.claim("k").is_none());
        assert!(claims.claim("other").is_some());
        drop(first);
        assert!(claims.claim("k").is_some());
    }
}
