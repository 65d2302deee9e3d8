//! One recording's audio: from the audio store (`[cache.audio]`) when there is one, with
//! `Range`, `If-Range`, `If-None-Match` and `If-Modified-Since` answered from disk; otherwise
//! streamed from the box to the client as it arrives, never buffered whole.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    ETAG, LAST_MODIFIED,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::respond::{CACHE_STATUS, X_CACHE, header_value, upstream_outcome};
use super::{AccessEntry, Account, AppState, Body};
use crate::audio::file::Meta;
use crate::audio::range::{self, Selection, Validators};
use crate::audio::{AudioKey, AudioStore, FileStream, Found, Progress};
use crate::cache::CacheStatus;
use crate::error::ProxyError;
use crate::metrics::AccountAudio;
use crate::upstream::{self, Forwarded, UpstreamClient, UpstreamError};

/// One recording's audio, from the store when it is configured, else from the box.
pub(super) async fn audio_response<B>(
    state: &AppState,
    account: &Account,
    queue_call_id: u64,
    request: &Request<B>,
    access: &mut AccessEntry,
) -> Result<Response<Body>, ProxyError> {
    match state.audio.get() {
        Some(store) => from_store(store, account, queue_call_id, request, access).await,
        None => from_box(account, queue_call_id, request, access).await,
    }
}

/// A stored recording from disk; otherwise the download under way for it, or a new one.
async fn from_store<B>(
    store: &AudioStore,
    account: &Account,
    queue_call_id: u64,
    request: &Request<B>,
    access: &mut AccessEntry,
) -> Result<Response<Body>, ProxyError> {
    let key = AudioKey {
        account: account.name.clone(),
        queue_call_id,
    };
    let audio = &account.metrics.audio;
    let (mut progress, leader) = match store.find(&key).await {
        Found::Stored(stored, file) => {
            audio.hits.inc();
            access.cache = CacheStatus::Hit;
            let meta = Arc::new(stored.meta.clone());
            return served(&meta, file, None, request, audio, "hit");
        }
        Found::Download(progress, leader) => (progress, leader),
    };
    audio.misses.inc();
    access.cache = match leader {
        Some(_) => CacheStatus::Miss,
        None => CacheStatus::Collapsed,
    };
    if let Some(leader) = leader {
        let Ok(permit) = account.audio_streams.clone().try_acquire_owned() else {
            // Dropped unused: whoever joined meanwhile is told the streams are busy too.
            drop(leader);
            return Err(ProxyError::AudioBusy(
                account.settings.upstream.max_audio_streams,
            ));
        };
        let ask = ask_box(account, queue_call_id, access.trace.forwarded());
        store.download(leader, ask, permit, account.metrics.audio_bytes.clone());
    }
    let state = loop {
        let state = progress.borrow_and_update().clone();
        if !matches!(state, Progress::Asking) {
            break state;
        }
        if progress.changed().await.is_err() {
            break progress.borrow().clone();
        }
    };
    let status = match access.cache {
        CacheStatus::Collapsed => "fwd=miss; collapsed",
        _ => "fwd=miss",
    };
    match state {
        Progress::Writing { meta, file, .. } => {
            access.upstream_status = Some(StatusCode::OK);
            served(&meta, file, Some(progress), request, audio, status)
        }
        Progress::Complete { meta, file, spill } => {
            access.upstream_status = Some(StatusCode::OK);
            // Part of a body the disk refused is in the download's spill, which the reader
            // finds through the progress.
            let progress = spill.is_some().then_some(progress);
            served(&meta, file, progress, request, audio, status)
        }
        Progress::Answered(answer) => {
            access.upstream_status = Some(answer.status);
            let mut response = Response::new(Full::new(answer.body.clone()));
            *response.status_mut() = answer.status;
            *response.headers_mut() = answer.headers.clone();
            let headers = response.headers_mut();
            headers.insert(X_CACHE, HeaderValue::from_static("MISS"));
            headers.insert(
                CACHE_STATUS,
                header_value(format!(
                    "miralix-gateway; {status}; fwd-status={}",
                    answer.status.as_u16()
                )),
            );
            Ok(response.map(Either::Left))
        }
        Progress::Failed(error) => {
            access.upstream_status = error.upstream_status();
            Err(error.into())
        }
        Progress::Broken(reason) => Err(ProxyError::AudioBroken(reason)),
        Progress::Busy => Err(ProxyError::AudioBusy(
            account.settings.upstream.max_audio_streams,
        )),
        Progress::Unavailable(Some(handoff)) if wants_all_of_it(request) => match handoff.take() {
            Some((upstream, permit)) => {
                let mut response = passed_on(account, upstream, permit, false, access, status);
                response
                    .headers_mut()
                    .insert(X_CACHE, HeaderValue::from_static("MISS"));
                Ok(response)
            }
            None => from_box(account, queue_call_id, request, access).await,
        },
        Progress::Unavailable(_) | Progress::Asking => {
            from_box(account, queue_call_id, request, access).await
        }
    }
}

