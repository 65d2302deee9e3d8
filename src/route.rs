//! Parse an incoming request target into a typed [`Route`].
//!
//! The gateway proxies two routes, the recordings list
//! `/mot/{account}/agents/{identificationType}/{identification}/recordings[?fromQueueCallId=N]`
//! and the audio of one recording `/mot/{account}/queues/calls/recordings/{queueCallId}`, so
//! anything else is refused here, before the cache or the box is involved. The admin
//! listener's cache paths ([`parse_cache_target`]) name agents the same way. The raw path is
//! split on `/` first and each segment is percent-decoded once afterwards, so an encoded slash
//! stays inside its segment and is then refused by the identification rules.

pub mod passthrough;

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use crate::identity::{IdType, IdentityError, truncate_for_message};

/// Longest request path considered at all; longer targets are refused before any decoding.
pub const MAX_PATH_BYTES: usize = 2048;

/// The query parameter the API understands; matched case-insensitively like the box does.
pub const FROM_QUEUE_CALL_ID: &str = "fromQueueCallId";

/// A request for one cached list, already normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest<'a> {
    /// The `{account}` segment, decoded; the caller checks it is configured.
    pub account: Cow<'a, str>,
    pub query: ListQuery,
}

/// Whose list a request names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// One agent's recordings: `/agents/{identificationType}/{identification}/recordings`.
    Agent {
        id_type: IdType,
        /// Canonical identification (see [`crate::identity`]).
        identification: Box<str>,
    },
    /// One queue's recordings: `/queues/{queueId}/calls/recordings`.
    Queue(u64),
    /// The agent directory, `/agents[?state=..]`: the `state` value as given, which the
    /// gateway checks against the account's allowlist and spells as that list does; `None`
    /// for a bare `/agents` (the box lists the logged-in agents then).
    Directory(Option<Box<str>>),
    /// An allowlisted read (see [`passthrough`]): its canonical target under
    /// `/mot/{account}/`, query included.
    Passthrough(Box<str>),
}

impl std::fmt::Display for Subject {
    /// For messages: `id 103`, `queue 4`, `directory`, `directory state=any`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Agent {
                id_type,
                identification,
            } => write!(f, "{} {identification}", id_type.as_str()),
            Subject::Queue(id) => write!(f, "queue {id}"),
            Subject::Directory(None) => f.write_str("directory"),
            Subject::Directory(Some(state)) => write!(f, "directory state={state}"),
            Subject::Passthrough(target) => write!(f, "passthrough {target}"),
        }
    }
}

impl Subject {
    /// The kind and the name, for listings: (`id`, `103`), (`queue`, `4`), (`directory`,
    /// `any`; empty for a bare `/agents`).
    pub fn parts(&self) -> (&'static str, std::borrow::Cow<'_, str>) {
        match self {
            Subject::Agent {
                id_type,
                identification,
            } => (id_type.as_str(), Cow::Borrowed(identification)),
            Subject::Queue(id) => ("queue", Cow::Owned(id.to_string())),
            Subject::Directory(state) => {
                ("directory", Cow::Borrowed(state.as_deref().unwrap_or("")))
            }
            Subject::Passthrough(target) => ("passthrough", Cow::Borrowed(target)),
        }
    }

    /// Whether the box's answer is a recordings list (parsed, selected from, refreshed by
    /// delta) rather than opaque JSON.
    pub fn is_recordings(&self) -> bool {
        matches!(self, Subject::Agent { .. } | Subject::Queue(_))
    }
}

/// Which list of one account to fetch: everything but the account, in canonical form.
/// Part of the cache key, and all the upstream client needs to build its URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListQuery {
    pub subject: Subject,
    /// `fromQueueCallId`, when given (never for the directory).
    pub from_queue_call_id: Option<u64>,
}

