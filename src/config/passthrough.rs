//! `[[accounts.<name>.passthrough]]`: the allowlisted reads of one account, checked into
//! [`PassthroughRoute`]s. A pattern that would reach outside `/mot/{account}/`, or that names
//! a route the gateway serves itself, is refused here, at load time.

use std::time::Duration;

use super::validate::parse_duration;
use super::*;

/// What a placeholder segment or a query parameter accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// A decimal integer, 1 to 19 digits (passed on without leading zeros).
    Int,
    /// A GUID, `8-4-4-4-12` hex digits (matched in any case, passed on in lowercase).
    Guid,
    /// `[A-Za-z0-9._-]{1,64}`, but not `.` or `..`.
    Token,
    /// One of these values exactly (for query parameters).
    OneOf(Vec<String>),
}

impl Check {
    /// The kind named in a pattern (`int`, `guid`, `token`).
    pub fn named(kind: &str) -> Option<Self> {
        Some(match kind {
            "int" => Check::Int,
            "guid" => Check::Guid,
            "token" => Check::Token,
            _ => return None,
        })
    }
}

/// One segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    Placeholder { name: String, check: Check },
}

/// One allowlisted read of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthroughRoute {
    /// The pattern as configured, for messages.
    pub text: String,
    pub segments: Vec<Segment>,
    /// Allowed query parameters in canonical order, each with its check.
    pub query: Vec<(String, Check)>,
    /// How long a `200` is stored; zero: passed through, not stored.
    pub ttl: Duration,
}

/// Parse a configured pattern into segments. Refused: anything but a path of plain
/// segments under `/mot/{account}/` (a path naming another account, `..`, `.`, an empty
/// segment, `%`, `\`, a query or fragment) and unknown placeholder kinds.
pub fn parse_pattern(text: &str) -> Result<Vec<Segment>, String> {
    let relative = match text.strip_prefix("/mot/{account}/") {
        Some(rest) => rest,
        None if text.starts_with("/mot/") || text == "/mot" => {
            return Err(
                "names a path outside this account: write it relative to /mot/{account}/ (e.g. \"/queues/{id:int}\")"
                    .to_owned(),
            );
        }
        None => text.strip_prefix('/').ok_or_else(|| {
            "must start with '/' and be a path under /mot/{account}/, e.g. \"/queues/{id:int}\""
                .to_owned()
        })?,
    };
    if relative.is_empty() {
        return Err("names no path under /mot/{account}/".to_owned());
    }
    relative
        .split('/')
        .map(|segment| {
            if segment.is_empty() {
                return Err("has an empty segment (\"//\" or a trailing '/')".to_owned());
            }
            if segment == "." || segment == ".." {
                return Err(format!(
                    "has a \"{segment}\" segment, which would leave the path it names"
                ));
            }
            if let Some(inner) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let (name, kind) = inner.split_once(':').ok_or_else(|| {
                    format!("placeholder {segment} needs a kind: {{name:int}}, {{name:guid}} or {{name:token}}")
                })?;
                let check = Check::named(kind).ok_or_else(|| {
                    format!("placeholder {segment}: unknown kind \"{kind}\"; use int, guid or token")
                })?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(format!("placeholder {segment} needs a name of letters, digits and '_'"));
                }
                return Ok(Segment::Placeholder {
                    name: name.to_owned(),
                    check,
                });
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-~".contains(&b))
            {
                return Err(format!(
                    "segment \"{}\" may only contain letters, digits, '.', '_', '-' and '~' (or be a placeholder such as {{id:int}})",
                    segment.escape_debug()
                ));
            }
            Ok(Segment::Literal(segment.to_owned()))
        })
        .collect()
}

/// Every route of one account, each problem recorded under its entry's key.
pub(super) fn validate_passthrough(
    prefix: &str,
    raw: Vec<RawPassthrough>,
    problems: &mut Problems,
) -> Option<Vec<PassthroughRoute>> {
    let mut routes = Vec::with_capacity(raw.len());
    let mut ok = true;
    for (n, entry) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("{prefix}.passthrough[{n}].{field}");
        match route(entry) {
            Ok(route)
                if routes
                    .iter()
                    .any(|r: &PassthroughRoute| r.segments == route.segments) =>
            {
                problems.push(key("path"), format!("\"{}\" is listed twice", route.text));
                ok = false;
            }
            Ok(route) => routes.push(route),
            Err((field, message)) => {
                problems.push(key(field), message);
                ok = false;
            }
        }
    }
    ok.then_some(routes)
}

