//! Who is calling the API, and may they do this: a `client` certificate
//! (the TLS layer already checked it chains to the cluster CA), or a bearer
//! token from `[auth] tokens`. Tokens are compared by their SHA-256, in
//! constant time (`subtle`), and never logged or echoed.

use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use jobcluster_pki::Role;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::serve::ConnectionControl;
use super::{ApiError, AppState, tls::PeerInfo};
use crate::config::{TokenEntry, TokenRole};

#[derive(Debug, Default)]
pub(crate) struct Tokens {
    entries: Vec<(String, [u8; 32], TokenRole)>,
}

impl Tokens {
    pub(crate) fn new(entries: &[TokenEntry]) -> Self {
        let entries = entries
            .iter()
            .filter_map(|t| {
                let mut hash = [0u8; 32];
                for (i, byte) in hash.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(t.sha256.get(2 * i..2 * i + 2)?, 16).ok()?;
                }
                Some((t.name.clone(), hash, t.role))
            })
            .collect();
        Tokens { entries }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn lookup(&self, token: &str) -> Option<(&str, TokenRole)> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every entry is compared in full with subtle's constant-time
        // equality (the compiler may not turn it into an early exit), and
        // no entry ends the loop, so timing says nothing about which
        // bytes or which entry matched.
        let mut found = None;
        for (name, hash, role) in &self.entries {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some((name.as_str(), *role));
            }
        }
        found
    }
}

/// Routes that change something; everything else only reads (the original
/// `/query` and `/stream` are POSTs that read).
fn writes(request: &Request) -> bool {
    request.method() != Method::GET
        && request.method() != Method::HEAD
        && !matches!(request.uri().path(), "/query" | "/stream")
}

fn unauthenticated(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
}

pub(crate) async fn authenticate(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check(&state, &peer, &request)?;
    // The connection has shown an identity: it leaves the limits of
    // connections without one (serve.rs).
    if let Some(control) = request.extensions().get::<ConnectionControl>() {
        control.admit();
    }
    Ok(next.run(request).await)
}

/// Whether `request` may go through.
fn check(state: &AppState, peer: &PeerInfo, request: &Request) -> Result<(), ApiError> {
    if let Some(id) = &peer.identity {
        if id.role == Role::Client {
            return Ok(());
        }
        tracing::warn!(peer = %id.name, role = %id.role, addr = %peer.addr, "refused an API caller without the client role");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} certificates may not use the API; use a client certificate or a token",
                id.role
            ),
        ));
    }
    let tokens: &Arc<Tokens> = &state.tokens;
    if state.insecure && !request.headers().contains_key(header::AUTHORIZATION) {
        return Ok(());
    }
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return Err(unauthenticated(
            "credentials required: a client certificate or an Authorization: Bearer token",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthenticated("the Authorization header must be `Bearer <token>`"))?;
    let Some((name, role)) = tokens.lookup(token) else {
        tracing::warn!(addr = %peer.addr, "refused an unknown bearer token");
        return Err(unauthenticated("invalid token"));
    };
    if role == TokenRole::Viewer && writes(request) {
        tracing::warn!(token = name, addr = %peer.addr, path = %request.uri().path(), "refused a write with a viewer token");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may only read (role viewer)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn entry(name: &str, token: &str, role: TokenRole) -> TokenEntry {
        let hex: String = Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        TokenEntry {
            name: name.into(),
            sha256: hex,
            role,
        }
    }

    #[test]
    fn a_token_finds_its_own_entry_and_nothing_else_does() {
        let tokens = Tokens::new(&[
            entry("ci", "secret-one", TokenRole::Operator),
            entry("dashboard", "secret-two", TokenRole::Viewer),
        ]);
        assert_eq!(
            tokens.lookup("secret-one"),
            Some(("ci", TokenRole::Operator))
        );
        assert_eq!(
            tokens.lookup("secret-two"),
            Some(("dashboard", TokenRole::Viewer))
        );
        for wrong in ["", "secret-on", "secret-one ", "SECRET-ONE"] {
            assert_eq!(tokens.lookup(wrong), None, "{wrong:?}");
        }
        assert_eq!(Tokens::default().lookup("secret-one"), None);
    }
}
