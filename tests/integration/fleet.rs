//! The second tier against the real thing: several gateways sharing one `redis-server` in front
//! of one simulated box, and a gateway restarting on its disk tier.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use miralix_gateway::simulator::{Simulator, SimulatorTls};

use crate::support::redis::{Redis, free_port, signal};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_miralix-gateway");
const TIER_UP: &str = "miralix_gateway_cache_tier_up{tier=\"shared\"}";

/// `n` gateways on `redis` in front of `boxsim`; `account` adds lines to the account table.
async fn fleet(n: usize, redis: &Redis, boxsim: &Simulator, account: &str) -> Vec<Gateway> {
    let cache: &'static str = Box::leak(
        format!(
            "ttl = \"30s\"\nnegative_ttl = \"30s\"\n[cache.shared]\nurl = \"{}\"\n",
            redis.url()
        )
        .into_boxed_str(),
    );
    let mut gateways = Vec::new();
    for _ in 0..n {
        gateways.push(
            Gateway::start(Options {
                tls: SimulatorTls::Plain,
                base_url: Some(boxsim.base_url()),
                cache,
                account: account.to_owned(),
                ..Options::default()
            })
            .await,
        );
    }
    gateways
}

async fn plain_box() -> Simulator {
    start_box(SimulatorTls::Plain).await
}

fn from_shared(reply: &Reply) -> bool {
    reply
        .header("cache-status")
        .is_some_and(|s| s.contains("detail=shared"))
}

#[tokio::test]
async fn a_cold_storm_over_three_instances_asks_the_box_once() {
    let redis = Redis::start();
    let boxsim = plain_box().await;
    let gateways = fleet(3, &redis, &boxsim, "").await;
    boxsim.set_delay(Duration::from_millis(300));
    let started = Instant::now();
    let requests: Vec<_> = (0..30)
        .map(|i| spawn_get(gateways[i % 3].addr, path("id", "103")))
        .collect();
    let mut replies = Vec::new();
    for request in requests {
        replies.push(request.await.unwrap());
    }
    let elapsed = started.elapsed();
    assert!(replies.iter().all(|r| r.status == 200));
    assert!(replies.windows(2).all(|w| w[0].body == w[1].body));
    assert_eq!(boxsim.request_count(), 1, "one box request for the fleet");
    // The two instances that did not fetch answered from the shared tier.
    let shared = replies.iter().filter(|r| from_shared(r)).count();
    assert_eq!(shared, 20, "{elapsed:?}");
    for reply in replies.iter().filter(|r| from_shared(r)) {
        assert_eq!(reply.header("x-cache"), Some("HIT"));
    }
}

#[tokio::test]
async fn what_one_instance_fetched_another_serves_without_the_box() {
    let redis = Redis::start();
    let boxsim = plain_box().await;
    let gateways = fleet(2, &redis, &boxsim, "").await;
    let first = gateways[0].get(&path("id", "103")).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let second = gateways[1].get(&path("id", "103")).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("x-cache"), Some("HIT"));
    let status = second.header("cache-status").unwrap();
    assert!(
        status.contains("hit; ttl=") && status.ends_with("detail=shared"),
        "{status}"
    );
    assert_eq!(second.header("etag"), first.header("etag"));
    assert_eq!(boxsim.request_count(), 1);
    // Now in the second instance's memory: a plain hit.
    let third = gateways[1].get(&path("id", "103")).await;
    assert!(!from_shared(&third), "{:?}", third.header("cache-status"));
    let metrics = gateways[1].metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "miralix_gateway_cache_tier_hits_total{tier=\"shared\"}"
        ),
        1.0
    );
    // A fromQueueCallId request is selected from the shared full list, on any instance.
    let filtered = gateways[1]
        .get(&format!("{}?fromQueueCallId=0", path("id", "1")))
        .await;
    assert_eq!(filtered.status, 200);
    assert_eq!(boxsim.request_count(), 2, "agent 1, fetched once");
    let again = gateways[0]
        .get(&format!("{}?fromQueueCallId=0", path("id", "1")))
        .await;
    assert!(from_shared(&again));
    assert_eq!(again.body, filtered.body);
    assert_eq!(boxsim.request_count(), 2);
}