/// The box's answer to a whole-file GET, timed and counted like every upstream request.
fn ask_box(
    account: &Account,
    queue_call_id: u64,
    forwarded: Forwarded,
) -> impl Future<Output = Result<reqwest::Response, UpstreamError>> + Send + 'static {
    let (client, metrics, errors) = (
        account.client.clone(),
        account.metrics.clone(),
        account.errors.clone(),
    );
    async move {
        let started = Instant::now();
        let answer = client
            .audio(queue_call_id, &HeaderMap::new(), &forwarded)
            .await;
        let outcome = outcome_of(&client, &errors, queue_call_id, &answer);
        metrics.record_upstream(&outcome, started.elapsed().as_secs_f64());
        answer
    }
}

/// The upstream outcome label of an audio request, logging and noting a failure.
fn outcome_of(
    client: &UpstreamClient,
    errors: &super::status::RecentErrors,
    queue_call_id: u64,
    answer: &Result<reqwest::Response, UpstreamError>,
) -> String {
    match answer {
        Ok(response) => response.status().as_u16().to_string(),
        Err(error) => {
            tracing::warn!(
                account = %client.account(),
                error = %error.detail(),
                queue_call_id,
                "audio download failed"
            );
            errors.record(format!("audio {queue_call_id}: {}", error.detail()));
            upstream_outcome(error)
        }
    }
}

/// A recording from its file (whole, or still being written when `progress` is given): the
/// part the request's `Range` and conditionals select, with the stored validators.
fn served<B>(
    meta: &Meta,
    file: Arc<std::fs::File>,
    progress: Option<watch::Receiver<Progress>>,
    request: &Request<B>,
    counters: &AccountAudio,
    cache_status: &str,
) -> Result<Response<Body>, ProxyError> {
    let validators = Validators {
        etag: &meta.etag,
        last_modified: meta.last_modified(),
    };
    // Until a download without Content-Length is complete, only the whole body can be sent.
    let selection = match meta.length {
        Some(length) => range::select(request.headers(), length, validators),
        None => Selection::Whole,
    };
    let (status, start, end) = match selection {
        Selection::Whole => (StatusCode::OK, 0, meta.length),
        Selection::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, Some(end)),
        Selection::NotModified => (StatusCode::NOT_MODIFIED, 0, Some(0)),
        Selection::Unsatisfiable => {
            return Err(ProxyError::RangeNotSatisfiable(meta.length.unwrap_or(0)));
        }
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let text =
        |value: &Option<String>| value.as_deref().and_then(|v| HeaderValue::from_str(v).ok());
    if let Ok(etag) = HeaderValue::from_str(&meta.etag) {
        headers.insert(ETAG, etag);
    }
    headers.insert(
        LAST_MODIFIED,
        header_value(httpdate::fmt_http_date(meta.last_modified())),
    );
    if let Some(value) = text(&meta.cache_control) {
        headers.insert(CACHE_CONTROL, value);
    }
    headers.insert(
        X_CACHE,
        HeaderValue::from_static(match cache_status {
            "hit" => "HIT",
            _ => "MISS",
        }),
    );
    headers.insert(
        CACHE_STATUS,
        header_value(format!("miralix-gateway; {cache_status}")),
    );
    if status == StatusCode::NOT_MODIFIED {
        return Ok(response.map(Either::Left));
    }
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(value) = text(&meta.content_type) {
        headers.insert(CONTENT_TYPE, value);
    }
    if let Some(value) = text(&meta.content_disposition) {
        headers.insert(CONTENT_DISPOSITION, value);
    }
    if let Some(end) = end {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(end - start));
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let (end, length) = (end.unwrap_or(0), meta.length.unwrap_or(0));
        headers.insert(
            CONTENT_RANGE,
            header_value(format!("bytes {start}-{}/{length}", end - 1)),
        );
    }
    if request.method() == Method::HEAD {
        return Ok(response.map(Either::Left));
    }
    let body = AudioBody {
        inner: Source::Disk(
            FileStream::new(file, start, end, progress),
            counters.memory_bytes.clone(),
        ),
        bytes: counters.disk_bytes.clone(),
        _permit: None,
        hold: None,
    };
    Ok(response.map(|_| Either::Right(body)))
}

