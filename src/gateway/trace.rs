//! Request ids and W3C trace context: what lets an operator follow one request from an app's
//! log through the gateway to the box.
//!
//! A client's `X-Request-Id` is kept when it is 1 to 128 visible ASCII characters, and replaced
//! by one of the gateway's own otherwise (32 hex digits, unique within the process and random
//! across processes). A `traceparent` is passed on only when it is well-formed (version `00`,
//! non-zero trace and parent ids, lowercase hex); a malformed one is dropped. Both go back on
//! every answer (the request id) and on to the box, and into the access and audit events.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::upstream::Forwarded;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The longest client request id kept.
const MAX_REQUEST_ID: usize = 128;

/// The trace context of one request.
#[derive(Debug, Clone)]
pub(super) struct Trace {
    pub(super) request_id: HeaderValue,
    pub(super) traceparent: Option<HeaderValue>,
}

impl Trace {
    pub(super) fn of(headers: &HeaderMap) -> Self {
        let client_id = only(headers, X_REQUEST_ID).filter(|v| valid_request_id(v.as_bytes()));
        let traceparent = only(headers, TRACEPARENT).filter(|v| valid_traceparent(v.as_bytes()));
        Self {
            request_id: client_id.unwrap_or_else(new_request_id),
            traceparent,
        }
    }

    pub(super) fn request_id(&self) -> &str {
        // Only visible ASCII is ever kept or made.
        self.request_id.to_str().unwrap_or_default()
    }

    /// The trace id of a valid `traceparent` (its second field).
    pub(super) fn trace_id(&self) -> Option<&str> {
        self.traceparent
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.get(3..35))
    }

    /// What goes on to the box with this request's fetch.
    pub(super) fn forwarded(&self) -> Forwarded {
        Forwarded {
            request_id: Some(self.request_id.clone()),
            traceparent: self.traceparent.clone(),
        }
    }
}

/// The value of `name` if the request has it exactly once (one lookup of the name).
fn only(headers: &HeaderMap, name: HeaderName) -> Option<HeaderValue> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => Some(value.clone()),
        _ => None,
    }
}

fn valid_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID).contains(&id.len()) && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, ids not all zero.
fn valid_traceparent(value: &[u8]) -> bool {
    let hex = |part: &[u8]| {
        part.iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    let zero = |part: &[u8]| part.iter().all(|b| *b == b'0');
    let parts: Vec<&[u8]> = value.split(|b| *b == b'-').collect();
    match parts.as_slice() {
        [version, trace, parent, flags] => {
            *version == b"00"
                && trace.len() == 32
                && parent.len() == 16
                && flags.len() == 2
                && hex(trace)
                && hex(parent)
                && hex(flags)
                && !zero(trace)
                && !zero(parent)
        }
        _ => false,
    }
}

/// A new request id: this process's random prefix and a counter, 32 hex digits.
fn new_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish()
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // By hand, not with `format!`: this runs for every request.
    let mut id = [0u8; 32];
    for (i, digit) in id.iter_mut().enumerate() {
        let (word, shift) = match i < 16 {
            true => (prefix, 60 - 4 * i),
            false => (n, 60 - 4 * (i - 16)),
        };
        *digit = b"0123456789abcdef"[((word >> shift) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex is a header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(pairs: &[(&'static str, &str)]) -> Trace {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_str(value).unwrap());
        }
        Trace::of(&headers)
    }

    #[test]
    fn a_client_id_is_kept_when_it_is_short_visible_ascii_and_replaced_otherwise() {
        assert_eq!(
            trace(&[("x-request-id", "app-42/abc")]).request_id(),
            "app-42/abc"
        );
        for bad in ["has space", &"x".repeat(129), ""] {
            let id = trace(&[("x-request-id", bad)]).request_id().to_owned();
            assert_eq!(id.len(), 32, "{bad:?} replaced by {id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        let two = trace(&[("x-request-id", "a"), ("x-request-id", "b")]);
        assert_eq!(two.request_id().len(), 32, "two ids: neither is taken");
        let (a, b) = (trace(&[]), trace(&[]));
        assert_ne!(a.request_id(), b.request_id());
    }

    #[test]
    fn only_a_well_formed_traceparent_is_passed_on() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let kept = trace(&[("traceparent", good)]);
        assert_eq!(kept.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ] {
            assert!(
                trace(&[("traceparent", bad)]).traceparent.is_none(),
                "{bad}"
            );
        }
    }
}