#[tokio::test]
async fn a_purge_on_one_instance_reaches_the_others_within_a_second() {
    let redis = Redis::start();
    let boxsim = plain_box().await;
    let gateways = fleet(3, &redis, &boxsim, "").await;
    for gateway in &gateways {
        assert_eq!(gateway.get(&path("id", "103")).await.status, 200);
    }
    assert_eq!(boxsim.request_count(), 1);
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let purged = request(
        gateways[0].admin,
        "DELETE",
        &format!("/cache/{ACCOUNT}"),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(purged.json()["purged"], 1);
    assert_eq!(purged.json()["purged_shared"], 1);
    let started = Instant::now();
    for gateway in &gateways[1..] {
        wait_until("the other instances dropped their copies", || async {
            sample(&gateway.metrics().await, "miralix_gateway_cache_entries") == 0.0
        })
        .await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let after = gateways[2].get(&path("id", "103")).await;
    assert_eq!(after.header("x-cache"), Some("MISS"));
    assert_eq!(boxsim.request_count(), 2);
}

/// Every request answered, each well within the budget of a Redis timeout per command.
async fn all_answered(gateways: &[Gateway], ids: std::ops::Range<u32>) {
    for id in ids {
        for gateway in gateways {
            let started = Instant::now();
            let reply = gateway.get(&path("id", &id.to_string())).await;
            assert!(matches!(reply.status, 200 | 404), "{}", reply.text());
            let took = started.elapsed();
            assert!(
                took < Duration::from_millis(900),
                "agent {id} took {took:?}"
            );
        }
    }
}

/// Fetch new agents on the first instance until the second one serves one from Redis.
async fn sharing_resumes(gateways: &[Gateway], first_id: u32) {
    let mut id = first_id;
    wait_until("sharing resumed", || {
        id += 1;
        let target = path("id", &id.to_string());
        async move {
            gateways[0].get(&target).await;
            from_shared(&gateways[1].get(&target).await)
        }
    })
    .await;
}

#[tokio::test]
async fn redis_killed_costs_no_request_and_sharing_resumes_when_it_returns() {
    let mut redis = Redis::start();
    let boxsim = plain_box().await;
    let gateways = fleet(2, &redis, &boxsim, "").await;
    gateways[0].get(&path("id", "103")).await;
    assert!(from_shared(&gateways[1].get(&path("id", "103")).await));
    redis.kill();
    // Cached agents from memory, new ones (unknown ids: 404s) from the box, on both.
    all_answered(&gateways, 100..110).await;
    let cached = gateways[1].get(&path("id", "103")).await;
    assert_eq!(cached.header("x-cache"), Some("HIT"));
    wait_until("the tier is reported down", || async {
        sample(&gateways[0].metrics().await, TIER_UP) == 0.0
    })
    .await;
    let ready = request(gateways[0].admin, "GET", "/readyz", &[]).await;
    assert_eq!(
        ready.status, 200,
        "Redis down never makes the gateway unready"
    );
    assert!(
        ready.text().contains("cache tier shared: down"),
        "{}",
        ready.text()
    );
    // A purge still works here, and says it could not reach the fleet.
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let purged = request(
        gateways[0].admin,
        "DELETE",
        &format!("/cache/{ACCOUNT}/agents/id/103"),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(purged.status, 200);
    assert_eq!(purged.json()["purged"], 1);
    assert!(
        purged.json()["shared_error"]
            .as_str()
            .is_some_and(|e| e.contains("purged on this instance only")),
        "{}",
        purged.text()
    );
    redis.restart();
    sharing_resumes(&gateways, 200).await;
    assert_eq!(sample(&gateways[1].metrics().await, TIER_UP), 1.0);
}

#[tokio::test]
async fn redis_frozen_costs_no_request_and_sharing_resumes_when_it_thaws() {
    let redis = Redis::start();
    let boxsim = plain_box().await;
    let gateways = fleet(2, &redis, &boxsim, "").await;
    gateways[0].get(&path("id", "103")).await;
    redis.freeze();
    all_answered(&gateways, 100..110).await;
    // After a few timeouts the breaker skips Redis: no time is spent on it at all.
    let started = Instant::now();
    all_answered(&gateways, 110..120).await;
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "20 requests with Redis skipped took {:?}",
        started.elapsed()
    );
    redis.thaw();
    sharing_resumes(&gateways, 300).await;
}

const TIER_ERRORS: &str = "miralix_gateway_cache_tier_errors_total{tier=\"shared\"}";

#[tokio::test]
async fn redis_going_away_and_coming_back_is_reported_without_any_request() {
    let mut redis = Redis::start();
    let boxsim = plain_box().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = format!("[cache.shared]\nurl = \"{}\"", redis.url());
    let config = write_config(dir.path(), "idle.toml", &cache, &boxsim.base_url(), "");
    let (mut gateway, _, admin) = spawn_binary(&config);
    let readyz = async || request(admin, "GET", "/readyz", &[]).await.text();
    assert!(readyz().await.contains("cache tier shared: up"));
    redis.kill();
    // Not one request: following the events channel is what notices, with the system's words.
    let warned = gateway.wait_for("shared tier (Redis) is failing");
    assert!(warned.contains("Connection refused"), "{warned}");
    assert!(readyz().await.contains("cache tier shared: down"));
    assert_eq!(sample(&metrics_of(admin).await, TIER_UP), 0.0);
    // Past the cool-down the channel's next attempt is the probe, and it keeps the tier down.
    let errors = sample(&metrics_of(admin).await, TIER_ERRORS);
    wait_until("a probe after the cool-down", || async {
        sample(&metrics_of(admin).await, TIER_ERRORS) > errors
    })
    .await;
    assert!(readyz().await.contains("cache tier shared: down"));
    redis.restart();
    gateway.wait_for("shared tier (Redis) answers again");
    // One warning for the whole outage, however many probes failed.
    let warnings = gateway
        .seen
        .iter()
        .filter(|l| l.contains("is failing"))
        .count();
    assert_eq!(warnings, 1, "{}", gateway.seen.join("\n"));
    assert!(readyz().await.contains("cache tier shared: up"));
    assert_eq!(sample(&metrics_of(admin).await, TIER_UP), 1.0);
}

#[tokio::test]
async fn an_acl_without_the_events_channel_is_said_once_and_entries_are_still_shared() {
    let acl = ["--user", "default", "off", "--user", "gw", "on", ">gw-pw-4"];
    let redis = Redis::start_with(
        acl.iter()
            .chain(&["~*", "resetchannels", "+@all"])
            .map(|s| s.to_string())
            .collect(),
    );
    let boxsim = plain_box().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = format!(
        "[cache.shared]\nurl = \"redis://gw:gw-pw-4@127.0.0.1:{}/0\"",
        redis.port
    );
    let (mut first, first_public, first_admin) = spawn_binary(&write_config(
        dir.path(),
        "a.toml",
        &cache,
        &boxsim.base_url(),
        "",
    ));
    let (_second, second_public, _) = spawn_binary(&write_config(
        dir.path(),
        "b.toml",
        &cache,
        &boxsim.base_url(),
        "",
    ));
    // Said before or after the line saying the gateway serves.
    let warned = first.find_or_wait_for("refuses the subscription");
    assert!(warned.contains("NOPERM"), "{warned}");
    // Commands work: the tier stays up, and what one instance stored the other serves.
    let target = path("id", "103");
    assert_eq!(request(first_public, "GET", &target, &[]).await.status, 200);
    assert!(from_shared(
        &request(second_public, "GET", &target, &[]).await
    ));
    let ready = request(first_admin, "GET", "/readyz", &[]).await.text();
    assert!(ready.contains("cache tier shared: up"), "{ready}");
    // Several refusals later, still the one warning.
    let errors = sample(&metrics_of(first_admin).await, TIER_ERRORS);
    wait_until("three more refusals", || async {
        sample(&metrics_of(first_admin).await, TIER_ERRORS) >= errors + 3.0
    })
    .await;
    let log = first.finish();
    assert_eq!(log.matches("refuses the subscription").count(), 1, "{log}");
}

#[tokio::test]
async fn the_box_cap_holds_for_the_whole_fleet() {
    let redis = Redis::start();
    let boxsim = plain_box().await;
    let gateways = fleet(3, &redis, &boxsim, "max_concurrent_requests = 2").await;
    boxsim.set_delay(Duration::from_millis(200));
    let requests: Vec<_> = (0..12)
        .map(|i| spawn_get(gateways[i % 3].addr, path("id", &(500 + i).to_string())))
        .collect();
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 404, "{}", reply.text());
    }
    assert_eq!(boxsim.request_count(), 12);
    assert_eq!(
        boxsim.max_concurrency(),
        2,
        "two box requests at once for three instances with max_concurrent_requests = 2"
    );
}