/// One entry, or the field it fails on and why.
fn route(raw: RawPassthrough) -> Result<PassthroughRoute, (&'static str, String)> {
    let text = raw.path.ok_or((
        "path",
        "missing: the route under /mot/{account}/, e.g. \"/queues/{id:int}\"".to_owned(),
    ))?;
    let segments =
        passthrough::parse_pattern(&text).map_err(|e| ("path", format!("\"{text}\" {e}")))?;
    if served_by_the_gateway(&segments) {
        return Err((
            "path",
            format!(
                "\"{text}\" is a route the gateway serves itself (and caches by its own rules); remove it"
            ),
        ));
    }
    let ttl = match raw.ttl.as_deref() {
        Some(ttl) => parse_duration(ttl).map_err(|e| ("ttl", e))?,
        None => {
            return Err((
                "ttl",
                "missing: how long a 200 is stored, e.g. \"30s\"; \"0s\" passes it through uncached"
                    .to_owned(),
            ));
        }
    };
    let mut query = Vec::new();
    for (name, check) in raw.query.unwrap_or_default() {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return Err((
                "query",
                format!("\"{}\" is not a parameter name", name.escape_debug()),
            ));
        }
        let check = match check {
            RawCheck::Kind(kind) => Check::named(&kind).ok_or_else(|| {
                ("query", format!("{name}: unknown kind \"{kind}\"; use int, guid, token or a list of the values allowed"))
            })?,
            RawCheck::Values(values) if values.is_empty() => {
                return Err(("query", format!("{name}: the list of values allowed is empty")));
            }
            RawCheck::Values(values) => Check::OneOf(values),
        };
        query.push((name, check));
    }
    Ok(PassthroughRoute {
        text,
        segments,
        query,
        ttl,
    })
}

/// Whether a path the pattern matches could be one of the gateway's own routes (which it
/// serves, and caches, by its own rules): the directory `agents`, an agent's list
/// `agents/*/*/recordings`, a queue's list `queues/*/calls/recordings` and the audio
/// `queues/calls/recordings/*`. A test checks this against the router.
fn served_by_the_gateway(segments: &[Segment]) -> bool {
    let is = |n: usize, literal: &str| match &segments[n] {
        Segment::Literal(text) => text == literal,
        // Of the placeholders, only a token can spell a word.
        Segment::Placeholder { check, .. } => *check == Check::Token,
    };
    match segments.len() {
        1 => is(0, "agents"),
        4 => {
            (is(0, "agents") && is(3, "recordings"))
                || (is(0, "queues") && is(2, "calls") && is(3, "recordings"))
                || (is(0, "queues") && is(1, "calls") && is(2, "recordings"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_plain_paths_under_the_account() {
        assert_eq!(
            parse_pattern("/queues/{id:int}").unwrap(),
            vec![
                Segment::Literal("queues".into()),
                Segment::Placeholder {
                    name: "id".into(),
                    check: Check::Int
                }
            ]
        );
        assert_eq!(
            parse_pattern("/mot/{account}/queues").unwrap(),
            parse_pattern("/queues").unwrap()
        );
        for bad in [
            "queues",
            "/",
            "/mot/other/queues",
            "/mot",
            "/queues/../agents",
            "/queues/./x",
            "/queues//x",
            "/queues/",
            "/queues/%2e%2e",
            "/queues/a\\b",
            "/queues?x=1",
            "/queues#x",
            "/queues/{id}",
            "/queues/{id:float}",
            "/queues/{:int}",
            "http://elsewhere/queues",
        ] {
            assert!(parse_pattern(bad).is_err(), "{bad}");
        }
    }

    /// The rule agrees with the router: a pattern is refused exactly when a path it matches
    /// is one the router takes (serves, or refuses with its own error).
    #[test]
    fn the_routes_the_gateway_serves_itself_are_the_routers() {
        let words = ["agents", "queues", "calls", "recordings", "id", "x"];
        let placeholders = ["{a:int}", "{a:token}", "{a:guid}"];
        let mut segments: Vec<String> = words.iter().map(|w| (*w).to_owned()).collect();
        segments.extend(placeholders.iter().map(|p| (*p).to_owned()));
        let sample = |segment: &Segment, token: &str| match segment {
            Segment::Literal(text) => text.clone(),
            Segment::Placeholder {
                check: Check::Int, ..
            } => "1".to_owned(),
            Segment::Placeholder {
                check: Check::Guid, ..
            } => "f4fd9e5f-017d-4350-adf8-8dd811bc1a2e".to_owned(),
            Segment::Placeholder { .. } => token.to_owned(),
        };
        let mut patterns: Vec<Vec<String>> = Vec::new();
        for a in &segments {
            patterns.push(vec![a.clone()]);
            for b in &segments {
                for c in &segments {
                    for d in &segments {
                        patterns.push(vec![a.clone(), b.clone(), c.clone(), d.clone()]);
                    }
                }
            }
        }
        // What a token placeholder may spell at each position: every word a route has there.
        let spellings: [&[&str]; 4] = [
            &["agents", "queues"],
            &["calls", "x"],
            &["calls", "recordings", "x"],
            &["recordings", "x"],
        ];
        for pattern in patterns {
            let parsed = parse_pattern(&format!("/{}", pattern.join("/"))).unwrap();
            let mut paths: Vec<Vec<String>> = vec![Vec::new()];
            for (n, segment) in parsed.iter().enumerate() {
                let options: Vec<String> = match segment {
                    Segment::Placeholder {
                        check: Check::Token,
                        ..
                    } => spellings[n].iter().map(|w| (*w).to_owned()).collect(),
                    other => vec![sample(other, "")],
                };
                paths = paths
                    .into_iter()
                    .flat_map(|path| {
                        options.iter().map(move |option| {
                            let mut path = path.clone();
                            path.push(option.clone());
                            path
                        })
                    })
                    .collect();
            }
            let taken = paths.iter().any(|path| {
                !matches!(
                    crate::route::parse(&format!("/mot/a/{}", path.join("/")), None),
                    Err(crate::route::RouteError::NotFound)
                )
            });
            assert_eq!(served_by_the_gateway(&parsed), taken, "{pattern:?}");
        }
    }
}
