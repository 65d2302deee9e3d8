//! What the gateway knows about a recordings list: a JSON array that only grows, whose elements
//! carry a numeric `QueueCallId`.
//!
//! A full list is parsed once, when it is stored, into its elements: each element's id and its
//! exact bytes, sliced out of the upstream body (no field is re-serialized, reordered or
//! dropped). From that, `fromQueueCallId=N` is answered by selection ([`RecordingList::after`])
//! and a delta fetched with `fromQueueCallId=<highest id>` is appended
//! ([`RecordingList::merge`]). A body that is not an array, or has an element without a
//! numeric `QueueCallId`, is not a [`RecordingList`]: the caller caches it as plain bytes.

use std::collections::HashSet;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

/// A full recordings list: its elements in upstream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingList {
    elements: Vec<Element>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Element {
    id: u64,
    /// The element's JSON text exactly as the box sent it; shares the body's memory.
    raw: Bytes,
}

/// The one field the gateway reads from an element; every other field passes through untouched.
#[derive(Deserialize)]
struct QueueCallId {
    #[serde(rename = "QueueCallId")]
    id: u64,
}

impl RecordingList {
    /// The elements of a `200` body, or `None` when it is not an array of objects that each
    /// carry a non-negative integer `QueueCallId`.
    pub fn parse(body: &Bytes) -> Option<Self> {
        let raw: Vec<&RawValue> = serde_json::from_slice(body).ok()?;
        let mut elements = Vec::with_capacity(raw.len());
        for value in raw {
            let QueueCallId { id } = serde_json::from_str(value.get()).ok()?;
            // `RawValue::get` borrows from `body`, so this is a view, not a copy.
            let raw = body.slice_ref(value.get().as_bytes());
            elements.push(Element { id, raw });
        }
        Some(Self { elements })
    }

    /// Bytes the element index itself holds (the element texts are views into the body).
    pub fn index_bytes(&self) -> usize {
        self.elements.capacity() * std::mem::size_of::<Element>()
    }

    pub fn len(&self) -> usize {
        self.elements.len()
    }

    /// The highest `QueueCallId`: what a delta fetch asks for "everything after".
    pub fn max_id(&self) -> Option<u64> {
        self.elements.iter().map(|e| e.id).max()
    }

    /// The body answering `fromQueueCallId=from`: the elements whose id is greater, in upstream
    /// order. `None` when that is every element, so the stored body can be served as it is.
    pub fn after(&self, from: u64) -> Option<Bytes> {
        if self.elements.iter().all(|e| e.id > from) {
            return None;
        }
        Some(render(self.elements.iter().filter(|e| e.id > from)))
    }

    /// This list with a delta's new elements appended, and its body; `None` when the delta adds
    /// nothing, so the stored entry can be kept as it is.
    ///
    /// An element already present (same id) is not added twice: a box that ignored
    /// `fromQueueCallId` and sent everything merges to the same list.
    pub fn merge(&self, delta: &RecordingList) -> Option<(RecordingList, Bytes)> {
        let known: HashSet<u64> = self.elements.iter().map(|e| e.id).collect();
        let new: Vec<&Element> = delta
            .elements
            .iter()
            .filter(|e| !known.contains(&e.id))
            .collect();
        if new.is_empty() {
            return None;
        }
        let body = render(self.elements.iter().chain(new.iter().copied()));
        // Point the elements into the new body, so the old body and the delta's can be freed.
        let mut offset = 1;
        let elements = self
            .elements
            .iter()
            .chain(new)
            .map(|element| {
                let raw = body.slice(offset..offset + element.raw.len());
                offset += element.raw.len() + 1;
                Element {
                    id: element.id,
                    raw,
                }
            })
            .collect();
        Some((Self { elements }, body))
    }
}