/// A gateway binary on `config`; its public and admin addresses.
fn spawn_binary(config: &Path) -> (Running, SocketAddr, SocketAddr) {
    let mut gateway = Running::spawn(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,miralix_gateway::access=off"),
        false,
    );
    let serving = gateway.wait_for("miralix-gateway serving");
    (
        gateway,
        addr_after(&serving, "public="),
        addr_after(&serving, "admin="),
    )
}

fn write_config(
    dir: &Path,
    name: &str,
    cache: &str,
    base_url: &str,
    account: &str,
) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[cache]\nttl = \"30s\"\nnegative_ttl = \"30s\"\n{cache}\n[accounts.{ACCOUNT}]\nbase_url = \"{base_url}\"\nshared_secret = \"{SECRET}\"\n{account}\n"
        ),
    )
    .unwrap();
    path
}

async fn metrics_of(admin: SocketAddr) -> String {
    request(admin, "GET", "/metrics", &[]).await.text()
}

#[tokio::test]
async fn a_lease_under_a_stalled_holder_is_taken_over_once_and_its_late_fill_refused() {
    let redis = Redis::start();
    let boxsim = plain_box().await;
    let dir = tempfile::tempdir().unwrap();
    // A lease of 2 x 1s + 1s + 2s = 5s: longer than any fetch under these settings.
    let config = write_config(
        dir.path(),
        "gateway.toml",
        &format!("[cache.shared]\nurl = \"{}\"", redis.url()),
        &boxsim.base_url(),
        "timeout = \"1s\"\nqueue_timeout = \"1s\"",
    );
    let (holder, holder_addr, holder_admin) = spawn_binary(&config);
    let (_b, b_addr, _) = spawn_binary(&config);
    let (_c, c_addr, _) = spawn_binary(&config);
    boxsim.set_delay(Duration::from_millis(600));
    let first = spawn_get(holder_addr, path("id", "103"));
    assert!(boxsim.wait_for_requests(1, Duration::from_secs(10)).await);
    // The holder stalls (as a process paused or starved would) with the lease taken.
    let holder_pid = holder.child.id().to_string();
    signal("STOP", &holder_pid);
    let started = Instant::now();
    let (b, c) = (
        spawn_get(b_addr, path("id", "103")),
        spawn_get(c_addr, path("id", "103")),
    );
    let (b, c) = (b.await.unwrap(), c.await.unwrap());
    assert_eq!(
        (b.status, c.status),
        (200, 200),
        "{} {}",
        b.text(),
        c.text()
    );
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "waited for the lease to run out"
    );
    assert_eq!(
        boxsim.request_count(),
        2,
        "exactly one instance took the key over"
    );
    signal("CONT", &holder_pid);
    let late = first.await.unwrap();
    assert!(matches!(late.status, 200 | 504), "{}", late.text());
    wait_until("the stale holder's fill was refused", || async {
        let metrics = metrics_of(holder_admin).await;
        sample(
            &metrics,
            "miralix_gateway_cache_tier_fills_rejected_total{tier=\"shared\"}",
        ) == 1.0
    })
    .await;
    // What the new holder stored stands: served from the tier, not replaced.
    let (_d, d_addr, _) = spawn_binary(&config);
    let served = request(d_addr, "GET", &path("id", "103"), &[]).await;
    assert!(from_shared(&served));
    assert_eq!(served.body, b.body);
    assert_eq!(boxsim.request_count(), 2);
}