/// What a request target turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// A list served from the cache: an agent's or a queue's recordings, or the directory.
    List(ListRequest<'a>),
    /// An allowlisted read, with how long its `200` is stored.
    Passthrough(ListRequest<'a>, std::time::Duration),
    /// The audio file of one recording.
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
    /// `/cache/{account}/agents/{identificationType}/{identification}` (one agent's entries),
    /// `/cache/{account}/queues/{queueId}` (one queue's) or `/cache/{account}/agents` (the
    /// directory's, every `state`).
    Subject(ListRequest<'a>),
    /// An agent's, a queue's or the directory's (`/cache/{account}/agents`) path plus
    /// `/refresh`.
    Refresh(ListRequest<'a>),
    /// `/cache/{account}/recordings/{queueCallId}`: one recording in the audio store.
    Recording {
        account: Cow<'a, str>,
        queue_call_id: u64,
    },
}

/// Why a request target was refused. `Display` is the message sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Not a path this gateway serves; it is never forwarded.
    #[error(
        "no such route: the gateway serves GET /mot/{{account}}/agents/{{identificationType}}/{{identification}}/recordings, /mot/{{account}}/queues/{{queueId}}/calls/recordings, /mot/{{account}}/agents and /mot/{{account}}/queues/calls/recordings/{{queueCallId}}, and the reads an account's passthrough table names"
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
    #[error("invalid queueId \"{0}\": expected a non-negative integer")]
    QueueId(String),
    #[error("the agent directory takes only the query parameter state (given once), not \"{0}\"")]
    DirectoryQuery(String),
}

/// Parse a request path and optional query string.
pub fn parse<'a>(path: &'a str, query: Option<&str>) -> Result<Route<'a>, RouteError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(RouteError::PathTooLong);
    }
    // At most seven segments, the first empty (the path starts with '/'); no allocation.
    let mut segments = Segments(Some(path));
    let mut next = || segments.next().ok_or(RouteError::NotFound);
    let (root, mot, account, fourth) = (next()?, next()?, next()?, next()?);
    if !root.is_empty() || mot != "mot" {
        return Err(RouteError::NotFound);
    }
    let rest: [Option<&str>; 4] = std::array::from_fn(|_| segments.next());
    let request = |account, subject, from_queue_call_id| {
        Ok(Route::List(ListRequest {
            account,
            query: ListQuery {
                subject,
                from_queue_call_id,
            },
        }))
    };
    match (fourth, rest) {
        ("agents", [None, ..]) => {
            let account = account_name(account)?;
            request(account, Subject::Directory(directory_state(query)?), None)
        }
        (
            "agents",
            [
                Some(id_type),
                Some(identification),
                Some("recordings"),
                None,
            ],
        ) => {
            let mut list = agent(account, id_type, identification)?;
            list.query.from_queue_call_id = parse_query(query)?;
            Ok(Route::List(list))
        }
        ("queues", [Some(queue_id), Some("calls"), Some("recordings"), None]) => {
            let account = account_name(account)?;
            let queue = number(queue_id, "queueId", RouteError::QueueId)?;
            request(account, Subject::Queue(queue), parse_query(query)?)
        }
        ("queues", [Some("calls"), Some("recordings"), Some(id), None]) => {
            let account = account_name(account)?;
            let queue_call_id = number(id, "queueCallId", RouteError::QueueCallId)?;
            Ok(Route::Audio {
                account,
                queue_call_id,
            })
        }
        _ => Err(RouteError::NotFound),
    }
}

/// The `/`-separated segments of a path, like `str::split('/')`. A byte scan: on paths this
/// short, `split`'s character searcher costs the hit path several times more (by callgrind's
/// count).
struct Segments<'a>(Option<&'a str>);

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.0?;
        match rest.bytes().position(|b| b == b'/') {
            Some(slash) => {
                self.0 = Some(&rest[slash + 1..]);
                Some(&rest[..slash])
            }
            None => self.0.take(),
        }
    }
}

