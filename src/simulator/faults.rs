//! What a test can make the simulated box do wrong: fail with a status, drop the connection,
//! send broken or mislabelled bodies, refuse `HEAD`, or write each answer in small pieces.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::*;

/// What a test can make the box do. Applies to every request until changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Failure {
    /// Answer normally.
    #[default]
    None,
    /// Answer with this status and a small JSON error body.
    Status(u16),
    /// Close the connection after reading the request, without answering.
    Close,
    /// Close every new connection at once, before TLS: as if the box were rebooting.
    Refuse,
    /// Send the headers and part of the body, then drop the connection.
    ResetMidBody,
    /// Answer `200` with a JSON array of about this many bytes.
    Oversized(usize),
    /// Answer `200` with a body that is not JSON.
    InvalidJson,
    /// Answer lists with every `QueueCallId` as a string (a box the gateway cannot filter).
    TextIds,
    /// Answer `200` with a JSON array whose one string holds a byte that is not UTF-8.
    InvalidUtf8,
    /// Answer normally, but label a list `text/html`.
    MislabelledJson,
    /// Answer `HEAD` with `501 Not Implemented`, as some servers do; GET as usual.
    NoHead,
}

impl Failure {
    /// Parse the control endpoint's `mode`: `none`, `close`, `refuse`, `reset`, `invalid-json`,
    /// `oversized-<bytes>` or `status-<code>`.
    pub fn parse(mode: &str) -> Option<Self> {
        Some(match mode {
            "none" => Failure::None,
            "close" => Failure::Close,
            "refuse" => Failure::Refuse,
            "reset" => Failure::ResetMidBody,
            "invalid-json" => Failure::InvalidJson,
            "text-ids" => Failure::TextIds,
            "invalid-utf8" => Failure::InvalidUtf8,
            "mislabelled-json" => Failure::MislabelledJson,
            "no-head" => Failure::NoHead,
            _ => match mode.split_once('-')? {
                ("oversized", bytes) => Failure::Oversized(bytes.parse().ok()?),
                ("status", code) => Failure::Status(code.parse().ok()?),
                _ => return None,
            },
        })
    }
}

/// The simulator's response body: whole, or one that breaks off (for `ResetMidBody`).
pub(super) type SimBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Yields its first chunk, then fails, so hyper drops the connection mid-body.
pub(super) struct BrokenBody(Option<Bytes>);

impl http_body::Body for BrokenBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        std::task::Poll::Ready(Some(match self.get_mut().0.take() {
            Some(chunk) => Ok(http_body::Frame::data(chunk)),
            None => Err(std::io::Error::other("simulated reset mid-body")),
        }))
    }
}

/// The answer as the failure knob shapes it.
pub(super) async fn misbehave(
    state: &SimState,
    request: Request<Incoming>,
    failure: Failure,
    api_6_5: bool,
) -> Result<Response<SimBody>, std::io::Error> {
    match failure {
        Failure::None => Ok(route(state, &request, api_6_5)),
        Failure::NoHead if request.method() == Method::HEAD => Ok(whole(message(
            StatusCode::NOT_IMPLEMENTED,
            "HEAD is not implemented",
        ))),
        Failure::NoHead => Ok(route(state, &request, api_6_5)),
        Failure::InvalidUtf8 => {
            let body = Bytes::from_static(b"[{\"QueueCallId\":47610,\"AgentName\":\"Cl\xffus\"}]");
            let mut response = Response::new(Full::new(body));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(whole(response))
        }
        Failure::MislabelledJson => {
            let mut response = route(state, &request, api_6_5);
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            Ok(response)
        }
        // A rebooting box drops the connections it had, too.
        Failure::Close | Failure::Refuse => {
            Err(std::io::Error::other("simulated connection close"))
        }
        Failure::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Ok(whole(message(status, "simulated failure")))
        }
        Failure::ResetMidBody => {
            let full = route(state, &request, api_6_5);
            let (parts, body) = full.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let half = bytes.slice(..bytes.len() / 2);
            let mut response = Response::from_parts(parts, BrokenBody(Some(half)).boxed());
            response
                .headers_mut()
                .insert(http::header::CONTENT_LENGTH, bytes.len().into());
            Ok(response)
        }
        Failure::Oversized(size) => {
            let element =
                r#"{"QueueCallId":1,"Padding":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},"#;
            let mut body = String::with_capacity(size + element.len());
            body.push('[');
            while body.len() < size {
                body.push_str(element);
            }
            body.pop();
            body.push(']');
            Ok(whole(json(StatusCode::OK, body)))
        }
        Failure::InvalidJson => Ok(whole(json(
            StatusCode::OK,
            r#"[{"QueueCallId":47610,"AgentName":"Claus"#.to_owned(),
        ))),
        Failure::TextIds => {
            let (parts, body) = route(state, &request, api_6_5).into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let body = match serde_json::from_slice::<Vec<serde_json::Value>>(&bytes) {
                Ok(mut list) => {
                    for element in &mut list {
                        if let Some(id) = element.get_mut("QueueCallId") {
                            *id = serde_json::Value::String(id.to_string());
                        }
                    }
                    Bytes::from(serde_json::to_vec(&list).unwrap_or_default())
                }
                Err(_) => bytes,
            };
            let mut response = Response::from_parts(parts, Full::new(body));
            response.headers_mut().remove(http::header::CONTENT_LENGTH);
            Ok(whole(response))
        }
    }
}

/// A body that makes hyper write the head on its own, then the body piece by piece: it is
/// not ready when first polled, and again before every piece, so each poll that finds nothing
/// flushes what was written so far as one write.
pub(super) struct SplitWrites {
    inner: SimBody,
    pending: Bytes,
    /// Whether the next poll yields (wakes itself and reports not ready) first.
    pause: bool,
}

impl SplitWrites {
    pub(super) fn new(inner: SimBody) -> Self {
        Self {
            inner,
            pending: Bytes::new(),
            pause: true,
        }
    }
}

impl http_body::Body for SplitWrites {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.pause {
            this.pause = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if this.pending.is_empty() {
            match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.pending = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return other,
            }
        }
        let piece = this
            .pending
            .split_to(this.pending.len().min(SPLIT_WRITE_BYTES));
        this.pause = true;
        Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let inner = self.inner.size_hint();
        let pending = self.pending.len() as u64;
        let mut hint = http_body::SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + pending);
        }
        hint.set_lower(inner.lower() + pending);
        hint
    }
}
