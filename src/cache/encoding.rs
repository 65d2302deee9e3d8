//! Content coding: a stored list is gzip-compressed once, when it is stored, and served to
//! clients whose `Accept-Encoding` allows it.
//!
//! Only gzip is offered. Every HTTP client that matters accepts it, and a JSON list compresses
//! to about a fifth with it; brotli would gain a few percent more at the price of a large extra
//! crate to build. flate2 runs on zlib-rs, a Rust port of zlib, which deflates the benchmark's
//! lists in less CPU than flate2's default backend (measured in bench/README.md, "History").

use std::io::Write as _;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use http::HeaderValue;

use super::Encoded;
use super::conditional::entity_tag;
use crate::config::CacheConfig;

/// Bodies larger than this are compressed on the blocking pool, not on a request thread.
const INLINE_LIMIT: usize = 64 * 1024;

/// Whether a stored body gets a compressed copy at all (gzip on, and not too small).
pub fn worth_compressing(body: &[u8], config: &CacheConfig) -> bool {
    config.gzip && body.len() as u64 >= config.gzip_min_bytes
}

/// The gzip copy of a body about to be stored, when compression is on, the body is at least
/// `cache.gzip_min_bytes`, and compressing actually makes it smaller. A client waits for it
/// (a selection compressed for it, an entry read back from a tier, an answer finished before
/// it is handed out), so it is made at normal priority: on the worker in steps, on the blocking
/// pool when large. A copy that nobody waits for is made with [`gzip_copy`] on a background
/// thread instead (see `cache::fill`).
pub async fn gzip_for_storage(body: &Bytes, config: &CacheConfig) -> Option<Encoded> {
    if !worth_compressing(body, config) {
        return None;
    }
    let level = config.gzip_level;
    let compressed = match body.len() <= INLINE_LIMIT {
        true => gzip_in_steps(body, level).await,
        false => {
            let body = body.clone();
            tokio::task::spawn_blocking(move || gzip(&body, level))
                .await
                .ok()?
        }
    };
    smaller(body, compressed)
}

/// The same copy as [`gzip_for_storage`]'s, made at once on this thread, for a body already
/// found [`worth_compressing`].
pub fn gzip_copy(body: &[u8], level: u32) -> Option<Encoded> {
    smaller(body, gzip(body, level))
}

/// `compressed` as the stored copy, if it is smaller than `body` at all.
fn smaller(body: &[u8], compressed: Bytes) -> Option<Encoded> {
    (compressed.len() < body.len()).then(|| Encoded {
        etag: entity_tag(&compressed),
        body: compressed,
    })
}

/// How much of a body is deflated between two yields to the worker's other tasks.
const STEP: usize = 4 * 1024;

/// [`gzip`] in steps of [`STEP`] of input, yielding to the worker's other tasks between them:
/// a request arriving meanwhile (on a one-CPU host the worker may be the only thread) waits
/// for one step, some tens of microseconds, not for the whole body, and the rest is
/// compressed while that request waits for the box.
async fn gzip_in_steps(body: &[u8], level: u32) -> Bytes {
    let mut encoder = encoder(body, level);
    let mut steps = body.chunks(STEP).peekable();
    while let Some(step) = steps.next() {
        // Writing into a Vec cannot fail.
        let _ = encoder.write_all(step);
        if steps.peek().is_some() {
            tokio::task::yield_now().await;
        }
    }
    exact(encoder.finish().unwrap_or_default())
}

fn encoder(body: &[u8], level: u32) -> GzEncoder<Vec<u8>> {
    GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        Compression::new(level),
    )
}

/// `body` gzip-compressed at `level` (1 to 9).
pub fn gzip(body: &[u8], level: u32) -> Bytes {
    let mut encoder = encoder(body, level);
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(body);
    exact(encoder.finish().unwrap_or_default())
}

fn exact(compressed: Vec<u8>) -> Bytes {
    // The Vec grew by doubling: keep an allocation of the exact size, not up to twice it, as
    // the cache's weigher counts the length.
    match compressed.len() == compressed.capacity() {
        true => Bytes::from(compressed),
        false => Bytes::copy_from_slice(&compressed),
    }
}

/// Whether `Accept-Encoding` (every line of it) allows gzip: `gzip` or `x-gzip` with a
/// non-zero weight, or `*` with a non-zero weight when gzip is not named. No header means
/// identity only, as most caches treat it.
pub fn accepts_gzip<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> bool {
    let mut named = None;
    let mut any = None;
    for value in values {
        let Ok(text) = value.to_str() else { continue };
        for item in text.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or_default().trim();
            let weight = parts
                .find_map(|p| {
                    let (name, value) = p.trim().split_once('=')?;
                    name.trim().eq_ignore_ascii_case("q").then(|| value.trim())
                })
                .is_none_or(nonzero_weight);
            if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                named = Some(named.unwrap_or(false) || weight);
            } else if coding == "*" {
                any = Some(weight);
            }
        }
    }
    named.or(any).unwrap_or(false)
}

/// Whether a `q` value is above zero; a malformed one counts as zero, so it never turns
/// compression on.
fn nonzero_weight(q: &str) -> bool {
    q.parse::<f32>().is_ok_and(|q| q > 0.0 && q <= 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn accepts(values: &[&str]) -> bool {
        let values: Vec<HeaderValue> = values
            .iter()
            .map(|v| HeaderValue::from_str(v).unwrap())
            .collect();
        accepts_gzip(values.iter())
    }

    #[test]
    fn accept_encoding_is_read_with_weights() {
        assert!(accepts(&["gzip"]));
        assert!(accepts(&["gzip, deflate, br"]));
        assert!(accepts(&["br;q=1.0, GZIP;q=0.5"]));
        assert!(accepts(&["x-gzip"]));
        assert!(accepts(&["*"]));
        assert!(accepts(&["deflate", "gzip"]), "across header lines");
        assert!(!accepts(&[]));
        assert!(!accepts(&["identity"]));
        assert!(!accepts(&["br, deflate"]));
        assert!(!accepts(&["gzip;q=0"]));
        assert!(!accepts(&["gzip;q=0.000"]));
        assert!(!accepts(&["*, gzip;q=0"]), "named beats the wildcard");
        assert!(!accepts(&["*;q=0"]));
        assert!(!accepts(&["gzip;q=abc"]));
        assert!(!accepts(&["gzipped"]));
    }

    fn gunzip(compressed: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(compressed)
            .read_to_end(&mut plain)
            .unwrap();
        plain
    }

    #[test]
    fn gzip_round_trips() {
        let body = b"[{\"QueueCallId\":1}]".repeat(100);
        let compressed = gzip(&body, 6);
        assert!(compressed.len() < body.len() / 4);
        assert_eq!(gunzip(&compressed), body);
    }

    #[tokio::test]
    async fn gzip_in_steps_round_trips_across_step_boundaries() {
        for len in [STEP - 1, STEP, STEP + 1, 3 * STEP + 17] {
            let body: Vec<u8> = (0..len)
                .map(|i| b"[{\"QueueCallId\":12}]"[i % 20])
                .collect();
            let compressed = gzip_in_steps(&body, 6).await;
            assert_eq!(gunzip(&compressed), body, "{len} bytes");
        }
    }
}
