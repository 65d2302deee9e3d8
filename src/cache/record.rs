//! A stored entry as bytes, for the second tier (Redis or disk): what a memory entry carries,
//! with times as ages so that they mean the same on another host or after a restart.
//!
//! Layout: the magic `MGW` and a format version byte, a little-endian `u32` header length, the
//! header as JSON, then the body byte for byte. The parsed list and the gzip copy are not
//! stored: they are rebuilt from the body on load, so a record cannot carry an index that
//! disagrees with its body.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use super::policy::Lifetime;
use super::{CacheKey, CachedResponse, StoredList, encoding};
use crate::config::CacheConfig;
use crate::recordings::RecordingList;

const MAGIC: &[u8; 4] = b"MGW\x01";

#[derive(Serialize, Deserialize)]
struct Header {
    /// The entry's key, canonical: a record found under another key is not this entry.
    key: String,
    status: u16,
    content_type: Option<String>,
    etag: Option<String>,
    /// How old the answer was when the record was written.
    age_ms: u64,
    ttl_ms: u64,
    stale_while_revalidate_ms: u64,
    stale_if_error_ms: u64,
    /// For a full list: how long before the record was written the box last sent it whole.
    whole_age_ms: Option<u64>,
}

/// What a second tier keeps of an entry: the record's bytes and how long it is worth keeping.
pub struct Record {
    pub bytes: Vec<u8>,
    /// Until it can no longer be served, or be the base of a delta refresh.
    pub keep_for: Duration,
    /// Until it goes stale.
    pub fresh_for: Duration,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The record of a stored entry at `now`; `None` for an entry that is not stored (no
/// lifetime) or is already past use. `unparsed`: when the box sent the list whole, for an
/// entry written before its list was parsed (the reader parses it, as it does every record).
pub fn encode(
    key: &CacheKey,
    entry: &CachedResponse,
    unparsed: Option<Instant>,
    config: &CacheConfig,
    now: Instant,
) -> Option<Record> {
    let lifetime = entry.lifetime?;
    let age = now.saturating_duration_since(lifetime.fetched_at);
    let whole_at = match &entry.list {
        Some(list) => Some(list.fetched_whole_at),
        None => unparsed.filter(|_| entry.status == StatusCode::OK),
    };
    let whole_age = whole_at.map(|at| now.saturating_duration_since(at));
    let servable = lifetime.servable_for().saturating_sub(age);
    let keep_for = match whole_age {
        Some(whole) => servable.max(config.full_refresh_interval.saturating_sub(whole)),
        None => servable,
    };
    if keep_for.is_zero() {
        return None;
    }
    let header = Header {
        key: key.canonical(),
        status: entry.status.as_u16(),
        content_type: entry
            .content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        etag: entry
            .etag
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        age_ms: millis(age),
        ttl_ms: millis(lifetime.ttl),
        stale_while_revalidate_ms: millis(lifetime.stale_while_revalidate),
        stale_if_error_ms: millis(lifetime.stale_if_error),
        whole_age_ms: whole_age.map(millis),
    };
    let header = serde_json::to_vec(&header).ok()?;
    let mut bytes = Vec::with_capacity(8 + header.len() + entry.body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&u32::try_from(header.len()).ok()?.to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&entry.body);
    Some(Record {
        bytes,
        keep_for,
        fresh_for: lifetime.ttl.saturating_sub(age),
    })
}

/// Why a record could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not a miralix-gateway cache record (wrong magic or format version)")]
    Foreign,
    #[error("the record is truncated or its header is not valid")]
    Corrupt,
    #[error("the record belongs to another key")]
    OtherKey,
}

/// The entry a record holds, `elapsed` after it was written (by the clock of whoever judges
/// that: Redis's own for the shared tier, this host's for the disk), as of `now`. The gzip
/// copy is made again here, by the configuration in force.
pub async fn decode(
    key: &CacheKey,
    bytes: &[u8],
    elapsed: Duration,
    config: &CacheConfig,
    now: Instant,
) -> Result<Arc<CachedResponse>, RecordError> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(RecordError::Foreign)?;
    let (length, rest) = rest.split_first_chunk::<4>().ok_or(RecordError::Corrupt)?;
    let length = u32::from_le_bytes(*length) as usize;
    if rest.len() < length {
        return Err(RecordError::Corrupt);
    }
    let (header, body) = rest.split_at(length);
    let header: Header = serde_json::from_slice(header).map_err(|_| RecordError::Corrupt)?;
    if header.key != key.canonical() {
        return Err(RecordError::OtherKey);
    }
    let status = StatusCode::from_u16(header.status).map_err(|_| RecordError::Corrupt)?;
    let value = |text: Option<String>| -> Result<Option<HeaderValue>, RecordError> {
        text.map(|t| HeaderValue::from_str(&t).map_err(|_| RecordError::Corrupt))
            .transpose()
    };
    let ago = |ms: u64| {
        let back = Duration::from_millis(ms).saturating_add(elapsed);
        now.checked_sub(back).unwrap_or(now)
    };
    let body = Bytes::copy_from_slice(body);
    let lifetime = Lifetime {
        fetched_at: ago(header.age_ms),
        ttl: Duration::from_millis(header.ttl_ms),
        stale_while_revalidate: Duration::from_millis(header.stale_while_revalidate_ms),
        stale_if_error: Duration::from_millis(header.stale_if_error_ms),
    };
    let list = match header.whole_age_ms {
        Some(whole) if status == StatusCode::OK => match RecordingList::parse(&body) {
            Some(recordings) => Some(StoredList {
                recordings: Arc::new(recordings),
                fetched_whole_at: ago(whole),
            }),
            // Written before its writer had parsed it: a `200` that is JSON but no list of
            // recordings is kept as any other answer is.
            None if crate::upstream::is_json_text(&body) => None,
            None => return Err(RecordError::Corrupt),
        },
        _ => None,
    };
    let age = now.saturating_duration_since(lifetime.fetched_at);
    let servable = lifetime.servable_for().saturating_sub(age);
    let retain_for = match &list {
        Some(list) => servable.max(
            config
                .full_refresh_interval
                .saturating_sub(now.saturating_duration_since(list.fetched_whole_at)),
        ),
        None => servable,
    };
    let gzip = match status {
        StatusCode::OK => encoding::gzip_for_storage(&body, config).await,
        _ => None,
    };
    Ok(Arc::new(CachedResponse {
        status,
        content_type: value(header.content_type)?,
        etag: value(header.etag)?,
        gzip,
        list,
        body,
        fetched_at: lifetime.fetched_at,
        lifetime: Some(lifetime),
        retain_for: Some(retain_for),
        too_large: false,
        from_tier: None,
        provisional: false,
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cache::policy::tests::cache;
    use crate::identity::IdType;
    use crate::route::{ListQuery, Subject};

    fn key(identification: &str) -> CacheKey {
        CacheKey {
            account: "greenbox".into(),
            query: ListQuery {
                subject: Subject::Agent {
                    id_type: IdType::Id,
                    identification: identification.into(),
                },
                from_queue_call_id: None,
            },
        }
    }

    pub(crate) fn entry(now: Instant, body: &str) -> CachedResponse {
        let body = Bytes::from(body.to_owned());
        CachedResponse {
            status: StatusCode::OK,
            content_type: Some(HeaderValue::from_static("application/json; charset=utf-8")),
            etag: Some(HeaderValue::from_static("\"abc\"")),
            gzip: None,
            list: Some(StoredList {
                recordings: Arc::new(RecordingList::parse(&body).unwrap()),
                fetched_whole_at: now - Duration::from_secs(100),
            }),
            body,
            fetched_at: now - Duration::from_secs(10),
            lifetime: Some(Lifetime {
                fetched_at: now - Duration::from_secs(10),
                ttl: Duration::from_secs(30),
                stale_while_revalidate: Duration::from_secs(30),
                stale_if_error: Duration::from_secs(600),
            }),
            retain_for: Some(Duration::from_secs(900)),
            too_large: false,
            from_tier: None,
            provisional: false,
        }
    }

    #[tokio::test]
    async fn an_entry_reads_back_the_same_and_aged_by_the_time_elapsed() {
        let config = cache(30, 5);
        let now = Instant::now() + Duration::from_secs(3600);
        let body = r#"[{"QueueCallId":7,"x":1},{"QueueCallId":9}]"#;
        let record = encode(&key("42"), &entry(now, body), None, &config, now).unwrap();
        assert_eq!(record.fresh_for, Duration::from_secs(20));
        // Full-refresh base for 800 more seconds outlasts the 620 it stays servable.
        assert_eq!(record.keep_for, Duration::from_secs(800));
        let later = now + Duration::from_secs(5);
        let back = decode(
            &key("42"),
            &record.bytes,
            Duration::from_secs(5),
            &config,
            later,
        )
        .await
        .unwrap();
        assert_eq!(back.body, body.as_bytes());
        assert_eq!(back.status, StatusCode::OK);
        assert_eq!(back.etag.as_ref().unwrap(), "\"abc\"");
        assert_eq!(later - back.fetched_at, Duration::from_secs(15));
        let list = back.list.as_ref().unwrap();
        assert_eq!(list.recordings.max_id(), Some(9));
        assert_eq!(later - list.fetched_whole_at, Duration::from_secs(105));
        assert_eq!(back.retain_for, Some(Duration::from_secs(795)));
        assert!(back.gzip.is_none(), "below gzip_min_bytes");
    }

    #[tokio::test]
    async fn foreign_truncated_and_misplaced_records_are_refused() {
        let config = cache(30, 5);
        let now = Instant::now() + Duration::from_secs(3600);
        let record = encode(&key("42"), &entry(now, "[]"), None, &config, now).unwrap();
        let config = &config;
        let read = |bytes: Vec<u8>, k: CacheKey| async move {
            decode(&k, &bytes, Duration::ZERO, config, now).await.err()
        };
        assert_eq!(
            read(b"PNG\x89 not ours".to_vec(), key("42")).await,
            Some(RecordError::Foreign)
        );
        let truncated = record.bytes[..record.bytes.len() - 4].to_vec();
        assert_eq!(read(truncated, key("42")).await, Some(RecordError::Corrupt));
        assert_eq!(
            read(record.bytes.clone(), key("43")).await,
            Some(RecordError::OtherKey)
        );
        assert_eq!(read(record.bytes, key("42")).await, None);
    }

    /// A list written as the box sent it, before it was parsed, is read back as a list; a
    /// `200` written so that turns out to be no list is kept as a plain answer, and one that
    /// is not even JSON is refused.
    #[tokio::test]
    async fn a_record_written_before_its_parse_reads_back_by_what_its_body_is() {
        let config = cache(30, 5);
        let now = Instant::now() + Duration::from_secs(3600);
        let whole_at = now - Duration::from_secs(100);
        let read = |body: &str| {
            let mut unparsed = entry(now, "[]");
            unparsed.list = None;
            unparsed.body = Bytes::from(body.to_owned());
            let record = encode(&key("42"), &unparsed, Some(whole_at), &config, now).unwrap();
            let config = &config;
            async move { decode(&key("42"), &record.bytes, Duration::ZERO, config, now).await }
        };
        let list = read(r#"[{"QueueCallId":7}]"#).await.unwrap();
        let list = list.list.as_ref().expect("parsed by the reader");
        assert_eq!(list.recordings.max_id(), Some(7));
        assert_eq!(now - list.fetched_whole_at, Duration::from_secs(100));
        let plain = read(r#"{"Message":"not a list"}"#).await.unwrap();
        assert!(plain.list.is_none());
        assert_eq!(plain.retain_for, Some(Duration::from_secs(620)));
        assert_eq!(read("[{").await.err(), Some(RecordError::Corrupt));
    }

    #[test]
    fn an_unstored_or_spent_entry_has_no_record() {
        let config = CacheConfig {
            full_refresh_interval: Duration::ZERO,
            ..cache(30, 5)
        };
        let now = Instant::now() + Duration::from_secs(3600);
        let mut e = entry(now, "[]");
        e.list = None;
        assert!(encode(&key("1"), &e, None, &config, now + Duration::from_secs(700)).is_none());
        e.lifetime = None;
        assert!(encode(&key("1"), &e, None, &config, now).is_none());
    }
}
