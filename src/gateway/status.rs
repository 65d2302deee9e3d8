//! The operator's view on the admin listener: the status page (`GET /`, HTML rendered here,
//! refreshing itself, no script), the cache listing (`GET /cache[/{account}]`: JSON, or HTML
//! with `?format=html`), and what they show that metrics do not keep: recent box errors and
//! the counters of the last minutes.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response};
use http_body_util::Full;

use super::AppState;
use crate::cache::listing::Listed;

/// Box errors each account keeps for the status page.
const KEPT_ERRORS: usize = 10;
/// The "recent" window of the status page's counters.
pub(super) const WINDOW: Duration = Duration::from_secs(5 * 60);
/// How often the counters are sampled for that window.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// The last few box errors of an account, newest first.
#[derive(Debug, Default)]
pub struct RecentErrors(Mutex<VecDeque<(SystemTime, String)>>);

impl RecentErrors {
    pub(super) fn record(&self, reason: String) {
        let mut errors = self.0.lock().unwrap_or_else(|e| e.into_inner());
        errors.push_front((SystemTime::now(), reason));
        errors.truncate(KEPT_ERRORS);
    }

    fn list(&self) -> Vec<(SystemTime, String)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// An account's answer counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    hits: u64,
    misses: u64,
    stale: u64,
}

impl Totals {
    fn since(self, earlier: Totals) -> Totals {
        Totals {
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            stale: self.stale.saturating_sub(earlier.stale),
        }
    }
}

/// Samples of every account's counters over the last [`WINDOW`].
#[derive(Debug, Default)]
pub struct Samples(Mutex<HashMap<String, VecDeque<(Instant, Totals)>>>);

impl Samples {
    fn push(&self, account: &str, totals: Totals, now: Instant) {
        let mut samples = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let series = samples.entry(account.to_owned()).or_default();
        series.push_back((now, totals));
        while series
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > WINDOW)
        {
            series.pop_front();
        }
    }

    /// The oldest sample within the window, if any.
    fn oldest(&self, account: &str) -> Option<(Instant, Totals)> {
        let samples = self.0.lock().unwrap_or_else(|e| e.into_inner());
        samples.get(account)?.front().copied()
    }
}

fn totals(account: &super::Account) -> Totals {
    let m = &account.metrics;
    Totals {
        hits: m.hits.get(),
        misses: m.misses.get() + m.coalesced.get(),
        stale: m.stale_revalidate.get() + m.stale_error.get(),
    }
}

impl AppState {
    /// Sample every account's counters (every [`SAMPLE_EVERY`], from the server).
    pub(super) fn sample(&self) {
        let now = Instant::now();
        for (name, account) in &self.generation().accounts {
            self.samples.push(name, totals(account), now);
        }
    }
}

/// Text for HTML: `<`, `>`, `&` and quotes escaped.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `3h 12m`, `45s`: a duration for people.
fn human(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 if seconds.is_multiple_of(60) => format!("{}m", seconds / 60),
        60..3600 => format!("{}m {}s", seconds / 60, seconds % 60),
        3600..86400 => format!("{}h {}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d {}h", seconds / 86400, seconds % 86400 / 3600),
    }
}

fn bytes(n: u64) -> String {
    bytesize::ByteSize(n).to_string()
}

