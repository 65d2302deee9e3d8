//! The operator's view: the cache listing (JSON and its page) and the status page, rendered
//! by a real headless Chromium.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

fn bearer() -> String {
    format!("Bearer {ADMIN_TOKEN}")
}

async fn listing(gateway: &Gateway, target: &str) -> Reply {
    request(
        gateway.admin,
        "GET",
        target,
        &[("authorization", &bearer())],
    )
    .await
}

#[tokio::test]
async fn the_cache_listing_shows_every_entry_to_the_token_holder_only() {
    let gateway = Gateway::start(Options::default()).await;
    for id in ["103", "1", "9999"] {
        gateway.get(&path("id", id)).await;
    }
    // Each list counted once parsed, after its answer.
    gateway.settled().await;
    let refused = request(gateway.admin, "GET", "/cache", &[]).await;
    assert_eq!(refused.status, 401);
    let challenges: Vec<&str> = refused
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("www-authenticate"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(
        challenges.iter().any(|c| c.starts_with("Bearer")),
        "{challenges:?}"
    );
    assert!(
        challenges.iter().any(|c| c.starts_with("Basic")),
        "{challenges:?}"
    );
    assert!(!refused.text().contains("103"));

    let all = listing(&gateway, "/cache").await;
    assert_eq!(all.status, 200, "{}", all.text());
    let body = all.json();
    assert_eq!(body["total"], 3);
    let entries = body["entries"].as_array().unwrap();
    let ids: Vec<&str> = entries
        .iter()
        .map(|e| e["identification"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["1", "103", "9999"]);
    let derek = &entries[1];
    assert_eq!(derek["account"], ACCOUNT);
    assert_eq!(derek["type"], "id");
    assert_eq!(derek["status"], 200);
    assert_eq!(derek["state"], "fresh");
    assert_eq!(derek["ttl_seconds"], 30);
    let list = gateway.get(&path("id", "103")).await;
    assert_eq!(derek["bytes"], list.body.len());
    assert_eq!(
        derek["recordings"],
        list.json().as_array().unwrap().len(),
        "as many recordings as the list holds"
    );
    assert_eq!(entries[2]["status"], 404);
    assert!(entries[2]["recordings"].is_null());

    gateway.clock.advance(Duration::from_secs(31));
    let later = listing(&gateway, &format!("/cache/{ACCOUNT}?limit=2"))
        .await
        .json();
    assert_eq!(
        (later["total"].as_u64(), later["listed"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(later["entries"][1]["state"], "stale");
    assert_eq!(later["entries"][1]["age_seconds"], 31);

    for (target, status) in [
        ("/cache?limit=0", 400),
        ("/cache?limit=lots", 400),
        ("/cache?colour=red", 400),
        ("/cache?account=nobody", 404),
        ("/cache/nobody", 404),
    ] {
        let reply = listing(&gateway, target).await;
        assert_eq!(reply.status, status, "{target}: {}", reply.text());
    }
    let by_param = listing(&gateway, &format!("/cache?account={ACCOUNT}"))
        .await
        .json();
    assert_eq!(by_param["total"], 3);

    // A browser sends the token as a Basic password, and gets the page.
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("ops:{ADMIN_TOKEN}"))
    );
    let page = request(
        gateway.admin,
        "GET",
        &format!("/cache/{ACCOUNT}?format=html"),
        &[("authorization", &basic)],
    )
    .await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.text().contains("<td>103</td>"), "{}", page.text());
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("ops:not-the-token")
    );
    let refused = request(gateway.admin, "GET", "/cache", &[("authorization", &wrong)]).await;
    assert_eq!(refused.status, 401);
}

/// Headless Chromium (Debian's `chromium`, which `.ci/run` installs).
fn chromium() -> &'static str {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return name;
        }
    }
    panic!("chromium is not installed: apt-get install chromium (.ci/run installs it)");
}

/// Load `url` in the browser, off the test's runtime thread (which serves the page).
async fn browse(url: &str, args: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    let mut command = Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    drop(profile);
    output
}

/// Where screenshots are kept after the run: `target/test-artifacts/`.
fn artifact(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[tokio::test]
async fn the_status_page_renders_in_a_real_browser() {
    let gateway = Gateway::start(Options::default()).await;
    gateway.get(&path("id", "103")).await;
    gateway.get(&path("id", "103")).await;
    // A second account whose box is unreachable: one failure opens its breaker.
    let text = format!(
        "{}\n[accounts.bluebox]\nbase_url = \"http://127.0.0.1:9\"\nshared_secret = \"blue-secret\"\nbreaker_failures = 1\n",
        gateway.config_text
    );
    gateway.reload_text(&text).await.unwrap();
    let failed = gateway.get("/mot/bluebox/agents/id/1/recordings").await;
    assert_eq!(failed.status, 502);

    let page = request(gateway.admin, "GET", "/", &[]).await;
    assert_eq!(page.status, 200);
    assert!(!page.text().contains(SECRET) && !page.text().contains("blue-secret"));

    let url = format!("http://{}/", gateway.admin);
    let dumped = browse(&url, &["--dump-dom"]).await;
    let dom = String::from_utf8_lossy(&dumped.stdout);
    assert!(
        dumped.status.success(),
        "{}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    let row = |account: &str| {
        let start = dom
            .find(&format!("<tr data-account=\"{account}\">"))
            .unwrap_or_else(|| panic!("no row for {account} in\n{dom}"));
        dom[start..start + dom[start..].find("</tr>").unwrap()].to_owned()
    };
    let green = row(ACCOUNT);
    assert!(green.contains("class=\"breaker closed\""), "{green}");
    assert!(green.contains("127.0.0.1:"), "the box's host: {green}");
    assert!(
        green.contains("<td>1 <small>(1 in all)</small></td>"),
        "one hit: {green}"
    );
    let blue = row("bluebox");
    assert!(blue.contains("class=\"breaker open\""), "{blue}");
    assert!(
        dom.contains("could not connect to the Miralix box"),
        "the error is listed"
    );
    assert!(dom.contains("href=\"/metrics\""));
    assert!(
        dom.contains(" in 1 entries"),
        "the cache's own count is current"
    );
    assert!(dom.contains(&format!("href=\"/cache/{ACCOUNT}?format=html\"")));
    assert!(
        dom.contains("<span id=\"audio\">none (streamed from the box)</span>"),
        "no [cache.audio] in this configuration"
    );

    for (name, size) in [
        ("status-laptop.png", "1280,800"),
        ("status-phone.png", "390,844"),
    ] {
        let path = artifact(name);
        let _ = std::fs::remove_file(&path);
        let shot = browse(
            &url,
            &[
                &format!("--screenshot={}", path.display()),
                &format!("--window-size={size}"),
            ],
        )
        .await;
        assert!(
            shot.status.success(),
            "{}",
            String::from_utf8_lossy(&shot.stderr)
        );
        let png = std::fs::read(&path).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 5_000,
            "{name}: {} bytes",
            png.len()
        );
    }
}

