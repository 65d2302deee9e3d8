//! Allowlisted reads: the routes an account's `[[accounts.<name>.passthrough]]` table names
//! beyond the ones the gateway serves itself (see [`crate::config::PassthroughRoute`]),
//! matched segment by segment.
//!
//! A request's path is split on `/`
//! first and each segment is percent-decoded once, then checked against its placeholder's
//! kind, so nothing a pattern does not describe (an encoded slash, a dot segment, a control
//! character) can match. Query parameters are allowed by name, each with its own check; a
//! parameter not listed is refused. What matches is rebuilt in canonical form (the literal
//! segments as configured, the parameters in the pattern's order), which is both the cache key
//! and the path the box is asked for.

use std::borrow::Cow;
use std::time::Duration;

use percent_encoding::percent_decode_str;

use crate::config::{Check, PassthroughRoute, Segment};
use crate::identity::truncate_for_message;

impl Check {
    /// The value as passed on, if it passes.
    pub fn accept<'a>(&self, value: &'a str) -> Option<Cow<'a, str>> {
        let token = |s: &str| {
            (1..=64).contains(&s.len())
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        match self {
            Check::Int => (!value.is_empty()
                && value.len() <= 19
                && value.bytes().all(|b| b.is_ascii_digit()))
            .then(|| value.parse::<u64>().ok())
            .flatten()
            .map(|n| Cow::Owned(n.to_string())),
            Check::Guid => {
                let groups: Vec<&str> = value.split('-').collect();
                let lengths = groups.iter().map(|g| g.len()).collect::<Vec<_>>();
                (lengths == [8, 4, 4, 4, 12]
                    && groups
                        .iter()
                        .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit())))
                .then(|| Cow::Owned(value.to_ascii_lowercase()))
            }
            Check::Token => token(value).then_some(Cow::Borrowed(value)),
            Check::OneOf(values) => values
                .iter()
                .any(|v| v == value)
                .then_some(Cow::Borrowed(value)),
        }
    }

    /// What it accepts, for messages.
    pub fn describe(&self) -> String {
        match self {
            Check::Int => "a decimal integer".to_owned(),
            Check::Guid => "a GUID".to_owned(),
            Check::Token => "1 to 64 of A-Z a-z 0-9 . _ -".to_owned(),
            Check::OneOf(values) => format!("one of {}", values.join(", ")),
        }
    }
}

/// A request that matched a route: the canonical target under `/mot/{account}/` (encoded,
/// with its query) and the route's TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub target: String,
    pub ttl: Duration,
}

/// Why an allowlisted path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassthroughError {
    #[error("query parameter \"{name}\" is not allowed on {route}; allowed: {allowed}")]
    Unknown {
        name: String,
        route: String,
        allowed: String,
    },
    #[error("query parameter \"{0}\" is given more than once")]
    Repeated(String),
    #[error("query parameter \"{name}\" must be {expected}, not \"{value}\"")]
    Invalid {
        name: String,
        value: String,
        expected: String,
    },
}

/// Bytes escaped when a canonical segment or value is put back into a path.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The first of `routes` that `rest` (the raw path after `/mot/{account}/`) and `query`
/// match; `Ok(None)` when none matches the path.
pub fn find(
    routes: &[PassthroughRoute],
    rest: &str,
    query: Option<&str>,
) -> Result<Option<Matched>, PassthroughError> {
    let raw: Vec<&str> = rest.split('/').collect();
    let Some(decoded) = raw
        .iter()
        .map(|s| percent_decode_str(s).decode_utf8().ok())
        .collect::<Option<Vec<Cow<'_, str>>>>()
    else {
        return Ok(None);
    };
    for route in routes {
        if let Some(path) = match_path(&route.segments, &decoded) {
            let query = canonical_query(route, query)?;
            let target = match query {
                Some(query) => format!("{path}?{query}"),
                None => path,
            };
            return Ok(Some(Matched {
                target,
                ttl: route.ttl,
            }));
        }
    }
    Ok(None)
}