/// RFC 3339 UTC seconds, for the time of an error.
fn when(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:0 auto;max-width:72em;padding:1em;color:#222}\
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .4em}\
.wrap{overflow-x:auto}table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid #ddd;white-space:nowrap}\
th{background:#f4f4f4}.closed{color:#17692b}.open{color:#b00020;font-weight:bold}\
.half-open{color:#a05a00}.up{color:#17692b}.down{color:#b00020;font-weight:bold}\
small,.muted{color:#666}ul{padding-left:1.2em}li{margin:.2em 0;word-break:break-word}\
@media (max-width:40em){body{font-size:14px;padding:.5em}th,td{padding:.25em .4em}}";

fn page(title: &str, refresh: bool, body: &str) -> Response<Full<Bytes>> {
    let refresh = match refresh {
        true => "<meta http-equiv=\"refresh\" content=\"5\">",
        false => "",
    };
    let html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{refresh}\
<title>{}</title><style>{STYLE}</style></head><body>{body}</body></html>",
        escape(title)
    );
    let mut response = Response::new(Full::new(Bytes::from(html)));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Nothing on the page runs or loads from elsewhere.
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    response
}

/// `GET /`: version, uptime, the cache tier, and one row per account.
pub(super) fn status_page(state: &AppState) -> Response<Full<Bytes>> {
    let generation = state.generation();
    let mut names: Vec<&String> = generation.accounts.keys().collect();
    names.sort();
    let shares = state.cache.shares();
    let now = Instant::now();
    let tier = match state.cache.tier() {
        Some(tier) => format!(
            "{}: <span class=\"{state}\">{state}</span>",
            tier.name(),
            state = tier.state()
        ),
        None => "none (memory only)".to_owned(),
    };
    let audio = match state.audio.get().map(|store| store.usage()) {
        Some((files, used, max)) => format!(
            "<span id=\"audio\">{files} recordings, {} (max {})</span>",
            bytes(used),
            bytes(max)
        ),
        None => "<span id=\"audio\">none (streamed from the box)</span>".to_owned(),
    };
    let mut body = format!(
        "<h1>miralix-gateway</h1><p>version {} &middot; up {} &middot; cache {} in {} entries \
(max {}) &middot; second tier {tier} &middot; audio store {audio}</p>\
<p><a href=\"/metrics\">/metrics</a> &middot; <a href=\"/readyz\">/readyz</a> &middot; \
cache listings (admin token) per account below</p>\
<h2>Accounts</h2><div class=\"wrap\"><table id=\"accounts\"><thead><tr><th>account</th>\
<th>box</th><th>breaker</th><th>in flight</th><th>hits</th><th>misses</th><th>stale</th>\
<th>cached entries</th><th>cached bytes</th></tr></thead><tbody>",
        env!("CARGO_PKG_VERSION"),
        human(now.duration_since(state.started_at)),
        bytes(state.cache.weighted_size()),
        state.cache.entry_count(),
        bytes(generation.config.cache.max_bytes),
    );
    let mut errors = String::new();
    for name in &names {
        let account = &generation.accounts[*name];
        let url = &account.settings.base_url;
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        let breaker = account.protection.state().as_str();
        let total = totals(account);
        // Since the oldest sample in the window, or since the start.
        let recent = match state.samples.oldest(name) {
            Some((_, then)) => total.since(then),
            None => total,
        };
        let share = shares.get(name.as_str()).copied().unwrap_or_default();
        let cell = |recent: u64, total: u64| format!("{recent} <small>({total} in all)</small>");
        let _ = write!(
            body,
            "<tr data-account=\"{n}\"><td><a href=\"/cache/{n}?format=html\">{n}</a></td>\
<td>{host}</td><td class=\"breaker {breaker}\">{breaker}</td><td>{}</td><td>{}</td><td>{}</td>\
<td>{}</td><td>{}</td><td>{}</td></tr>",
            account.protection.in_flight(),
            cell(recent.hits, total.hits),
            cell(recent.misses, total.misses),
            cell(recent.stale, total.stale),
            share.entries,
            bytes(share.bytes),
            n = escape(name),
            host = escape(&host),
        );
        let recent_errors = account.errors.list();
        if !recent_errors.is_empty() {
            let _ = write!(errors, "<h3>{}</h3><ul>", escape(name));
            for (at, reason) in recent_errors {
                let _ = write!(
                    errors,
                    "<li><span class=\"muted\">{}</span> {}</li>",
                    when(at),
                    escape(&reason)
                );
            }
            errors.push_str("</ul>");
        }
    }
    let _ = write!(
        body,
        "</tbody></table></div><p class=\"muted\">hits, misses (with requests that waited for \
another's fetch) and stale answers over the last {} (counted in all since the start); the page \
refreshes every 5 s.</p><h2>Recent box errors</h2>{}",
        human(WINDOW),
        if errors.is_empty() {
            "<p id=\"no-errors\">none</p>".to_owned()
        } else {
            errors
        }
    );
    page("miralix-gateway status", true, &body)
}

/// One listed entry as JSON.
pub(super) fn listed_json(row: &Listed) -> serde_json::Value {
    let query = &row.key.query;
    let (kind, name) = query.subject.parts();
    serde_json::json!({
        "account": &*row.key.account,
        "type": kind,
        "identification": name,
        "from_queue_call_id": query.from_queue_call_id,
        "status": row.status,
        "bytes": row.bytes,
        "recordings": row.recordings,
        "age_seconds": row.age.as_secs(),
        "ttl_seconds": row.ttl_left.as_secs(),
        "state": row.state,
    })
}

/// The cache listing of one account as a page.
pub(super) fn listing_page(account: &str, rows: &[Listed], total: usize) -> Response<Full<Bytes>> {
    let mut body = format!(
        "<h1>Cache of {a}</h1><p><a href=\"/\">status</a> &middot; {} of {total} entries \
&middot; <a href=\"/cache/{a}\">JSON</a></p><div class=\"wrap\"><table id=\"entries\"><thead><tr>\
<th>type</th><th>identification</th><th>status</th><th>bytes</th><th>recordings</th>\
<th>age</th><th>ttl</th><th>state</th></tr></thead><tbody>",
        rows.len(),
        a = escape(account),
    );
    for row in rows {
        let query = &row.key.query;
        let (kind, name) = query.subject.parts();
        let identification = match query.from_queue_call_id {
            Some(from) => format!("{name} (fromQueueCallId={from})"),
            None => name.into_owned(),
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            kind,
            escape(&identification),
            row.status,
            bytes(row.bytes as u64),
            row.recordings.map_or_else(String::new, |n| n.to_string()),
            human(row.age),
            human(row.ttl_left),
            row.state,
        );
    }
    body.push_str("</tbody></table></div>");
    page(&format!("cache of {account}"), false, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_errors_keep_the_newest_few_and_text_is_escaped() {
        let errors = RecentErrors::default();
        for n in 0..15 {
            errors.record(format!("failure {n}"));
        }
        let list = errors.list();
        assert_eq!(list.len(), KEPT_ERRORS);
        assert_eq!(list[0].1, "failure 14");
        assert_eq!(escape("<a href='x'>&"), "&lt;a href=&#39;x&#39;&gt;&amp;");
        assert_eq!(human(Duration::from_secs(3725)), "1h 2m");
    }

    #[test]
    fn the_window_starts_at_its_oldest_sample() {
        let samples = Samples::default();
        let start = Instant::now();
        let at = |s| start + Duration::from_secs(s);
        let t = |hits| Totals {
            hits,
            misses: 0,
            stale: 0,
        };
        samples.push("a", t(1), at(0));
        samples.push("a", t(5), at(200));
        samples.push("a", t(9), at(400));
        let (when, oldest) = samples.oldest("a").unwrap();
        assert_eq!(
            (when, oldest),
            (at(200), t(5)),
            "the sample at 0 s left the window"
        );
        assert_eq!(t(12).since(oldest), t(7));
    }
}
