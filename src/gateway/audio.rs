//! One recording's audio, streamed from the box to the client as it arrives: never buffered
//! whole, never stored.

use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response};
use http_body_util::{Either, Full};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::OwnedSemaphorePermit;

use super::respond::{CACHE_STATUS, upstream_outcome};
use super::{AccessEntry, Account, Body};
use crate::error::ProxyError;
use crate::upstream::{self};

/// One recording's audio, streamed from the box as it arrives: never buffered whole, never
/// cached. At most `upstream.max_audio_streams` run at once per account.
pub(super) async fn audio_response<B>(
    account: &Account,
    queue_call_id: u64,
    request: &Request<B>,
    access: &mut AccessEntry,
) -> Result<Response<Body>, ProxyError> {
    let permit = account
        .audio_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ProxyError::AudioBusy(account.settings.upstream.max_audio_streams))?;
    let started = Instant::now();
    let head = request.method() == Method::HEAD;
    let upstream = account
        .client
        .audio(queue_call_id, request.headers(), &access.trace.forwarded())
        .await;
    let outcome = match &upstream {
        Ok(response) => response.status().as_u16().to_string(),
        Err(error) => {
            tracing::warn!(
                account = %account.name,
                error = %error.detail(),
                queue_call_id,
                "audio download failed"
            );
            account
                .errors
                .record(format!("audio {queue_call_id}: {}", error.detail()));
            upstream_outcome(error)
        }
    };
    account
        .metrics
        .record_upstream(&outcome, started.elapsed().as_secs_f64());
    let upstream = upstream.inspect_err(|e| access.upstream_status = e.upstream_status())?;
    access.upstream_status = Some(upstream.status());
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = upstream.status();
    let headers = response.headers_mut();
    for name in upstream::AUDIO_RESPONSE_HEADERS {
        for value in upstream.headers().get_all(&name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(
        CACHE_STATUS,
        HeaderValue::from_static("miralix-gateway; fwd=bypass"),
    );
    if head {
        // The box was asked with GET (not every box answers HEAD); its headers, the length
        // included, describe the body a GET gets, which is what HEAD must say. Dropping the
        // download here closes that one connection to the box.
        drop(upstream);
        return Ok(response.map(Either::Left));
    }
    let body = AudioBody {
        inner: reqwest::Body::from(upstream),
        bytes: account.metrics.audio_bytes.clone(),
        _permit: permit,
        hold: None,
    };
    Ok(response.map(|_| Either::Right(body)))
}

/// An audio body passed on from the box as it arrives, holding its stream slot (and whatever
/// else must live as long as the transfer) until it ends.
pub struct AudioBody {
    inner: reqwest::Body,
    bytes: Counter,
    _permit: OwnedSemaphorePermit,
    hold: Option<Box<dyn Send + Sync>>,
}

impl AudioBody {
    /// Keep `value` alive until the body is done (the server's "request in flight" mark).
    pub fn hold(&mut self, value: impl Send + Sync + 'static) {
        self.hold = Some(Box::new(value));
    }
}

impl std::fmt::Debug for AudioBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioBody").finish_non_exhaustive()
    }
}

impl http_body::Body for AudioBody {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, reqwest::Error>>> {
        let this = self.get_mut();
        let frame = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &frame
            && let Some(data) = frame.data_ref()
        {
            this.bytes.inc_by(data.len() as u64);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
