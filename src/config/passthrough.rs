//! `[[accounts.<name>.passthrough]]`: the allowlisted reads of one account, checked into
//! [`PassthroughRoute`]s. A pattern that would reach outside `/mot/{account}/`, or that names
//! a route the gateway serves itself, is refused here, at load time.

use super::validate::parse_duration;
use super::*;
use crate::route::passthrough::{self, Check, PassthroughRoute, Segment};

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

/// Whether a path the pattern matches would be taken by one of the gateway's own routes.
fn served_by_the_gateway(segments: &[Segment]) -> bool {
    let sample: Vec<&str> = segments
        .iter()
        .map(|segment| match segment {
            Segment::Literal(literal) => literal.as_str(),
            Segment::Placeholder {
                check: Check::Int, ..
            } => "1",
            Segment::Placeholder {
                check: Check::Guid, ..
            } => "f4fd9e5f-017d-4350-adf8-8dd811bc1a2e",
            Segment::Placeholder { .. } => "x",
        })
        .collect();
    let path = format!("/mot/account/{}", sample.join("/"));
    !matches!(
        crate::route::parse(&path, None),
        Err(crate::route::RouteError::NotFound)
    )
}