/// `miralix-gateway cache ...` against `gateway`, off the runtime thread that serves it.
async fn cache_cli(
    gateway: &Gateway,
    token: Option<&Path>,
    args: &[&str],
) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_miralix-gateway"));
    command
        .arg("cache")
        .args(["--admin", &format!("http://{}", gateway.admin)])
        .args(args)
        .env_remove("MIRALIX_GATEWAY_ADMIN_TOKEN");
    if let Some(token) = token {
        command.arg("--token-file").arg(token);
    }
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cache_command_lists_purges_and_refreshes_through_the_admin_api() {
    let gateway = Gateway::start(Options::default()).await;
    for id in ["103", "1"] {
        gateway.get(&path("id", id)).await;
    }
    let token = gateway.dir().join("cli.token");
    std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).unwrap();

    let (ok, table, err) = cache_cli(&gateway, Some(&token), &["list"]).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    let columns = |line: &str| {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        columns(lines[0])[..3],
        ["ACCOUNT", "TYPE", "IDENTIFICATION"],
        "{table}"
    );
    let derek = columns(lines[2]);
    assert_eq!(derek[..4], [ACCOUNT, "id", "103", "200"], "{table}");
    assert_eq!(derek.last().map(String::as_str), Some("fresh"));
    assert_eq!(*lines.last().unwrap(), "2 of 2 entries");

    let (ok, json, _) =
        cache_cli(&gateway, Some(&token), &["--json", "list", "--limit", "1"]).await;
    assert!(ok);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (value["listed"].as_u64(), value["total"].as_u64()),
        (Some(1), Some(2))
    );

    let (ok, refreshed, err) =
        cache_cli(&gateway, Some(&token), &["refresh", ACCOUNT, "id", "103"]).await;
    assert!(ok, "{err}");
    assert!(
        refreshed.starts_with("refreshed: the box answered 200"),
        "{refreshed}"
    );
    let (ok, purged, _) = cache_cli(&gateway, Some(&token), &["purge", ACCOUNT, "id", "1"]).await;
    assert!(ok);
    assert_eq!(
        purged.trim(),
        "purged 1 entries from this instance's memory"
    );

    let (ok, _, err) = cache_cli(&gateway, None, &["list"]).await;
    assert!(!ok);
    assert!(err.contains("no admin token: pass --token-file"), "{err}");
    let wrong = gateway.dir().join("wrong.token");
    std::fs::write(&wrong, "not-the-token").unwrap();
    let (ok, _, err) = cache_cli(&gateway, Some(&wrong), &["list"]).await;
    assert!(!ok);
    assert!(
        err.contains("the gateway answered 401: the admin token is not valid"),
        "{err}"
    );
    let (ok, _, err) = cache_cli(&gateway, Some(&token), &["purge", ACCOUNT, "id"]).await;
    assert!(!ok && err.contains("does not name what to act on"), "{err}");
    let (ok, _, err) = cache_cli(&gateway, Some(&token), &["purge", ACCOUNT, "queue"]).await;
    assert!(!ok && err.contains("`queue QUEUE_ID`"), "{err}");

    // Queues and the directory, by the same commands.
    let (ok, refreshed, err) =
        cache_cli(&gateway, Some(&token), &["refresh", ACCOUNT, "queue", "2"]).await;
    assert!(ok, "{err}");
    assert!(
        refreshed.starts_with("refreshed: the box answered 200"),
        "{refreshed}"
    );
    let (ok, table, _) = cache_cli(&gateway, Some(&token), &["list"]).await;
    assert!(ok && table.contains("queue"), "{table}");
    let (ok, purged, _) =
        cache_cli(&gateway, Some(&token), &["purge", ACCOUNT, "queue", "2"]).await;
    assert!(ok);
    assert_eq!(
        purged.trim(),
        "purged 1 entries from this instance's memory"
    );
    let (ok, refreshed, err) =
        cache_cli(&gateway, Some(&token), &["refresh", ACCOUNT, "directory"]).await;
    assert!(ok, "{err}");
    assert!(
        refreshed.starts_with("refreshed: the box answered 200, ") && refreshed.contains(" bytes"),
        "{refreshed}"
    );
    assert!(!refreshed.contains("recordings"), "{refreshed}");
    let (ok, purged, err) =
        cache_cli(&gateway, Some(&token), &["purge", ACCOUNT, "directory"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        purged.trim(),
        "purged 1 entries from this instance's memory"
    );
}