/// A decimal id segment: digits only, within `u64`.
fn number(
    segment: &str,
    name: &'static str,
    invalid: fn(String) -> RouteError,
) -> Result<u64, RouteError> {
    let id = decode(segment, name)?;
    id.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| id.parse::<u64>().ok())
        .flatten()
        .ok_or_else(|| invalid(truncate_for_message(&id)))
}

/// The directory's `state` parameter, if given; any other parameter is refused, since the box
/// would be asked something the cache key does not say.
fn directory_state(query: Option<&str>) -> Result<Option<Box<str>>, RouteError> {
    let mut state = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if !key.eq_ignore_ascii_case("state") || state.is_some() {
            return Err(RouteError::DirectoryQuery(truncate_for_message(&key)));
        }
        state = Some(value.into_owned().into_boxed_str());
    }
    Ok(state)
}

/// Parse an admin cache path: `/cache`, `/cache/{account}`,
/// `/cache/{account}/agents/{identificationType}/{identification}[/refresh]`,
/// `/cache/{account}/queues/{queueId}[/refresh]` or `/cache/{account}/agents` (the
/// directory). An agent is normalized exactly as on the public route, so any spelling names
/// the stored entries.
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
    let queue = |account, id| -> Result<ListRequest<'_>, RouteError> {
        Ok(ListRequest {
            account: account_name(account)?,
            query: ListQuery {
                subject: Subject::Queue(number(id, "queueId", RouteError::QueueId)?),
                from_queue_call_id: None,
            },
        })
    };
    let directory = |account| -> Result<ListRequest<'_>, RouteError> {
        Ok(ListRequest {
            account: account_name(account)?,
            query: ListQuery {
                subject: Subject::Directory(None),
                from_queue_call_id: None,
            },
        })
    };
    match segments[..] {
        [account] => Ok(CacheTarget::Account(account_name(account)?)),
        [account, "agents"] => Ok(CacheTarget::Subject(directory(account)?)),
        [account, "agents", "refresh"] => Ok(CacheTarget::Refresh(directory(account)?)),
        [account, "agents", id_type, identification] => Ok(CacheTarget::Subject(agent(
            account,
            id_type,
            identification,
        )?)),
        [account, "agents", id_type, identification, "refresh"] => Ok(CacheTarget::Refresh(agent(
            account,
            id_type,
            identification,
        )?)),
        [account, "queues", id] => Ok(CacheTarget::Subject(queue(account, id)?)),
        [account, "queues", id, "refresh"] => Ok(CacheTarget::Refresh(queue(account, id)?)),
        [account, "recordings", id] => Ok(CacheTarget::Recording {
            account: account_name(account)?,
            queue_call_id: number(id, "queueCallId", RouteError::QueueCallId)?,
        }),
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
    // Bytes first, so an all-ASCII name needs no character decoding; only a name beyond ASCII
    // can hold the other control characters (U+0080 to U+009F).
    if account
        .bytes()
        .any(|b| b == b'/' || b == b'\\' || b.is_ascii_control())
        || (!account.is_ascii() && account.chars().any(char::is_control))
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
) -> Result<ListRequest<'a>, RouteError> {
    let account = account_name(account)?;
    let id_type = IdType::parse(&decode(id_type, "identificationType")?)?;
    let identification = id_type.normalize(&decode(identification, "identification")?)?;
    Ok(ListRequest {
        account,
        query: ListQuery {
            subject: Subject::Agent {
                id_type,
                identification: identification.into_boxed_str(),
            },
            from_queue_call_id: None,
        },
    })
}