/// The canonical path, when every segment matches.
fn match_path(pattern: &[Segment], decoded: &[Cow<'_, str>]) -> Option<String> {
    if pattern.len() != decoded.len() {
        return None;
    }
    let mut path = String::new();
    for (segment, value) in pattern.iter().zip(decoded) {
        let accepted = match segment {
            Segment::Literal(literal) => (literal == value).then_some(Cow::Borrowed(&**value))?,
            Segment::Placeholder { check, .. } => check.accept(value)?,
        };
        if !path.is_empty() {
            path.push('/');
        }
        path.extend(percent_encoding::utf8_percent_encode(&accepted, SEGMENT));
    }
    Some(path)
}

/// The allowed parameters in the route's order, each checked; `None` without any.
fn canonical_query(
    route: &PassthroughRoute,
    query: Option<&str>,
) -> Result<Option<String>, PassthroughError> {
    let mut given: Vec<Option<String>> = vec![None; route.query.len()];
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let Some(index) = route
            .query
            .iter()
            .position(|(allowed, _)| allowed.eq_ignore_ascii_case(&name))
        else {
            let allowed: Vec<&str> = route.query.iter().map(|(n, _)| n.as_str()).collect();
            return Err(PassthroughError::Unknown {
                name: truncate_for_message(&name),
                route: route.text.clone(),
                allowed: match allowed.is_empty() {
                    true => "none".to_owned(),
                    false => allowed.join(", "),
                },
            });
        };
        let (allowed, check) = &route.query[index];
        if given[index].is_some() {
            return Err(PassthroughError::Repeated(allowed.clone()));
        }
        let accepted = check
            .accept(&value)
            .ok_or_else(|| PassthroughError::Invalid {
                name: allowed.clone(),
                value: truncate_for_message(&value),
                expected: check.describe(),
            })?;
        given[index] = Some(accepted.into_owned());
    }
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for ((name, _), value) in route.query.iter().zip(given) {
        if let Some(value) = value {
            serializer.append_pair(name, &value);
            any = true;
        }
    }
    Ok(any.then(|| serializer.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(pattern: &str, query: &[(&str, Check)], ttl: u64) -> PassthroughRoute {
        PassthroughRoute {
            text: pattern.to_owned(),
            segments: crate::config::parse_pattern(pattern).unwrap(),
            query: query
                .iter()
                .map(|(n, c)| ((*n).to_owned(), c.clone()))
                .collect(),
            ttl: Duration::from_secs(ttl),
        }
    }

    #[test]
    fn requests_match_segment_by_segment_and_queries_are_checked() {
        let routes = [
            route("/queues/{id:int}", &[], 30),
            route(
                "/agents/{sync:guid}/state",
                &[("view", Check::OneOf(vec!["short".into(), "long".into()]))],
                0,
            ),
            route("/settings/{name:token}", &[("page", Check::Int)], 5),
        ];
        let target = |rest: &str, query: Option<&str>| {
            find(&routes, rest, query).map(|m| m.map(|m| m.target))
        };
        assert_eq!(target("queues/7", None), Ok(Some("queues/7".into())));
        assert_eq!(target("queues/%37", None), Ok(Some("queues/7".into())));
        assert_eq!(target("queues/007", None), Ok(Some("queues/7".into())));
        assert_eq!(
            target(
                "agents/F4FD9E5F-017D-4350-ADF8-8DD811BC1A2E/state",
                Some("VIEW=long")
            ),
            Ok(Some(
                "agents/f4fd9e5f-017d-4350-adf8-8dd811bc1a2e/state?view=long".into()
            ))
        );
        assert_eq!(
            target("settings/a.b", Some("page=2")),
            Ok(Some("settings/a.b?page=2".into()))
        );
        for unmatched in [
            "queues/x",
            "queues/7/",
            "queues",
            "queues/7/8",
            "queues/%2F",
            "queues/1%2F2",
            "settings/..",
            "settings/%2E%2E",
            "settings/a%00b",
            "settings/a%2Fb",
            "settings/%FF",
            "QUEUES/7",
            "agents/not-a-guid/state",
        ] {
            assert_eq!(target(unmatched, None), Ok(None), "{unmatched}");
        }
        assert!(matches!(
            target("queues/7", Some("x=1")),
            Err(PassthroughError::Unknown { .. })
        ));
        assert!(matches!(
            target("settings/a", Some("page=1&page=2")),
            Err(PassthroughError::Repeated(_))
        ));
        assert!(matches!(
            target("settings/a", Some("page=-1")),
            Err(PassthroughError::Invalid { .. })
        ));
        assert!(matches!(
            target(
                "agents/f4fd9e5f-017d-4350-adf8-8dd811bc1a2e/state",
                Some("view=all")
            ),
            Err(PassthroughError::Invalid { .. })
        ));
    }
}
