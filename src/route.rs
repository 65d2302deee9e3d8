//! Parse an incoming request target into a typed [`Route`].
//!
//! The gateway proxies exactly one route,
//! `/mot/{account}/agents/{identificationType}/{identification}/recordings[?fromQueueCallId=N]`,
//! so anything else is refused here, before the cache or the box is involved. The raw path is
//! split on `/` first and each segment is percent-decoded once afterwards, so an encoded slash
//! stays inside its segment and is then refused by the identification rules.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use crate::identity::{IdType, IdentityError, truncate_for_message};

/// Longest request path considered at all; longer targets are refused before any decoding.
pub const MAX_PATH_BYTES: usize = 2048;

/// The query parameter the API understands; matched case-insensitively like the box does.
pub const FROM_QUEUE_CALL_ID: &str = "fromQueueCallId";

/// A request for one agent's recordings list, already normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingsRequest<'a> {
    /// The `{account}` segment, decoded; the caller checks it is configured.
    pub account: Cow<'a, str>,
    pub query: AgentQuery,
}

/// Which list of one account to fetch: everything but the account, in canonical form.
/// Part of the cache key, and all the upstream client needs to build its URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentQuery {
    pub id_type: IdType,
    /// Canonical identification (see [`crate::identity`]).
    pub identification: Box<str>,
    /// `fromQueueCallId`, when given.
    pub from_queue_call_id: Option<u64>,
}

/// What a request target turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    Recordings(RecordingsRequest<'a>),
}

/// Why a request target was refused. `Display` is the message sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Not a path this gateway serves; it is never forwarded.
    #[error(
        "no such route: the gateway serves only GET /mot/{{account}}/agents/{{identificationType}}/{{identification}}/recordings"
    )]
    NotFound,
    #[error("the request path is longer than {MAX_PATH_BYTES} bytes")]
    PathTooLong,
    #[error("the {segment} path segment is not valid percent-encoded UTF-8")]
    BadEncoding { segment: &'static str },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(
        "invalid fromQueueCallId \"{0}\": expected a non-negative integer (0 to 18446744073709551615)"
    )]
    FromQueueCallId(String),
    #[error("fromQueueCallId is given more than once; give it at most once")]
    RepeatedFromQueueCallId,
}

/// Parse a request path and optional query string.
pub fn parse<'a>(path: &'a str, query: Option<&str>) -> Result<Route<'a>, RouteError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(RouteError::PathTooLong);
    }
    // Exactly seven segments, the first empty (the path starts with '/'); no allocation.
    let mut segments = path.split('/');
    let mut next = || segments.next().ok_or(RouteError::NotFound);
    let (root, mot, account, agents) = (next()?, next()?, next()?, next()?);
    let (id_type, identification, recordings) = (next()?, next()?, next()?);
    if segments.next().is_some()
        || !root.is_empty()
        || mot != "mot"
        || agents != "agents"
        || recordings != "recordings"
        || account.is_empty()
    {
        return Err(RouteError::NotFound);
    }
    let account = decode(account, "account")?;
    // An account name is one plain path segment; anything else cannot be a configured account.
    if account
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(RouteError::NotFound);
    }
    let id_type = IdType::parse(&decode(id_type, "identificationType")?)?;
    let identification = id_type.normalize(&decode(identification, "identification")?)?;
    Ok(Route::Recordings(RecordingsRequest {
        account,
        query: AgentQuery {
            id_type,
            identification: identification.into_boxed_str(),
            from_queue_call_id: parse_query(query)?,
        },
    }))
}

fn decode<'a>(segment: &'a str, name: &'static str) -> Result<Cow<'a, str>, RouteError> {
    percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| RouteError::BadEncoding { segment: name })
}