/// `[e1,e2,...]` from element texts.
fn render<'a>(elements: impl Iterator<Item = &'a Element> + Clone) -> Bytes {
    let (count, bytes) = elements
        .clone()
        .fold((0, 0), |(n, b), e| (n + 1, b + e.raw.len()));
    let mut body = BytesMut::with_capacity(bytes + count + 2);
    body.extend_from_slice(b"[");
    for (index, element) in elements.enumerate() {
        if index > 0 {
            body.extend_from_slice(b",");
        }
        body.extend_from_slice(&element.raw);
    }
    body.extend_from_slice(b"]");
    body.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str) -> RecordingList {
        RecordingList::parse(&Bytes::copy_from_slice(text.as_bytes())).expect("a list")
    }

    const BODY: &str = r#"[ {"QueueId":1,"QueueCallId":10,"Caller":"+45 1"} ,
        {"QueueCallId":12, "Extra":{"nested":[1,2]},"Caller":"\u00e5"},{"QueueCallId":11}]"#;

    #[test]
    fn elements_keep_their_exact_bytes_and_order() {
        let l = list(BODY);
        assert_eq!(l.len(), 3);
        assert_eq!(l.max_id(), Some(12));
        assert_eq!(
            l.after(10).unwrap(),
            &br#"[{"QueueCallId":12, "Extra":{"nested":[1,2]},"Caller":"\u00e5"},{"QueueCallId":11}]"#[..]
        );
        assert_eq!(
            l.after(11).unwrap(),
            &br#"[{"QueueCallId":12, "Extra":{"nested":[1,2]},"Caller":"\u00e5"}]"#[..]
        );
        assert_eq!(l.after(12).unwrap(), &b"[]"[..]);
        assert_eq!(l.after(u64::MAX).unwrap(), &b"[]"[..]);
        assert_eq!(l.after(9), None, "every element: serve the stored body");
    }

    #[test]
    fn an_empty_list_is_a_list() {
        let l = list(" [ ] ");
        assert_eq!(l.len(), 0);
        assert_eq!(l.max_id(), None);
        assert_eq!(l.after(0), None);
    }

    #[test]
    fn anything_else_falls_back_to_plain_bytes() {
        for body in [
            r#"{"QueueCallId":1}"#,
            r#"[{"QueueCallId":"1"}]"#,
            r#"[{"QueueCallId":1.5}]"#,
            r#"[{"QueueCallId":-1}]"#,
            r#"[{"queueCallId":1}]"#,
            r#"[{"QueueCallId":1},{"Other":2}]"#,
            r#"[{"QueueCallId":1,"QueueCallId":2}]"#,
            r#"[1,2]"#,
            r#"[{"QueueCallId":1}"#,
            "",
        ] {
            assert!(
                RecordingList::parse(&Bytes::copy_from_slice(body.as_bytes())).is_none(),
                "{body}"
            );
        }
    }

    #[test]
    fn a_delta_is_appended_once() {
        let full = list(r#"[{"QueueCallId":1,"a":1},{"QueueCallId":3}]"#);
        let delta = list(r#"[{"QueueCallId":5, "b":2}]"#);
        let (merged, body) = full.merge(&delta).unwrap();
        assert_eq!(
            body,
            &br#"[{"QueueCallId":1,"a":1},{"QueueCallId":3},{"QueueCallId":5, "b":2}]"#[..]
        );
        assert_eq!(merged.max_id(), Some(5));
        assert!(
            merged
                .elements
                .iter()
                .all(|e| body.as_ptr_range().contains(&e.raw.as_ptr())),
            "the merged elements live in the merged body"
        );
        assert_eq!(merged, list(std::str::from_utf8(&body).unwrap()));
        assert!(full.merge(&list("[]")).is_none());
        assert!(
            full.merge(&full).is_none(),
            "a box that sent everything again"
        );
        let (_, body) = full
            .merge(&list(r#"[{"QueueCallId":3},{"QueueCallId":4}]"#))
            .unwrap();
        assert_eq!(
            body,
            &br#"[{"QueueCallId":1,"a":1},{"QueueCallId":3},{"QueueCallId":4}]"#[..]
        );
    }
}
