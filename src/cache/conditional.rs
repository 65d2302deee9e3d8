//! Conditional requests: the strong entity tag of a stored list, and `If-None-Match`.
//!
//! A poller that sends back the `ETag` it got is answered `304 Not Modified` without the body
//! when the stored list is still the same bytes. Pure functions, no I/O.

use http::HeaderValue;

/// The strong entity tag of a body: the first 128 bits of its SHA-256, quoted. Equal bytes give
/// equal tags, whichever fetch stored them.
pub fn entity_tag(body: &[u8]) -> HeaderValue {
    let hex = crate::crypto::hex(&crate::crypto::sha256(body)[..16]);
    HeaderValue::try_from(format!("\"{hex}\"")).expect("hex digits in quotes")
}

/// Whether `If-None-Match` values (one per header line) match `etag`, comparing weakly as
/// RFC 9110 requires for this header: `W/"x"` matches `"x"`, and `*` matches any tag.
pub fn none_match(if_none_match: &[&[u8]], etag: &HeaderValue) -> bool {
    let ours = opaque(etag.as_bytes());
    if_none_match
        .iter()
        .flat_map(|value| EntityTags(value))
        .any(|tag| tag == Tag::Any || tag == Tag::Opaque(ours))
}

/// An entity tag as listed in `If-None-Match`.
#[derive(Debug, PartialEq, Eq)]
enum Tag<'a> {
    Any,
    /// The part between the quotes; weakness does not matter for weak comparison.
    Opaque(&'a [u8]),
}

fn opaque(tag: &[u8]) -> &[u8] {
    let tag = tag.strip_prefix(b"W/").unwrap_or(tag);
    tag.strip_prefix(b"\"")
        .and_then(|t| t.strip_suffix(b"\""))
        .unwrap_or(tag)
}

/// The entity tags of one header value, in order; stops at the first malformed element.
struct EntityTags<'a>(&'a [u8]);

impl<'a> Iterator for EntityTags<'a> {
    type Item = Tag<'a>;

    fn next(&mut self) -> Option<Tag<'a>> {
        let rest = self.0.trim_ascii_start();
        let rest = rest.strip_prefix(b",").unwrap_or(rest).trim_ascii_start();
        if let Some(after) = rest.strip_prefix(b"*") {
            self.0 = after;
            return Some(Tag::Any);
        }
        let rest = rest.strip_prefix(b"W/").unwrap_or(rest);
        // A quoted tag may contain commas, so find the closing quote rather than splitting.
        let inner = rest.strip_prefix(b"\"")?;
        let end = inner.iter().position(|b| *b == b'"')?;
        self.0 = &inner[end + 1..];
        Some(Tag::Opaque(&inner[..end]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_strong_stable_and_differ_by_content() {
        let a = entity_tag(b"[1,2,3]");
        assert_eq!(a, entity_tag(b"[1,2,3]"));
        assert_ne!(a, entity_tag(b"[1,2,4]"));
        let text = a.to_str().unwrap();
        assert!(
            text.starts_with('"') && text.ends_with('"') && text.len() == 34,
            "{text}"
        );
    }

    #[test]
    fn if_none_match_lists_are_compared_weakly() {
        let etag = HeaderValue::from_static("\"abc\"");
        let matches = |values: &[&str]| {
            let bytes: Vec<&[u8]> = values.iter().map(|v| v.as_bytes()).collect();
            none_match(&bytes, &etag)
        };
        assert!(matches(&["\"abc\""]));
        assert!(matches(&["W/\"abc\""]));
        assert!(matches(&["*"]));
        assert!(matches(&["\"x\", \"abc\""]));
        assert!(matches(&["\"x\"", "W/\"abc\""]));
        assert!(matches(&["\"a,b\", \"abc\""]), "a comma inside a tag");
        assert!(!matches(&["\"abcd\""]));
        assert!(!matches(&["abc"]), "unquoted is malformed");
        assert!(!matches(&[""]));
        assert!(!matches(&["\"x\", abc"]));
    }
}