/// Pick `fromQueueCallId` out of the query; every other parameter is ignored and not forwarded.
fn parse_query(query: Option<&str>) -> Result<Option<u64>, RouteError> {
    let mut found = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if !key.eq_ignore_ascii_case(FROM_QUEUE_CALL_ID) {
            continue;
        }
        if found.is_some() {
            return Err(RouteError::RepeatedFromQueueCallId);
        }
        let parsed = value
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| value.parse::<u64>().ok())
            .flatten()
            .ok_or_else(|| RouteError::FromQueueCallId(truncate_for_message(&value)))?;
        found = Some(parsed);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recordings<'a>(path: &'a str, query: Option<&str>) -> RecordingsRequest<'a> {
        match parse(path, query) {
            Ok(Route::Recordings(r)) => r,
            Err(e) => panic!("{path} refused: {e}"),
        }
    }

    #[test]
    fn parses_the_documented_examples() {
        let r = recordings("/mot/greenbox/agents/id/103/recordings", None);
        assert_eq!(r.account, "greenbox");
        assert_eq!(r.query.id_type, IdType::Id);
        assert_eq!(&*r.query.identification, "103");
        assert_eq!(r.query.from_queue_call_id, None);

        let r = recordings(
            "/mot/12986/agents/sipUri/sip:lp1@company.local/recordings",
            Some("fromQueueCallId=47610"),
        );
        assert_eq!(r.account, "12986");
        assert_eq!(&*r.query.identification, "sip:lp1@company.local");
        assert_eq!(r.query.from_queue_call_id, Some(47610));
    }

    #[test]
    fn segments_are_decoded_once() {
        let r = recordings(
            "/mot/greenbox/agents/EMAIL/Derek.A%40Company.Local/recordings",
            None,
        );
        assert_eq!(&*r.query.identification, "derek.a@company.local");
        let r = recordings(
            "/mot/greenbox/agents/sipUri/%3Csip%3Alp1%40company.local%3E/recordings",
            None,
        );
        assert_eq!(&*r.query.identification, "sip:lp1@company.local");
        // Double encoding decodes to a literal `%40`, which is no '@'.
        assert!(parse("/mot/g/agents/email/a%2540b.c/recordings", None).is_err());
    }

    #[test]
    fn query_handling() {
        let q = |q: &str| parse("/mot/g/agents/id/1/recordings", Some(q));
        let from = |q: &str| match parse("/mot/g/agents/id/1/recordings", Some(q)) {
            Ok(Route::Recordings(r)) => r.query.from_queue_call_id,
            Err(e) => panic!("{q}: {e}"),
        };
        assert_eq!(from("fromQueueCallId=0"), Some(0));
        assert_eq!(from("fromQueueCallId=007"), Some(7));
        assert_eq!(from("FROMQUEUECALLID=5"), Some(5));
        assert_eq!(from("other=1&x"), None);
        assert_eq!(from(""), None);
        for bad in [
            "fromQueueCallId=",
            "fromQueueCallId=-1",
            "fromQueueCallId=1.5",
            "fromQueueCallId=abc",
            "fromQueueCallId=+1",
            "fromQueueCallId=%201",
            "fromQueueCallId=18446744073709551616",
        ] {
            assert!(
                matches!(q(bad), Err(RouteError::FromQueueCallId(_))),
                "{bad}"
            );
        }
        assert_eq!(
            q("fromQueueCallId=1&fromqueuecallid=2"),
            Err(RouteError::RepeatedFromQueueCallId)
        );
    }

    #[test]
    fn foreign_paths_are_not_found() {
        for path in [
            "/",
            "/mot",
            "/mot/greenbox/agents",
            "/mot/greenbox/agents/id/103",
            "/mot/greenbox/agents/id/103/recordings/",
            "/mot/greenbox/agents/id/103/recording",
            "/mot/greenbox/queues/1/calls/recordings",
            "/mot//agents/id/103/recordings",
            "//mot/greenbox/agents/id/103/recordings",
            "/MOT/greenbox/agents/id/103/recordings",
            "mot/greenbox/agents/id/103/recordings",
            "/mot/green%2Fbox/agents/id/103/recordings",
            "/mot/greenbox/agents/id/103/../recordings",
        ] {
            assert_eq!(parse(path, None), Err(RouteError::NotFound), "{path}");
        }
    }

    #[test]
    fn bad_segments_are_client_errors() {
        for path in [
            "/mot/g/agents/email/a%2Fb@c.d/recordings",
            "/mot/g/agents/email/a%5Cb@c.d/recordings",
            "/mot/g/agents/email/a%00b@c.d/recordings",
            "/mot/g/agents/email/a%0D%0Ab@c.d/recordings",
            "/mot/g/agents/id/../recordings",
            "/mot/g/agents/id/%2E%2E/recordings",
            "/mot/g/agents/email/%FF@c.d/recordings",
            "/mot/g/agents/phone/123/recordings",
        ] {
            let err = parse(path, None).unwrap_err();
            assert_ne!(err, RouteError::NotFound, "{path}");
        }
        let long = format!("/mot/g/agents/id/{}/recordings", "1".repeat(MAX_PATH_BYTES));
        assert_eq!(parse(&long, None), Err(RouteError::PathTooLong));
    }
}