fn disk_config(dir: &Path) -> String {
    format!(
        "[cache.disk]\npath = \"{}\"\nmax_bytes = \"64MiB\"",
        dir.join("cache.redb").display()
    )
}

#[tokio::test]
async fn a_restart_on_the_disk_tier_serves_every_stored_key_with_the_box_down() {
    let boxsim = plain_box().await;
    let dir = tempfile::tempdir().unwrap();
    let targets = [
        path("id", "103"),
        path("id", "1"),
        path("id", "9999"),
        format!("{}?fromQueueCallId=0", path("id", "1")),
    ];
    let cache: &'static str = Box::leak(
        format!(
            "ttl = \"30s\"\nnegative_ttl = \"30s\"\n{}",
            disk_config(dir.path())
        )
        .into_boxed_str(),
    );
    let first = Gateway::start(Options {
        tls: SimulatorTls::Plain,
        base_url: Some(boxsim.base_url()),
        cache,
        ..Options::default()
    })
    .await;
    let mut fetched = Vec::new();
    for target in &targets {
        fetched.push(first.get(target).await);
    }
    // SIGTERM's path: the drain ends by writing out what is queued.
    first.stop().await;
    let second = Gateway::start(Options {
        tls: SimulatorTls::Plain,
        base_url: Some("http://127.0.0.1:9".to_owned()),
        cache,
        ..Options::default()
    })
    .await;
    for (target, before) in targets.iter().zip(&fetched) {
        let reply = second.get(target).await;
        assert_eq!(reply.status, before.status, "{target}");
        assert_eq!(reply.body, before.body, "{target}");
        assert_eq!(reply.header("x-cache"), Some("HIT"), "{target}");
        assert!(
            reply
                .header("cache-status")
                .unwrap()
                .contains("detail=disk")
                || target.contains("from"),
            "{target}: {:?}",
            reply.header("cache-status")
        );
    }
    assert_eq!(
        boxsim.request_count(),
        3,
        "agents 103, 1 and 9999, once each"
    );
}