fn decode<'a>(segment: &'a str, name: &'static str) -> Result<Cow<'a, str>, RouteError> {
    // Most segments have nothing to decode, and a `&str` needs no second UTF-8 check.
    if !segment.bytes().any(|b| b == b'%') {
        return Ok(Cow::Borrowed(segment));
    }
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

    fn recordings<'a>(path: &'a str, query: Option<&str>) -> ListRequest<'a> {
        match parse(path, query) {
            Ok(Route::List(r)) => r,
            other => panic!("{path}: {other:?}"),
        }
    }

    /// The agent a request names.
    pub(super) fn agent_of(query: &ListQuery) -> (IdType, &str) {
        match &query.subject {
            Subject::Agent {
                id_type,
                identification,
            } => (*id_type, identification),
            other => panic!("not an agent: {other:?}"),
        }
    }

    #[test]
    fn parses_the_documented_examples() {
        let r = recordings("/mot/greenbox/agents/id/103/recordings", None);
        assert_eq!(r.account, "greenbox");
        assert_eq!(agent_of(&r.query), (IdType::Id, "103"));
        assert_eq!(r.query.from_queue_call_id, None);

        let r = recordings(
            "/mot/12986/agents/sipUri/sip:lp1@company.local/recordings",
            Some("fromQueueCallId=47610"),
        );
        assert_eq!(r.account, "12986");
        assert_eq!(agent_of(&r.query).1, "sip:lp1@company.local");
        assert_eq!(r.query.from_queue_call_id, Some(47610));
    }

    #[test]
    fn segments_are_decoded_once() {
        let r = recordings(
            "/mot/greenbox/agents/EMAIL/Derek.A%40Company.Local/recordings",
            None,
        );
        assert_eq!(agent_of(&r.query).1, "derek.a@company.local");
        let r = recordings(
            "/mot/greenbox/agents/sipUri/%3Csip%3Alp1%40company.local%3E/recordings",
            None,
        );
        assert_eq!(agent_of(&r.query).1, "sip:lp1@company.local");
        // Double encoding decodes to a literal `%40`, which is no '@'.
        assert!(parse("/mot/g/agents/email/a%2540b.c/recordings", None).is_err());
    }

    #[test]
    fn query_handling() {
        let q = |q: &str| parse("/mot/g/agents/id/1/recordings", Some(q));
        let from = |q: &str| match parse("/mot/g/agents/id/1/recordings", Some(q)) {
            Ok(Route::List(r)) => r.query.from_queue_call_id,
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
            "/mot/greenbox/agents/",
            "/mot/greenbox/agents/id",
            "/mot/greenbox/agents/id/103",
            "/mot/greenbox/agents/id/103/recordings/",
            "/mot/greenbox/agents/id/103/recording",
            "/mot/greenbox/queues/1/calls/recordings/",
            "/mot/greenbox/queues/1/calls",
            "/mot/greenbox/queues/1",
            "/mot/greenbox/queues",
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
    fn accounts_with_control_characters_or_slashes_are_not_found() {
        // Raw and encoded, ASCII controls and a C1 control (U+0085), a backslash.
        for account in [
            "a\tb", "a%09b", "a\u{85}b", "a%C2%85b", "a%5Cb", "a\\b", "a%2Fb",
        ] {
            let path = format!("/mot/{account}/agents/id/103/recordings");
            assert_eq!(parse(&path, None), Err(RouteError::NotFound), "{path}");
        }
        // Non-ASCII names that are not controls are names.
        let r = recordings("/mot/gr%C3%BCnbox/agents/id/103/recordings", None);
        assert_eq!(r.account, "grünbox");
        let r = recordings("/mot/grünbox/agents/id/103/recordings", None);
        assert_eq!(r.account, "grünbox");
    }

    /// Ids that are not decimal integers within 64 bits.
    const BAD_IDS: [&str; 7] = [
        "abc",
        "-1",
        "1.5",
        "%2E%2E",
        "99999999999999999999",
        "",
        "1%2F2",
    ];

    #[test]
    fn queue_lists_take_a_numeric_id_and_fromqueuecallid() {
        let r = recordings(
            "/mot/greenbox/queues/0007/calls/recordings",
            Some("fromQueueCallId=12"),
        );
        assert_eq!(r.query.subject, Subject::Queue(7));
        assert_eq!(r.query.from_queue_call_id, Some(12));
        for bad in BAD_IDS {
            let path = format!("/mot/greenbox/queues/{bad}/calls/recordings");
            assert!(
                matches!(parse(&path, None), Err(RouteError::QueueId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_directory_takes_only_a_state() {
        let state = |query: Option<&str>| {
            parse("/mot/g/agents", query).map(|r| match r {
                Route::List(r) => r.query.subject,
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(state(None), Ok(Subject::Directory(None)));
        assert_eq!(state(Some("")), Ok(Subject::Directory(None)));
        assert_eq!(
            state(Some("state=any")),
            Ok(Subject::Directory(Some("any".into())))
        );
        assert_eq!(
            state(Some("STATE=logged%49n")),
            Ok(Subject::Directory(Some("loggedIn".into())))
        );
        for bad in ["state=any&state=any", "x=1", "state=any&fromQueueCallId=1"] {
            let refused = state(Some(bad));
            assert!(
                matches!(refused, Err(RouteError::DirectoryQuery(_))),
                "{bad}: {refused:?}"
            );
        }
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
        for bad in BAD_IDS {
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
        let Ok(CacheTarget::Subject(agent)) =
            parse_cache_target("/cache/greenbox/agents/EMAIL/Derek.A%40Company.Local")
        else {
            panic!("an agent")
        };
        assert_eq!(agent_of(&agent.query).1, "derek.a@company.local");
        assert!(matches!(
            parse_cache_target("/cache/greenbox/agents/id/103/refresh"),
            Ok(CacheTarget::Refresh(_))
        ));
        let Ok(CacheTarget::Refresh(queue)) = parse_cache_target("/cache/g/queues/0042/refresh")
        else {
            panic!("a queue")
        };
        assert_eq!(queue.query.subject, Subject::Queue(42));
        let Ok(CacheTarget::Subject(directory)) = parse_cache_target("/cache/g/agents") else {
            panic!("the directory")
        };
        assert_eq!(directory.query.subject, Subject::Directory(None));
        let Ok(CacheTarget::Refresh(directory)) = parse_cache_target("/cache/g/agents/refresh")
        else {
            panic!("the directory's refresh")
        };
        assert_eq!(directory.query.subject, Subject::Directory(None));
        assert!(matches!(
            parse_cache_target("/cache/g/queues/x"),
            Err(RouteError::QueueId(_))
        ));
        assert_eq!(
            parse_cache_target("/cache/g/recordings/047610"),
            Ok(CacheTarget::Recording {
                account: "g".into(),
                queue_call_id: 47610
            })
        );
        assert!(matches!(
            parse_cache_target("/cache/g/recordings/%2E%2E"),
            Err(RouteError::QueueCallId(_))
        ));
        for path in [
            "/cachex",
            "/cache//",
            "/cache/g/queues/1/refresh/x",
            "/cache/g/queues",
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
            if let Ok(Route::List(request)) = parse(&path, query.as_deref()) {
                let (id_type, identification) = tests::agent_of(&request.query);
                let query_text = request
                    .query
                    .from_queue_call_id
                    .map(|n| format!("{FROM_QUEUE_CALL_ID}={n}"));
                let encoded = percent_encoding::utf8_percent_encode(
                    identification,
                    percent_encoding::NON_ALPHANUMERIC,
                )
                .to_string();
                let canonical = format!(
                    "/mot/{}/agents/{}/{encoded}/recordings",
                    percent_encoding::utf8_percent_encode(&request.account, percent_encoding::NON_ALPHANUMERIC),
                    id_type.as_str(),
                );
                let again = parse(&canonical, query_text.as_deref());
                prop_assert_eq!(again, Ok(Route::List(request.clone())));
            }
            let _ = parse_cache_target(&format!("/cache/{account}/agents/{kind}/{identification}"));
        }

        #[test]
        fn segments_split_like_str_split(path in "[a/%\u{85}é]{0,12}") {
            let ours: Vec<&str> = Segments(Some(&path)).collect();
            prop_assert_eq!(ours, path.split('/').collect::<Vec<_>>());
        }
    }
}
