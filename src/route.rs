//! Parse an incoming request target into a typed [`Route`].
//!
//! The gateway proxies two routes, the recordings list
//! `/mot/{account}/agents/{identificationType}/{identification}/recordings[?fromQueueCallId=N]`
//! and the audio of one recording `/mot/{account}/queues/calls/recordings/{queueCallId}`, so
//! anything else is refused here, before the cache or the box is involved. The admin
//! listener's cache paths ([`parse_cache_target`]) name agents the same way. The raw path is
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
    /// The audio file of one recording, streamed from the box.
    Audio {
        account: Cow<'a, str>,
        queue_call_id: u64,
    },
}

/// What an admin `/cache/...` path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheTarget<'a> {
    /// `/cache`: every entry.
    All,
    /// `/cache/{account}`: every entry of one account.
    Account(Cow<'a, str>),
    /// `/cache/{account}/agents/{identificationType}/{identification}`: one agent's entries.
    Agent(RecordingsRequest<'a>),
    /// The same path plus `/refresh`.
    AgentRefresh(RecordingsRequest<'a>),
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
    #[error("invalid queueCallId \"{0}\": expected a non-negative integer")]
    QueueCallId(String),
}

/// Parse a request path and optional query string.
pub fn parse<'a>(path: &'a str, query: Option<&str>) -> Result<Route<'a>, RouteError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(RouteError::PathTooLong);
    }
    // Exactly seven segments, the first empty (the path starts with '/'); no allocation.
    let mut segments = path.split('/');
    let mut next = || segments.next().ok_or(RouteError::NotFound);
    let (root, mot, account) = (next()?, next()?, next()?);
    let (fourth, fifth, sixth, seventh) = (next()?, next()?, next()?, next()?);
    if segments.next().is_some() || !root.is_empty() || mot != "mot" {
        return Err(RouteError::NotFound);
    }
    match (fourth, fifth, sixth) {
        ("agents", id_type, identification) if seventh == "recordings" => {
            let mut request = agent(account, id_type, identification)?;
            request.query.from_queue_call_id = parse_query(query)?;
            Ok(Route::Recordings(request))
        }
        ("queues", "calls", "recordings") => {
            let account = account_name(account)?;
            let id = decode(seventh, "queueCallId")?;
            let queue_call_id = id
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| id.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| RouteError::QueueCallId(truncate_for_message(&id)))?;
            Ok(Route::Audio {
                account,
                queue_call_id,
            })
        }
        _ => Err(RouteError::NotFound),
    }
}

/// Parse an admin cache path: `/cache`, `/cache/{account}`,
/// `/cache/{account}/agents/{identificationType}/{identification}[/refresh]`. The agent is
/// normalized exactly as on the public route, so any spelling names the stored entries.
pub fn parse_cache_target(path: &str) -> Result<CacheTarget<'_>, RouteError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(RouteError::PathTooLong);
    }
    let Some(rest) = path.strip_prefix("/cache") else {
        return Err(RouteError::NotFound);
    };
    if rest.is_empty() || rest == "/" {
        return Ok(CacheTarget::All);
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Err(RouteError::NotFound);
    };
    let segments: Vec<&str> = rest.splitn(6, '/').collect();
    match segments[..] {
        [account] => Ok(CacheTarget::Account(account_name(account)?)),
        [account, "agents", id_type, identification] => {
            Ok(CacheTarget::Agent(agent(account, id_type, identification)?))
        }
        [account, "agents", id_type, identification, "refresh"] => Ok(CacheTarget::AgentRefresh(
            agent(account, id_type, identification)?,
        )),
        _ => Err(RouteError::NotFound),
    }
}

/// The account segment, decoded; empty or not one plain segment is no account.
fn account_name(segment: &str) -> Result<Cow<'_, str>, RouteError> {
    if segment.is_empty() {
        return Err(RouteError::NotFound);
    }
    let account = decode(segment, "account")?;
    // An account name is one plain path segment; anything else cannot be a configured account.
    if account
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(RouteError::NotFound);
    }
    Ok(account)
}