#[tokio::test]
async fn a_stored_record_heavier_than_this_instance_keeps_is_served_from_disk_not_memory() {
    let boxsim = plain_box().await;
    let dir = tempfile::tempdir().unwrap();
    let target = path("id", "103");
    let config = |extra: &str| -> &'static str {
        Box::leak(format!("ttl = \"30s\"\n{extra}{}", disk_config(dir.path())).into_boxed_str())
    };
    let first = Gateway::start(Options {
        tls: SimulatorTls::Plain,
        base_url: Some(boxsim.base_url()),
        cache: config(""),
        ..Options::default()
    })
    .await;
    let fetched = first.get(&target).await;
    first.stop().await;
    assert!(fetched.body.len() > 4096, "{} bytes", fetched.body.len());
    // Restarted with a smaller entry limit and the box down: the record is still served.
    let second = Gateway::start(Options {
        tls: SimulatorTls::Plain,
        base_url: Some("http://127.0.0.1:9".to_owned()),
        cache: config("max_entry_bytes = \"4KiB\"\n"),
        ..Options::default()
    })
    .await;
    for round in 0..2 {
        let reply = second.get(&target).await;
        assert_eq!(reply.status, 200, "round {round}");
        assert_eq!(reply.body, fetched.body, "round {round}");
        let status = reply.header("cache-status").unwrap();
        // Read from disk both times: memory did not keep it.
        assert!(status.contains("detail=disk"), "round {round}: {status}");
    }
}

