//! What a stored entry really costs in memory, for the cache's weigher.
//!
//! `cache.max_bytes` bounds the sum of these weights, so each must count what the entry keeps
//! alive, not only the bytes it serves: every allocation rounded up to the allocator's size
//! class, the parsed element index, the compressed copy, the headers, the key, and the fixed
//! bookkeeping of the entry and of moka around it. Bodies are copied into allocations of their
//! exact size when they arrive (in the upstream client), so no entry pins a larger buffer
//! that this could not see.

use std::mem::size_of;

use bytes::Bytes;
use http::HeaderValue;

use super::{CacheKey, CachedResponse};
use crate::route::Subject;

/// The fixed cost of one entry beyond its own allocations: moka's node, its entry metadata and
/// its places in the access order, write order and expiry timer wheel, the `Arc` headers and
/// the shared-buffer record behind each sliced `Bytes`. Measured: 20,000 stored `404`s raise the
/// resident set by about 840 bytes each, of which the entry's own allocations are about 250.
const BOOKKEEPING: usize = 640;

/// `len` bytes as the allocator hands them out: mimalloc rounds a request up to one of four
/// size classes per power of two (and to 8 bytes below 64), so up to a fifth more is held.
pub fn allocation(len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    if len <= 64 {
        return len.next_multiple_of(8);
    }
    // Four classes between 2^k and 2^(k+1): steps of 2^(k-2).
    let step = 1usize << (usize::BITS - 1 - len.leading_zeros()).saturating_sub(2);
    len.next_multiple_of(step)
}

fn bytes(body: &Bytes) -> usize {
    allocation(body.len())
}

fn header(value: &HeaderValue) -> usize {
    allocation(value.len())
}

/// The weight of one stored entry, in bytes.
pub fn entry(key: &CacheKey, value: &CachedResponse) -> u32 {
    let list = value
        .list
        .as_ref()
        .map_or(0, |l| allocation(l.recordings.index_bytes()));
    let gzip = value
        .gzip
        .as_ref()
        .map_or(0, |g| bytes(&g.body) + header(&g.etag));
    let total = BOOKKEEPING
        + size_of::<CacheKey>()
        + size_of::<CachedResponse>()
        + match &key.query.subject {
            Subject::Agent { identification, .. } => allocation(identification.len()),
            Subject::Directory(state) => state.as_ref().map_or(0, |s| allocation(s.len())),
            Subject::Passthrough(target) => allocation(target.len()),
            Subject::Queue(_) => 0,
        }
        + bytes(&value.body)
        + gzip
        + list
        + value.content_type.as_ref().map_or(0, header)
        + value.etag.as_ref().map_or(0, header);
    u32::try_from(total).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_round_up_to_a_size_class() {
        assert_eq!(allocation(0), 0);
        assert_eq!(allocation(1), 8);
        assert_eq!(allocation(64), 64);
        assert_eq!(allocation(65), 80);
        assert_eq!(allocation(16 * 1024), 16 * 1024);
        assert_eq!(allocation(16 * 1024 + 1), 20 * 1024);
        assert_eq!(allocation(17_564), 20 * 1024);
        for len in [100, 1000, 13_600, 1 << 20, (1 << 20) + 7] {
            let held = allocation(len);
            assert!(held >= len && held <= len + len / 4, "{len} -> {held}");
        }
    }
}
