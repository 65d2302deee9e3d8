//! Which part of a stored recording a request gets: `Range` (one byte range), `If-Range`,
//! `If-None-Match` and `If-Modified-Since`, decided from the request's headers and the
//! recording's length and validators. Pure, no I/O.

use std::time::SystemTime;

use http::HeaderMap;
use http::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, RANGE};

use crate::cache::conditional;

/// What to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// `200` with the whole body.
    Whole,
    /// `206` with bytes `start..end` (end exclusive).
    Part { start: u64, end: u64 },
    /// `416`: the range starts at or past the end.
    Unsatisfiable,
    /// `304`: the client's copy is current.
    NotModified,
}

/// The validators a stored recording is served with.
#[derive(Debug, Clone, Copy)]
pub struct Validators<'a> {
    pub etag: &'a str,
    pub last_modified: SystemTime,
}

/// Decide what a request with `headers` gets of a body of `length` bytes.
///
/// As a cache does (RFC 9110 13.2.2): `If-None-Match` first (else `If-Modified-Since`),
/// then `Range`, honoured only when `If-Range` is absent or still matches. A `Range` that is
/// not one well-formed byte range is ignored (the whole body), as the RFC allows; a list of
/// ranges is answered whole too, rather than as multipart.
pub fn select(headers: &HeaderMap, length: u64, validators: Validators<'_>) -> Selection {
    let if_none_match: Vec<&[u8]> = headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let etag = http::HeaderValue::from_str(validators.etag).ok();
    if !if_none_match.is_empty() {
        if etag.is_some_and(|etag| conditional::none_match(&if_none_match, &etag)) {
            return Selection::NotModified;
        }
    } else if let Some(since) = header_date(headers.get(IF_MODIFIED_SINCE))
        && seconds(validators.last_modified) <= seconds(since)
    {
        return Selection::NotModified;
    }
    let Some(range) = headers.get(RANGE).and_then(|v| v.to_str().ok()) else {
        return Selection::Whole;
    };
    if let Some(if_range) = headers.get(IF_RANGE) {
        let current = match if_range.to_str() {
            // A strong comparison: a weak tag never matches.
            Ok(tag) if tag.starts_with('"') => tag == validators.etag,
            Ok(_) => header_date(Some(if_range))
                .is_some_and(|date| seconds(date) == seconds(validators.last_modified)),
            Err(_) => false,
        };
        if !current {
            return Selection::Whole;
        }
    }
    byte_range(range, length)
}

/// One `bytes=` range against a body of `length` bytes.
pub fn byte_range(header: &str, length: u64) -> Selection {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Selection::Whole;
    };
    let Some((first, last)) = spec.split_once('-').filter(|_| !spec.contains(',')) else {
        return Selection::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if first.is_empty() {
        // The last `suffix` bytes.
        if !digits(last) {
            return Selection::Whole;
        }
        return match last.parse::<u64>() {
            Ok(suffix) if suffix > 0 && length > 0 => Selection::Part {
                start: length.saturating_sub(suffix),
                end: length,
            },
            _ => Selection::Unsatisfiable,
        };
    }
    let Some(start) = Some(first)
        .filter(|s| digits(s))
        .and_then(|s| s.parse().ok())
    else {
        return Selection::Whole;
    };
    let end = if last.is_empty() {
        length
    } else {
        match Some(last)
            .filter(|s| digits(s))
            .and_then(|s| s.parse::<u64>().ok())
        {
            Some(last) if last >= start => last.saturating_add(1).min(length),
            _ => return Selection::Whole,
        }
    };
    if start >= length {
        Selection::Unsatisfiable
    } else {
        Selection::Part { start, end }
    }
}

fn header_date(value: Option<&http::HeaderValue>) -> Option<SystemTime> {
    httpdate::parse_http_date(value?.to_str().ok()?).ok()
}

/// HTTP dates have whole seconds.
fn seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderValue;

    use super::*;

    fn part(start: u64, end: u64) -> Selection {
        Selection::Part { start, end }
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(byte_range("bytes=0-99", 1000), part(0, 100));
        assert_eq!(byte_range("bytes=900-", 1000), part(900, 1000));
        assert_eq!(byte_range("bytes=900-5000", 1000), part(900, 1000));
        assert_eq!(byte_range("bytes=-100", 1000), part(900, 1000));
        assert_eq!(byte_range("bytes=-5000", 1000), part(0, 1000));
        assert_eq!(byte_range("bytes=999-999", 1000), part(999, 1000));
        assert_eq!(byte_range("bytes=1000-", 1000), Selection::Unsatisfiable);
        assert_eq!(byte_range("bytes=-0", 1000), Selection::Unsatisfiable);
        assert_eq!(byte_range("bytes=0-", 0), Selection::Unsatisfiable);
        for ignored in [
            "bytes=5-1",
            "bytes=0-1,5-9",
            "items=0-1",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=1",
            "bytes=-",
            "bytes=18446744073709551616-",
        ] {
            assert_eq!(byte_range(ignored, 1000), Selection::Whole, "{ignored}");
        }
    }

    #[test]
    fn conditionals_come_before_the_range() {
        let modified = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let validators = Validators {
            etag: "\"mgw-5-1000\"",
            last_modified: modified,
        };
        let select_with = |pairs: &[(http::HeaderName, &str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.append(name.clone(), HeaderValue::from_str(value).unwrap());
            }
            select(&headers, 1000, validators)
        };
        let date = httpdate::fmt_http_date(modified);
        let earlier = httpdate::fmt_http_date(modified - Duration::from_secs(60));
        assert_eq!(select_with(&[]), Selection::Whole);
        assert_eq!(select_with(&[(RANGE, "bytes=0-9")]), part(0, 10));
        assert_eq!(
            select_with(&[(IF_NONE_MATCH, "\"other\", \"mgw-5-1000\"")]),
            Selection::NotModified
        );
        assert_eq!(
            select_with(&[(IF_NONE_MATCH, "\"other\""), (IF_MODIFIED_SINCE, &date)]),
            Selection::Whole,
            "If-Modified-Since is ignored beside If-None-Match"
        );
        assert_eq!(
            select_with(&[(IF_MODIFIED_SINCE, &date)]),
            Selection::NotModified
        );
        assert_eq!(
            select_with(&[(IF_MODIFIED_SINCE, &earlier)]),
            Selection::Whole
        );
        assert_eq!(
            select_with(&[(RANGE, "bytes=0-9"), (IF_RANGE, "\"mgw-5-1000\"")]),
            part(0, 10)
        );
        assert_eq!(
            select_with(&[(RANGE, "bytes=0-9"), (IF_RANGE, "W/\"mgw-5-1000\"")]),
            Selection::Whole
        );
        assert_eq!(
            select_with(&[(RANGE, "bytes=0-9"), (IF_RANGE, &date)]),
            part(0, 10)
        );
        assert_eq!(
            select_with(&[(RANGE, "bytes=0-9"), (IF_RANGE, &earlier)]),
            Selection::Whole
        );
        assert_eq!(
            select_with(&[(RANGE, "bytes=5000-")]),
            Selection::Unsatisfiable
        );
    }
}
