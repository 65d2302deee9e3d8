//! Errors a request can end in, and the one place that maps them to an HTTP status.
//!
//! Every error answer the gateway makes itself is a small JSON object,
//! `{"status": 400, "error": "<what was wrong and what is accepted>"}`, built here.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::Full;

use crate::auth::{AdminTokenError, AuthError};
use crate::limit::Limited;
use crate::route::RouteError;
use crate::upstream::UpstreamError;

/// Why a request on the public listener was not answered with an upstream reply.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Passthrough(crate::route::passthrough::PassthroughError),
    #[error("unknown account \"{0}\": no such account is configured on this gateway")]
    UnknownAccount(String),
    #[error("method {method} is not allowed here: use {allow}")]
    MethodNotAllowed { method: Method, allow: &'static str },
    #[error(
        "this account's box speaks API 6.5, which has no fromQueueCallId, and its list has no numeric QueueCallId to filter by; ask without fromQueueCallId"
    )]
    CannotEmulate,
    #[error(
        "the agent directory's state \"{given}\" is not one this gateway passes on; use one of: {allowed} (accounts.<name>.directory_states)"
    )]
    DirectoryState { given: String, allowed: String },
    #[error(
        "{0} audio downloads from this account's box are already in progress (upstream.max_audio_streams); try again shortly"
    )]
    AudioBusy(usize),
    #[error("the box's audio download broke off ({0}); try again")]
    AudioBroken(String),
    #[error(
        "the requested range is not satisfiable: the recording has {0} bytes; ask for a range that starts before its end"
    )]
    RangeNotSatisfiable(u64),
    #[error(
        "the request target must be a path such as /mot/{{account}}/agents/id/103/recordings, or an absolute http(s) URL without user information"
    )]
    RequestTarget,
    #[error("an HTTP/1.1 request needs exactly one Host header; this one has {0}")]
    HostHeader(usize),
    #[error("a request body is not accepted: send GET or HEAD without one")]
    BodyNotAccepted,
    #[error(
        "too many requests from this address (server.rate_limit): retry after {} s",
        retry_after_seconds(.0.retry_after)
    )]
    RateLimited(Limited),
    #[error(transparent)]
    Unauthorized(AuthError),
    #[error(
        "cache control is disabled: set admin.token_file (or admin.token_credential) and send the token as Authorization: Bearer <token>"
    )]
    AdminDisabled,
    /// A cache listing's query that is not understood.
    #[error("{0}")]
    BadListing(String),
    #[error(transparent)]
    AdminToken(AdminTokenError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl ProxyError {
    /// The status for each error: the one match that decides it.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Route(RouteError::NotFound) | ProxyError::UnknownAccount(_) => {
                StatusCode::NOT_FOUND
            }
            ProxyError::Route(RouteError::PathTooLong) => StatusCode::URI_TOO_LONG,
            ProxyError::Route(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::CannotEmulate => StatusCode::BAD_GATEWAY,
            ProxyError::DirectoryState { .. } | ProxyError::Passthrough(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Unauthorized(
                AuthError::CertificateRequired | AuthError::CertificateNotAllowed,
            ) => StatusCode::FORBIDDEN,
            ProxyError::Unauthorized(AuthError::SeveralCredentials(_))
            | ProxyError::AdminToken(AdminTokenError::Several(_)) => StatusCode::BAD_REQUEST,
            ProxyError::Unauthorized(_) | ProxyError::AdminToken(_) => StatusCode::UNAUTHORIZED,
            ProxyError::BodyNotAccepted => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HostHeader(_) | ProxyError::RequestTarget => StatusCode::BAD_REQUEST,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::AdminDisabled => StatusCode::FORBIDDEN,
            ProxyError::BadListing(_) => StatusCode::BAD_REQUEST,
            ProxyError::AudioBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::AudioBroken(_) => StatusCode::BAD_GATEWAY,
            ProxyError::RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            // Upstream failures map in one place, which the cache uses too.
            ProxyError::Upstream(upstream) => upstream.status(),
        }
    }

    /// The JSON error response; never cached by clients.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let mut response = json_error(self.status(), &self.to_string());
        let headers = response.headers_mut();
        match self {
            ProxyError::MethodNotAllowed { allow, .. } => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            ProxyError::AudioBusy(_) => {
                headers.insert(RETRY_AFTER, HeaderValue::from(1));
            }
            ProxyError::RangeNotSatisfiable(length) => {
                let range = format!("bytes */{length}");
                headers.insert(
                    http::header::CONTENT_RANGE,
                    HeaderValue::try_from(range).expect("digits"),
                );
            }
            ProxyError::RateLimited(limited) => {
                let seconds = retry_after_seconds(limited.retry_after);
                headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
            }
            ProxyError::Unauthorized(reason) => {
                let challenge = match reason {
                    AuthError::Missing => MISSING_TOKEN,
                    AuthError::Invalid => INVALID_TOKEN,
                    // A 403: a certificate is not something the client can add to a retry;
                    // a 400: the request is malformed, not unauthenticated.
                    AuthError::CertificateRequired
                    | AuthError::CertificateNotAllowed
                    | AuthError::SeveralCredentials(_) => return response,
                };
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
            }
            ProxyError::AdminToken(reason) => {
                let challenge = match reason {
                    AdminTokenError::Missing => ADMIN_MISSING_TOKEN,
                    AdminTokenError::Wrong => ADMIN_INVALID_TOKEN,
                    AdminTokenError::Several(_) => return response,
                };
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
                // A browser (the status page's cache listing) asks for the token as a password.
                headers.append(WWW_AUTHENTICATE, HeaderValue::from_static(ADMIN_BASIC));
            }
            ProxyError::Upstream(upstream) => {
                if let Some(after) = upstream.retry_after() {
                    let seconds = retry_after_seconds(after);
                    headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
                }
            }
            _ => {}
        }
        response
    }
}

/// `WWW-Authenticate` challenges (RFC 6750 3): `error="invalid_token"` only when a token was
/// sent and refused.
const MISSING_TOKEN: &str = "Bearer realm=\"miralix-gateway\"";
const INVALID_TOKEN: &str = "Bearer realm=\"miralix-gateway\", error=\"invalid_token\"";
const ADMIN_MISSING_TOKEN: &str = "Bearer realm=\"miralix-gateway admin\"";
const ADMIN_BASIC: &str = "Basic realm=\"miralix-gateway admin\", charset=\"UTF-8\"";
const ADMIN_INVALID_TOKEN: &str = "Bearer realm=\"miralix-gateway admin\", error=\"invalid_token\"";

/// `Retry-After` for a wait: whole seconds, rounded up and at least 1, so a client never
/// comes back too early.
pub fn retry_after_seconds(after: Duration) -> u64 {
    (after.as_secs() + u64::from(after.subsec_nanos() > 0)).max(1)
}

/// A gateway-made JSON error body with `Cache-Control: no-store`.
pub fn json_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "status": status.as_u16(), "error": message });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