#[tokio::test]
async fn a_kill_9_loses_nothing_the_disk_tier_had_stored() {
    let boxsim = plain_box().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "up.toml",
        &disk_config(dir.path()),
        &boxsim.base_url(),
        "",
    );
    let (mut gateway, addr, admin) = spawn_binary(&config);
    let ids = ["1", "103", "7001", "7002", "7003"];
    for id in ids {
        request(addr, "GET", &path("id", id), &[]).await;
    }
    wait_until("the fills are on disk", || async {
        sample(
            &metrics_of(admin).await,
            "miralix_gateway_cache_tier_stores_total{tier=\"disk\"}",
        ) == ids.len() as f64
    })
    .await;
    gateway.child.kill().unwrap();
    gateway.child.wait().unwrap();
    let down = write_config(
        dir.path(),
        "down.toml",
        &disk_config(dir.path()),
        "http://127.0.0.1:9",
        "",
    );
    let (_restarted, addr, _) = spawn_binary(&down);
    for id in ids {
        let reply = request(addr, "GET", &path("id", id), &[]).await;
        assert!(matches!(reply.status, 200 | 404), "{id}: {}", reply.text());
        assert!(
            reply
                .header("cache-status")
                .unwrap()
                .contains("detail=disk"),
            "{id}"
        );
    }
    assert_eq!(boxsim.request_count(), ids.len());
}

