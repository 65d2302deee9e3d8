//! `miralix-gateway cache list|purge|refresh`: a client of the admin listener's `/cache`
//! endpoints for operators at a shell, printing a readable table (or the JSON with `--json`).
//!
//! The admin token comes from `--token-file` or `$MIRALIX_GATEWAY_ADMIN_TOKEN`, never from the
//! command line (where `ps` would show it).

use std::path::Path;
use std::time::Duration;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

/// The environment variable holding the admin token.
pub const TOKEN_ENV: &str = "MIRALIX_GATEWAY_ADMIN_TOKEN";

/// What to ask the admin listener.
#[derive(Debug, Clone)]
pub enum Action {
    List {
        account: Option<String>,
        limit: Option<u64>,
    },
    /// `subject`: `(kind, name)`: an agent (`id 103`), a queue (`queue 4`) or the directory
    /// (`directory`, no name).
    Purge {
        account: Option<String>,
        subject: Option<(String, Option<String>)>,
    },
    /// `kind` and `name` as for a purge; the directory has no name.
    Refresh {
        account: String,
        kind: String,
        name: Option<String>,
    },
}

/// The admin path of one subject under `/cache/{account}/`.
fn subject_path(kind: &str, name: Option<&str>) -> Result<String, ControlError> {
    match (kind, name) {
        ("queue", Some(id)) => Ok(format!("queues/{}", segment(id))),
        ("directory", None) => Ok("agents".to_owned()),
        ("queue" | "directory", _) => Err(ControlError::Subject(kind.to_owned())),
        (id_type, Some(identification)) => Ok(format!(
            "agents/{}/{}",
            segment(id_type),
            segment(identification)
        )),
        (other, None) => Err(ControlError::Subject(other.to_owned())),
    }
}

/// Why a cache command failed; `Display` is what the operator reads.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no admin token: pass --token-file <file> or set ${TOKEN_ENV}")]
    NoToken,
    #[error("cannot read the token file {0}: {1}")]
    TokenFile(String, std::io::Error),
    #[error(
        "--admin must be an http:// URL of the admin listener (e.g. http://127.0.0.1:9091), not {0:?}"
    )]
    AdminUrl(String),
    #[error("cannot reach the admin listener at {0}: {1}")]
    Unreachable(String, String),
    #[error("the gateway answered {0}: {1}")]
    Refused(u16, String),
    #[error(
        "\"{0}\" does not name what to act on: give an agent as TYPE IDENTIFICATION (sipUri, id, email or syncId), a queue as `queue QUEUE_ID`, or `directory`"
    )]
    Subject(String),
}

/// The token from `file`, or the environment; one trailing newline ignored.
pub fn token(file: Option<&Path>) -> Result<String, ControlError> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| ControlError::TokenFile(path.display().to_string(), e))?,
        None => std::env::var(TOKEN_ENV).map_err(|_| ControlError::NoToken)?,
    };
    let token = text.trim_end_matches(['\r', '\n']).to_owned();
    match token.is_empty() {
        true => Err(ControlError::NoToken),
        false => Ok(token),
    }
}

fn segment(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

/// Run `action` against the admin listener at `admin`; the answer, printed as text or JSON.
pub async fn run(
    admin: &str,
    token: &str,
    action: &Action,
    json: bool,
) -> Result<String, ControlError> {
    let base = admin.trim_end_matches('/');
    if !base.starts_with("http://") {
        return Err(ControlError::AdminUrl(admin.to_owned()));
    }
    let (method, path) = match action {
        Action::List { account, limit } => {
            let mut path = match account {
                Some(account) => format!("/cache/{}", segment(account)),
                None => "/cache".to_owned(),
            };
            if let Some(limit) = limit {
                path.push_str(&format!("?limit={limit}"));
            }
            (reqwest::Method::GET, path)
        }
        Action::Purge { account, subject } => {
            let path = match (account, subject) {
                (Some(account), Some((kind, name))) => format!(
                    "/cache/{}/{}",
                    segment(account),
                    subject_path(kind, name.as_deref())?
                ),
                (Some(account), None) => format!("/cache/{}", segment(account)),
                _ => "/cache".to_owned(),
            };
            (reqwest::Method::DELETE, path)
        }
        Action::Refresh {
            account,
            kind,
            name,
        } => (
            reqwest::Method::POST,
            format!(
                "/cache/{}/{}/refresh",
                segment(account),
                subject_path(kind, name.as_deref())?
            ),
        ),
    };
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(crate::upstream::trust::plain_http_config())
        .timeout(Duration::from_secs(120))
        .no_proxy()
        .build()
        .map_err(|e| ControlError::Unreachable(base.to_owned(), e.to_string()))?;
    let response = client
        .request(method, format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| ControlError::Unreachable(base.to_owned(), chain(&e)))?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .map_err(|e| ControlError::Unreachable(base.to_owned(), e.to_string()))?;
    let value: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    if status >= 400 {
        let message = value["error"].as_str().unwrap_or(body.trim());
        return Err(ControlError::Refused(status, message.to_owned()));
    }
    if json {
        return Ok(serde_json::to_string_pretty(&value).unwrap_or(body));
    }
    Ok(match action {
        Action::List { .. } => table(&value),
        Action::Purge { .. } => {
            let shared = value["purged_shared"]
                .as_u64()
                .map_or_else(String::new, |n| format!(", {n} from the shared tier"));
            format!(
                "purged {} entries from this instance's memory{shared}",
                value["purged"]
            )
        }
        Action::Refresh { .. } => {
            let recordings = value["recordings"]
                .as_u64()
                .map_or_else(String::new, |n| format!("{n} recordings, "));
            format!(
                "refreshed: the box answered {}, {recordings}{} bytes ({} filtered entries dropped)",
                value["status"], value["bytes"], value["purged"]
            )
        }
    })
}

/// An error and its causes, `: `-separated.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// The listing as aligned columns.
fn table(value: &serde_json::Value) -> String {
    let header = [
        "ACCOUNT",
        "TYPE",
        "IDENTIFICATION",
        "STATUS",
        "BYTES",
        "RECORDINGS",
        "AGE",
        "TTL",
        "STATE",
    ];
    let mut rows = vec![header.map(str::to_owned).to_vec()];
    for entry in value["entries"].as_array().into_iter().flatten() {
        let text = |key: &str| match &entry[key] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "-".to_owned(),
            other => other.to_string(),
        };
        let identification = match entry["from_queue_call_id"].as_u64() {
            Some(from) => format!("{} ?fromQueueCallId={from}", text("identification")),
            None => text("identification"),
        };
        rows.push(vec![
            text("account"),
            text("type"),
            identification,
            text("status"),
            text("bytes"),
            text("recordings"),
            format!("{}s", text("age_seconds")),
            format!("{}s", text("ttl_seconds")),
            text("state"),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "{} of {} entries",
        value["listed"], value["total"]
    ));
    out
}