/// One recording's audio, streamed from the box as it arrives: never buffered whole, never
/// stored. At most `upstream.max_audio_streams` run at once per account.
async fn from_box<B>(
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
    let outcome = outcome_of(&account.client, &account.errors, queue_call_id, &upstream);
    account
        .metrics
        .record_upstream(&outcome, started.elapsed().as_secs_f64());
    let upstream = upstream.inspect_err(|e| access.upstream_status = e.upstream_status())?;
    Ok(passed_on(
        account,
        upstream,
        permit,
        head,
        access,
        "fwd=bypass",
    ))
}

/// The box's answer passed on as it arrives, holding the stream slot `permit` until it ends.
fn passed_on(
    account: &Account,
    upstream: reqwest::Response,
    permit: OwnedSemaphorePermit,
    head: bool,
    access: &mut AccessEntry,
    cache_status: &str,
) -> Response<Body> {
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
        header_value(format!("miralix-gateway; {cache_status}")),
    );
    if head {
        // The box was asked with GET (not every box answers HEAD); its headers, the length
        // included, describe the body a GET gets, which is what HEAD must say. Dropping the
        // download here closes that one connection to the box.
        drop(upstream);
        return response.map(Either::Left);
    }
    let body = AudioBody {
        inner: Source::Box(reqwest::Body::from(upstream)),
        bytes: account.metrics.audio_bytes.clone(),
        _permit: Some(permit),
        hold: None,
    };
    response.map(|_| Either::Right(body))
}

/// A GET the box's answer to a download may be handed to: it carries none of the headers a
/// request passed on to the box would (its range and validators), so the box would answer it
/// as it answered the download, with the whole recording.
fn wants_all_of_it<B>(request: &Request<B>) -> bool {
    request.method() == Method::GET
        && upstream::AUDIO_REQUEST_HEADERS
            .iter()
            .all(|name| !request.headers().contains_key(name))
}

/// An audio body: passed on from the box as it arrives (holding its stream slot), or read
/// from the store's file; it holds whatever else must live as long as the transfer.
pub struct AudioBody {
    inner: Source,
    /// Bytes from the box, or bytes from disk (those from memory are counted with the source).
    bytes: Counter,
    _permit: Option<OwnedSemaphorePermit>,
    hold: Option<Box<dyn Send + Sync>>,
}

enum Source {
    Box(reqwest::Body),
    /// With the count of bytes sent from memory: the part of a download the disk refused.
    Disk(FileStream, Counter),
}

type BodyError = Box<dyn std::error::Error + Send + Sync>;

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
    type Error = BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        use futures_util::Stream as _;
        use std::task::Poll;
        let this = self.get_mut();
        let frame = match &mut this.inner {
            Source::Box(body) => match std::pin::Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            Source::Disk(stream, _) => match std::pin::Pin::new(stream).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
                }
                Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        };
        if let Poll::Ready(Some(Ok(frame))) = &frame
            && let Some(data) = frame.data_ref()
        {
            let counter = match &this.inner {
                Source::Disk(stream, from_memory) if stream.last_from_memory() => from_memory,
                _ => &this.bytes,
            };
            counter.inc_by(data.len() as u64);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Source::Box(body) => body.is_end_stream(),
            Source::Disk(stream, _) => stream.remaining() == Some(0),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            Source::Box(body) => body.size_hint(),
            Source::Disk(stream, _) => match stream.remaining() {
                Some(remaining) => http_body::SizeHint::with_exact(remaining),
                None => http_body::SizeHint::default(),
            },
        }
    }
}