#[tokio::test]
async fn a_corrupt_disk_file_is_moved_aside_and_the_gateway_starts_cold() {
    let boxsim = plain_box().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cache.redb");
    std::fs::write(
        &file,
        b"this is not a cache file, but something else entirely\n".repeat(100),
    )
    .unwrap();
    let config = write_config(
        dir.path(),
        "g.toml",
        &disk_config(dir.path()),
        &boxsim.base_url(),
        "",
    );
    let (mut gateway, addr, _) = spawn_binary(&config);
    let warning = gateway.find_or_wait_for("moved aside");
    assert!(warning.contains(&file.display().to_string()), "{warning}");
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("cache.redb.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(warning.contains(&aside[0]), "{warning}");
    let reply = request(addr, "GET", &path("id", "103"), &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-cache"), Some("MISS"));
}

const REDIS_PASSWORD: &str = "rds-8Kq2-do-not-leak-w4Zt";

#[tokio::test]
async fn over_rediss_with_a_password_nothing_secret_reaches_logs_metrics_or_the_store() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new(certs.path());
    let tls_port = free_port();
    let redis = Redis::start_with(
        [
            "--requirepass",
            REDIS_PASSWORD,
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &ca.cert_path.display().to_string(),
            "--tls-key-file",
            &ca.key_path.display().to_string(),
            "--tls-auth-clients",
            "no",
            "--rdbcompression",
            "no",
        ]
        .map(str::to_owned)
        .to_vec(),
    );
    let boxsim = plain_box().await;
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("redis.url");
    std::fs::write(
        &url_file,
        format!("rediss://:{REDIS_PASSWORD}@127.0.0.1:{tls_port}/0\n"),
    )
    .unwrap();
    let ca_file = dir.path().join("redis-ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let config = write_config(
        dir.path(),
        "g.toml",
        &format!(
            "[cache.shared]\nurl_file = \"{}\"\nca_file = \"{}\"",
            url_file.display(),
            ca_file.display()
        ),
        &boxsim.base_url(),
        &format!("api_keys = [\"{API_KEY}\"]"),
    );
    let spawn = || {
        let mut gateway = Running::spawn(
            Command::new(BIN)
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", "debug,hyper=info,h2=info,rustls=info"),
            false,
        );
        let serving = gateway.wait_for("miralix-gateway serving");
        let addrs = (
            addr_after(&serving, "public="),
            addr_after(&serving, "admin="),
        );
        (gateway, addrs)
    };
    let (a, (a_addr, a_admin)) = spawn();
    let (b, (b_addr, b_admin)) = spawn();
    let key = [("x-api-key", API_KEY)];
    let first = request(a_addr, "GET", &path("id", "103"), &key).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let second = request(b_addr, "GET", &path("id", "103"), &key).await;
    assert!(
        from_shared(&second),
        "shared over TLS with a password: {:?}",
        second.header("cache-status")
    );
    let mut seen = String::new();
    for admin in [a_admin, b_admin] {
        seen.push_str(&metrics_of(admin).await);
        seen.push_str(&request(admin, "GET", "/readyz", &[]).await.text());
    }
    let check = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(check.status.success());
    let summary = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(summary.contains("second tier: shared"), "{summary}");
    seen.push_str(&summary);
    seen.push_str(&String::from_utf8_lossy(&check.stderr));
    seen.push_str(&a.finish());
    seen.push_str(&b.finish());
    // The whole store, as Redis itself saves it, uncompressed.
    let dump = redis.dir().join("store.rdb");
    let saved = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "-a",
            REDIS_PASSWORD,
            "--no-auth-warning",
            "--rdb",
        ])
        .arg(&dump)
        .output()
        .expect("redis-cli (redis-tools, a dependency of redis-server)");
    assert!(
        saved.status.success(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    let store = String::from_utf8_lossy(&std::fs::read(&dump).unwrap()).into_owned();
    assert!(
        store.contains("Derek Andersen"),
        "the dump holds the list, so the checks below can fail"
    );
    assert!(store.contains("miralix-gateway:entry:greenbox/id/103"));
    for secret in [REDIS_PASSWORD, SECRET, API_KEY] {
        assert!(
            !seen.contains(secret),
            "{secret} leaked into logs, metrics or check-config"
        );
        assert!(!store.contains(secret), "{secret} is in the shared store");
    }
}

#[tokio::test]
async fn a_full_disk_takes_the_disk_tier_down_and_it_writes_again_once_there_is_room() {
    use miralix_gateway::simulator::{Dataset, SyntheticAgents};
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("disk");
    std::fs::create_dir(&mnt).unwrap();
    let Some(disk) = SmallDisk::mount(&mnt, "1m") else {
        return;
    };
    let mut dataset = Dataset::demo(ACCOUNT, SECRET);
    let first = 5_000_000;
    dataset.synthetic = Some(SyntheticAgents {
        first_id: first,
        count: 400,
        calls: 40,
    });
    let boxsim = Simulator::start("127.0.0.1:0".parse().unwrap(), SimulatorTls::Plain, dataset)
        .await
        .unwrap();
    let cache = format!(
        "[cache.disk]\npath = \"{}\"",
        mnt.join("cache.redb").display()
    );
    let config = write_config(dir.path(), "full.toml", &cache, &boxsim.base_url(), "");
    let (mut gateway, public, admin) = spawn_binary(&config);
    // About 14 KB a list: the megabyte is full long before the 150th. Every request is
    // answered all the same.
    for id in first..first + 150 {
        let reply = request(public, "GET", &path("id", &id.to_string()), &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let warned = gateway.wait_for("disk tier write failed");
    assert!(warned.contains("No space left on device"), "{warned}");
    let ready = || async { request(admin, "GET", "/readyz", &[]).await.text() };
    assert!(ready().await.contains("cache tier disk: down"));
    disk.grow("64m");
    // New fills keep coming; within a reopening the file takes them again.
    let mut id = first + 150;
    wait_until("the disk tier is up again", || {
        id += 1;
        let target = path("id", &id.to_string());
        async move {
            request(public, "GET", &target, &[]).await;
            ready().await.contains("cache tier disk: up")
        }
    })
    .await;
    let log = gateway.finish();
    assert_eq!(log.matches("disk tier write failed").count(), 1, "{log}");
    assert!(log.contains("disk tier writes again"), "{log}");
}