/// One agent of one account, normalized; no `fromQueueCallId` yet.
fn agent<'a>(
    account: &'a str,
    id_type: &str,
    identification: &str,
) -> Result<RecordingsRequest<'a>, RouteError> {
    let account = account_name(account)?;
    let id_type = IdType::parse(&decode(id_type, "identificationType")?)?;
    let identification = id_type.normalize(&decode(identification, "identification")?)?;
    Ok(RecordingsRequest {
        account,
        query: AgentQuery {
            id_type,
            identification: identification.into_boxed_str(),
            from_queue_call_id: None,
        },
    })
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
            other => panic!("{path}: {other:?}"),
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
            other => panic!("{q}: {other:?}"),
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
            "/mot/greenbox/queues/calls/recordings",
            "/mot/greenbox/queues/calls/recordings/1/",
            "/mot/greenbox/queues/calls/recording/1",
            "/mot//queues/calls/recordings/1",
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

    #[test]
    fn audio_paths_take_a_numeric_id() {
        assert_eq!(
            parse("/mot/greenbox/queues/calls/recordings/47610", None),
            Ok(Route::Audio {
                account: "greenbox".into(),
                queue_call_id: 47610
            })
        );
        for bad in [
            "abc",
            "-1",
            "1.5",
            "%2E%2E",
            "99999999999999999999",
            "",
            "1%2F2",
        ] {
            let path = format!("/mot/greenbox/queues/calls/recordings/{bad}");
            assert!(
                matches!(parse(&path, None), Err(RouteError::QueueCallId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn cache_targets_normalize_like_the_route() {
        assert_eq!(parse_cache_target("/cache"), Ok(CacheTarget::All));
        assert_eq!(parse_cache_target("/cache/"), Ok(CacheTarget::All));
        assert_eq!(
            parse_cache_target("/cache/greenbox"),
            Ok(CacheTarget::Account("greenbox".into()))
        );
        let Ok(CacheTarget::Agent(agent)) =
            parse_cache_target("/cache/greenbox/agents/EMAIL/Derek.A%40Company.Local")
        else {
            panic!("an agent")
        };
        assert_eq!(&*agent.query.identification, "derek.a@company.local");
        assert!(matches!(
            parse_cache_target("/cache/greenbox/agents/id/103/refresh"),
            Ok(CacheTarget::AgentRefresh(_))
        ));
        for path in [
            "/cachex",
            "/cache//",
            "/cache/g/agents",
            "/cache/g/agents/id/1/x",
            "/metrics",
        ] {
            assert_eq!(
                parse_cache_target(path),
                Err(RouteError::NotFound),
                "{path}"
            );
        }
        assert!(matches!(
            parse_cache_target("/cache/g/agents/id/abc"),
            Err(RouteError::Identity(_))
        ));
    }
}

/// Property tests: any target is parsed or refused without panicking, and what is accepted is
/// canonical (parsing its canonical path again gives the same request).
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-zA-Z0-9@:._%-]{0,30}",
            prop::sample::select(vec![
                "%2F",
                "%2f",
                "%252F",
                "..",
                "%2E%2E",
                "%00",
                "%0D%0A",
                "%C0%AF",
                "%E2%80%8B",
                "sip:a@b",
                "103",
                "0103",
                "",
                "/",
                "//",
            ])
            .prop_map(str::to_owned),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parsing_is_total_and_canonical(
            kind in prop::sample::select(vec!["id", "EMAIL", "sipUri", "syncid", "phone", ""]),
            identification in segment(),
            account in segment(),
            query in prop::option::of(any::<String>()),
        ) {
            let path = format!("/mot/{account}/agents/{kind}/{identification}/recordings");
            if let Ok(Route::Recordings(request)) = parse(&path, query.as_deref()) {
                let query_text = request
                    .query
                    .from_queue_call_id
                    .map(|n| format!("{FROM_QUEUE_CALL_ID}={n}"));
                let encoded = percent_encoding::utf8_percent_encode(
                    &request.query.identification,
                    percent_encoding::NON_ALPHANUMERIC,
                )
                .to_string();
                let canonical = format!(
                    "/mot/{}/agents/{}/{encoded}/recordings",
                    percent_encoding::utf8_percent_encode(&request.account, percent_encoding::NON_ALPHANUMERIC),
                    request.query.id_type.as_str(),
                );
                let again = parse(&canonical, query_text.as_deref());
                prop_assert_eq!(again, Ok(Route::Recordings(request.clone())));
            }
            let _ = parse_cache_target(&format!("/cache/{account}/agents/{kind}/{identification}"));
        }
    }
}
