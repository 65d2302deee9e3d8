//! Admission, before a request is routed: the rate limit, the `Host` header and the form of
//! the request target.

use http::{Method, Request};

use super::{AppState, Generation, Peer};
use crate::error::ProxyError;

/// The rate limit, first of all: it also holds back floods of bad requests and key guesses.
pub(super) fn rate_limit(
    state: &AppState,
    generation: &Generation,
    peer: &Peer,
) -> Result<(), ProxyError> {
    let Some(limiter) = &generation.limiter else {
        return Ok(());
    };
    limiter
        .check(peer.addr.ip(), state.clock.now())
        .map_err(|limited| {
            state.metrics.record_rate_limited();
            tracing::debug!(client.addr = %peer.addr, "rate limited");
            ProxyError::RateLimited(limited)
        })
}

/// The request's form: RFC 9112 3.2 wants exactly one `Host` on an HTTP/1.1 request (its value
/// is never used: the box's address comes from the configuration), and a target in
/// origin-form or absolute-form with an `http(s)` scheme. Authority-form and asterisk-form
/// name no resource here, and user information only serves to disguise a URL
/// (RFC 9110 4.2.4).
pub(super) fn request_form<B>(request: &Request<B>) -> Result<(), ProxyError> {
    if request.version() == http::Version::HTTP_11 {
        let hosts = request.headers().get_all(http::header::HOST).iter().count();
        if hosts != 1 {
            return Err(ProxyError::HostHeader(hosts));
        }
    }
    let target = request.uri();
    let web_scheme = |scheme: &http::uri::Scheme| {
        *scheme == http::uri::Scheme::HTTP || *scheme == http::uri::Scheme::HTTPS
    };
    if !target.path().starts_with('/')
        || target.scheme().is_some_and(|scheme| !web_scheme(scheme))
        || target
            .authority()
            .is_some_and(|authority| authority.as_str().contains('@'))
    {
        return Err(ProxyError::RequestTarget);
    }
    Ok(())
}

/// Only `GET` and `HEAD`, without a body. A GET with a body is malformed for this API, and
/// smuggling attempts carry one (hyper frames a message with both `Content-Length` and
/// `Transfer-Encoding` by the latter, as RFC 9112 says, so that case lands here too).
pub(super) fn method_and_body<B: http_body::Body>(request: &Request<B>) -> Result<(), ProxyError> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Err(ProxyError::MethodNotAllowed {
            method: request.method().clone(),
            allow: "GET, HEAD",
        });
    }
    if !request.body().is_end_stream() {
        return Err(ProxyError::BodyNotAccepted);
    }
    Ok(())
}
