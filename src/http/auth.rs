//! `http.token`: `Authorization: Bearer <token>` on every path but the
//! probes.
//!
//! The token is a secret: it is never logged or echoed, and it is compared
//! in constant time (SHA-256 of both sides, so that not even its length
//! shows in the timing).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// Paths that answer without the token: liveness and readiness probes
/// (kubelet, load balancers) carry no credentials and reveal one bit.
const OPEN_PATHS: &[&str] = &["/healthz", "/readyz"];

/// The digest of the expected token; the token itself is not kept here.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

impl Token {
    pub fn new(secret: &Secret) -> Token {
        Token {
            digest: sha256(secret.expose().as_bytes()),
        }
    }

    /// True when `headers` carry `Authorization: Bearer <this token>`.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let Some((scheme, given)) = value.as_bytes().split_first_chunk::<7>() else {
            return false;
        };
        // The scheme is case-insensitive (RFC 9110, 11.1).
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return false;
        }
        bool::from(sha256(given.trim_ascii()).ct_eq(&self.digest))
    }
}

/// Lets the probes through, and the rest only with the token.
pub async fn require(State(token): State<Token>, req: Request, next: Next) -> Response {
    if OPEN_PATHS.contains(&req.uri().path()) || token.admits(req.headers()) {
        return next.run(req).await;
    }
    tracing::debug!(path = %req.uri().path(), "HTTP request without a valid bearer token");
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"walnats\"")],
        "unauthorized: send Authorization: Bearer <http.token>\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(header::AUTHORIZATION, v);
        }
        h
    }

    #[test]
    fn only_the_bearer_token_itself_is_admitted() {
        let t = Token::new(&Secret::new("s3cret-token"));
        assert!(t.admits(&with("Bearer s3cret-token")));
        assert!(t.admits(&with("bearer s3cret-token")));
        assert!(t.admits(&with("Bearer  s3cret-token ")));
        for bad in [
            "",
            "Bearer",
            "Bearer ",
            "Bearer s3cret-toke",
            "Bearer s3cret-tokenn",
            "Bearer S3CRET-TOKEN",
            "Basic s3cret-token",
            "s3cret-token",
            "Bearers3cret-token",
        ] {
            assert!(!t.admits(&with(bad)), "{bad:?}");
        }
        assert!(!t.admits(&HeaderMap::new()));
    }
}
