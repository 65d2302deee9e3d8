//! The simulator's own endpoints under `/_simulator/`: counters, the answer delay, the failure
//! mode, the write mode and new calls. Not Miralix routes, and never counted.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::*;

/// The simulator's own endpoints (stats, delay, failure), or `None` for everything else.
pub(super) fn control(
    state: &SimState,
    request: &Request<Incoming>,
) -> Option<Response<Full<Bytes>>> {
    let query = || form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes());
    if request.uri().path() == FAILURE_PATH && request.method() == Method::PUT {
        let failure = query()
            .find(|(key, _)| key == "mode")
            .and_then(|(_, mode)| Failure::parse(&mode));
        return Some(match failure {
            Some(failure) => {
                let text = format!("{failure:?}");
                lock(&state.knobs).failure = failure;
                json(
                    StatusCode::OK,
                    serde_json::json!({ "failure": text }).to_string(),
                )
            }
            None => message(
                StatusCode::BAD_REQUEST,
                "expected ?mode=none|close|refuse|reset|invalid-json|invalid-utf8|mislabelled-json|no-head|text-ids|oversized-<bytes>|status-<code>",
            ),
        });
    }
    if request.uri().path() == DELAY_PATH && request.method() == Method::PUT {
        let ms = query()
            .find(|(key, _)| key == "ms")
            .and_then(|(_, value)| value.parse::<u64>().ok());
        return Some(match ms {
            Some(ms) => {
                lock(&state.knobs).delay = Duration::from_millis(ms);
                json(
                    StatusCode::OK,
                    serde_json::json!({ "delay_ms": ms }).to_string(),
                )
            }
            None => message(StatusCode::BAD_REQUEST, "expected ?ms=<milliseconds>"),
        });
    }
    if request.uri().path() == WRITES_PATH && request.method() == Method::PUT {
        let split = query()
            .find(|(key, _)| key == "mode")
            .and_then(|(_, mode)| match mode.as_ref() {
                "split" => Some(true),
                "whole" => Some(false),
                _ => None,
            });
        return Some(match split {
            Some(split) => {
                lock(&state.knobs).split_writes = split;
                json(
                    StatusCode::OK,
                    serde_json::json!({ "split_writes": split }).to_string(),
                )
            }
            None => message(StatusCode::BAD_REQUEST, "expected ?mode=split|whole"),
        });
    }
    if request.uri().path() == CALLS_PATH && request.method() == Method::POST {
        let param = |name: &str| {
            query()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.into_owned())
        };
        let (account, agent, count) = (
            param("account"),
            param("agent").and_then(|v| v.parse::<u64>().ok()),
            param("count").map_or(Some(1), |v| v.parse::<u64>().ok()),
        );
        let (Some(account), Some(agent), Some(count @ 1..=10_000)) = (account, agent, count) else {
            return Some(message(
                StatusCode::BAD_REQUEST,
                "expected ?account=<name>&agent=<numeric id>[&count=1..10000]",
            ));
        };
        let added = add_calls(state, &account, agent, count);
        return Some(if added.is_empty() {
            message(StatusCode::NOT_FOUND, "no such account or agent")
        } else {
            json(
                StatusCode::OK,
                serde_json::json!({ "added": added }).to_string(),
            )
        });
    }
    if request.uri().path() == STATS_PATH {
        let stats = serde_json::json!({
            "requests": state.count.load(Ordering::SeqCst),
            "max_concurrency": state.max_in_flight.load(Ordering::SeqCst),
            "list_bytes": state.list_bytes.load(Ordering::SeqCst),
            "audio_bytes": state.audio_bytes.load(Ordering::SeqCst),
            "audio_length": lock(&state.knobs).audio_bytes,
        });
        return Some(json(StatusCode::OK, stats.to_string()));
    }
    None
}
