//! When the box is slow or down: stale serving, background refresh, error backoff, the
//! concurrency cap and the circuit breaker. Windows are crossed by moving the injected clock.

use std::time::Duration;

use miralix_gateway::simulator::Failure;

use crate::support::*;

/// ttl 30s, then 30s stale-while-revalidate, 10m stale-if-error, 1s error backoff (defaults).
const WINDOWS: &str = "ttl = \"30s\"\nnegative_ttl = \"5s\"";

fn account_metric(metrics: &str, name: &str) -> f64 {
    sample(
        metrics,
        &format!("miralix_gateway_{name}{{account=\"greenbox\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_is_served_at_once_while_exactly_one_refresh_runs() {
    let gw = Gateway::start(Options {
        cache: WINDOWS,
        ..Options::default()
    })
    .await;
    let first = gw.get(&path("id", "103")).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    // The clients are answered before the fetch's entry is finished (compressed, parsed); on
    // this runtime that may still be under way on the other worker, and the refresh would
    // start from the provisional entry.
    gw.settled().await;
    gw.clock.advance(Duration::from_secs(31));

    // The box holds every answer: stale answers must not wait for it.
    gw.simulator.hold();
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(spawn_get(gw.addr, path("id", "103")));
    }
    for client in clients {
        let reply = client.await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-cache"), Some("STALE"));
        assert_eq!(
            reply.header("cache-status"),
            Some("miralix-gateway; hit; stale; fwd=stale")
        );
        assert_eq!(reply.header("age"), Some("31"));
        assert_eq!(reply.body, first.body);
    }
    assert!(
        gw.simulator
            .wait_for_requests(2, Duration::from_secs(10))
            .await
    );
    assert_eq!(
        gw.simulator.request_count(),
        2,
        "one refresh for twenty stale reads"
    );

    gw.simulator.release();
    wait_until("the refresh completes", || async {
        gw.state.fetches_in_flight() == 0
    })
    .await;
    let refreshed = gw.get(&path("id", "103")).await;
    assert_eq!(refreshed.header("x-cache"), Some("HIT"));
    assert_eq!(refreshed.header("age"), Some("0"));
    assert_eq!(gw.simulator.request_count(), 2);
    let metrics = gw.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "miralix_gateway_cache_stale_served_total{account=\"greenbox\",reason=\"revalidate\"}"
        ),
        20.0
    );
    assert_eq!(account_metric(&metrics, "cache_refreshes_total"), 1.0);
}

#[tokio::test]
async fn every_kind_of_failure_is_covered_by_stale_if_error_within_the_window() {
    let gw = Gateway::start(Options {
        cache: "ttl = \"30s\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"60s\"\nerror_backoff = \"0s\"",
        account: "timeout = \"300ms\"\nmax_body_bytes = \"100KiB\"\nbreaker_failures = 100".into(),
        ..Options::default()
    })
    .await;
    let good = gw.get(&path("id", "103")).await;
    assert_eq!(good.status, 200);
    gw.clock.advance(Duration::from_secs(45));
    let cases = [
        (Failure::Status(500), "fwd-status=500"),
        (Failure::Status(503), "fwd-status=503"),
        (Failure::Status(401), "fwd-status=401"),
        (Failure::Refuse, "detail=connect_error"),
        (Failure::Close, "detail=transport_error"),
        (Failure::ResetMidBody, "detail=transport_error"),
        (Failure::Oversized(200 * 1024), "detail=body_too_large"),
        (Failure::InvalidJson, "detail=invalid_body"),
    ];
    for (failure, recorded) in &cases {
        gw.simulator.set_failure(failure.clone());
        let reply = gw.get(&path("id", "103")).await;
        assert_eq!(reply.status, 200, "{failure:?}: {}", reply.text());
        assert_eq!(reply.header("x-cache"), Some("STALE"), "{failure:?}");
        assert_eq!(
            reply.header("cache-status").unwrap(),
            format!("miralix-gateway; hit; stale; fwd=miss; {recorded}"),
            "{failure:?}"
        );
        assert_eq!(
            reply.body, good.body,
            "{failure:?}: a failed fetch never replaces the entry"
        );
        assert_eq!(reply.header("cache-control"), Some("private, max-age=0"));
    }
    // A slow box: the timeout is a failure too.
    gw.simulator.set_failure(Failure::None);
    gw.simulator.set_delay(Duration::from_secs(3));
    let slow = gw.get(&path("id", "103")).await;
    assert_eq!(slow.header("x-cache"), Some("STALE"));
    assert!(
        slow.header("cache-status")
            .unwrap()
            .ends_with("detail=timeout")
    );
    gw.simulator.set_delay(Duration::ZERO);

    // Past the window the error is returned.
    gw.clock.advance(Duration::from_secs(60));
    gw.simulator.set_failure(Failure::Status(500));
    let expired = gw.get(&path("id", "103")).await;
    assert_eq!(expired.status, 502);
    assert_eq!(expired.header("x-cache"), Some("MISS"));
    let metrics = gw.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "miralix_gateway_cache_stale_served_total{account=\"greenbox\",reason=\"error\"}"
        ),
        (cases.len() + 1) as f64
    );
}

#[tokio::test]
async fn a_hung_refresh_is_abandoned_after_the_timeout() {
    let gw = Gateway::start(Options {
        cache: WINDOWS,
        account: "timeout = \"200ms\"".into(),
        ..Options::default()
    })
    .await;
    gw.get(&path("id", "1")).await;
    gw.clock.advance(Duration::from_secs(31));
    gw.simulator.set_delay(Duration::from_secs(30));
    let stale = gw.get(&path("id", "1")).await;
    assert_eq!(stale.header("x-cache"), Some("STALE"));
    wait_until("the hung refresh is released", || async {
        gw.state.fetches_in_flight() == 0
    })
    .await;
    assert_eq!(gw.simulator.request_count(), 2);
    // The failure holds the key back for the error backoff, then a new refresh may start.
    assert_eq!(
        gw.get(&path("id", "1")).await.header("x-cache"),
        Some("STALE")
    );
    assert_eq!(gw.state.fetches_in_flight(), 0, "no refresh during backoff");
    gw.clock.advance(Duration::from_secs(1));
    gw.simulator.set_delay(Duration::ZERO);
    assert_eq!(
        gw.get(&path("id", "1")).await.header("x-cache"),
        Some("STALE")
    );
    wait_until("the second refresh completes", || async {
        gw.state.fetches_in_flight() == 0
    })
    .await;
    assert_eq!(
        gw.get(&path("id", "1")).await.header("x-cache"),
        Some("HIT")
    );
    assert_eq!(gw.simulator.request_count(), 3);
    assert_eq!(
        account_metric(&gw.metrics().await, "cache_refresh_failures_total"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fetch_reaches_every_waiter_at_once_and_backs_off() {
    let gw = Gateway::start(Options {
        account: "breaker_failures = 100".into(),
        ..Options::default()
    })
    .await;
    gw.simulator.set_failure(Failure::Status(500));
    gw.simulator.hold();
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(spawn_get(gw.addr, path("id", "1")));
    }
    wait_until("all ten wait on the one fetch", || async {
        gw.state.waiting() == 10
    })
    .await;
    gw.simulator.release();
    for client in clients {
        assert_eq!(client.await.unwrap().status, 502);
    }
    assert_eq!(gw.simulator.request_count(), 1);

    let held_back = gw.get(&path("id", "1")).await;
    assert_eq!(held_back.status, 502);
    assert!(
        held_back
            .header("cache-status")
            .unwrap()
            .ends_with("detail=backoff")
    );
    assert_eq!(
        gw.simulator.request_count(),
        1,
        "not hammered during the backoff"
    );
    gw.clock.advance(Duration::from_secs(1));
    gw.simulator.set_failure(Failure::None);
    assert_eq!(gw.get(&path("id", "1")).await.status, 200);
    assert_eq!(gw.simulator.request_count(), 2);
}

#[tokio::test]
async fn the_breaker_opens_fails_fast_and_closes_after_a_good_probe() {
    let gw = Gateway::start(Options {
        cache: "ttl = \"30s\"\nerror_backoff = \"0s\"",
        account: "breaker_failures = 3\nbreaker_cooldown = \"10s\"".into(),
        ..Options::default()
    })
    .await;
    gw.simulator.set_failure(Failure::Status(500));
    for id in ["1", "103", "104"] {
        assert_eq!(gw.get(&path("id", id)).await.status, 502);
    }
    let fast = gw.get(&path("id", "105")).await;
    assert_eq!(fast.status, 503, "{}", fast.text());
    assert_eq!(fast.header("retry-after"), Some("10"));
    assert!(
        fast.json()["error"]
            .as_str()
            .unwrap()
            .contains("circuit breaker open")
    );
    assert_eq!(
        gw.simulator.request_count(),
        3,
        "failed fast, the box was not asked"
    );
    let ready = request(gw.admin, "GET", "/readyz", &[]).await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.text().contains("account greenbox: breaker open"),
        "{}",
        ready.text()
    );
    let metrics = gw.metrics().await;
    assert_eq!(account_metric(&metrics, "upstream_breaker_state"), 2.0);
    assert_eq!(
        account_metric(&metrics, "upstream_breaker_rejections_total"),
        1.0
    );

    // After the cool-down one probe goes through; it fails, so the breaker opens again.
    gw.clock.advance(Duration::from_secs(10));
    assert_eq!(gw.get(&path("id", "105")).await.status, 502);
    assert_eq!(gw.simulator.request_count(), 4);
    assert_eq!(gw.get(&path("id", "105")).await.status, 503);
    // The next probe succeeds and closes it.
    gw.clock.advance(Duration::from_secs(10));
    gw.simulator.set_failure(Failure::None);
    assert_eq!(gw.get(&path("id", "105")).await.status, 200);
    assert_eq!(gw.get(&path("id", "104")).await.status, 200);
    let ready = request(gw.admin, "GET", "/readyz", &[]).await;
    assert_eq!(ready.status, 200);
    assert!(ready.text().contains("account greenbox: breaker closed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_cap_holds_under_a_burst_of_distinct_keys() {
    // With caching off, each fromQueueCallId is passed on as its own request.
    let gw = Gateway::start(Options {
        account: "max_concurrent_requests = 2".into(),
        cache: "ttl = \"0s\"",
        ..Options::default()
    })
    .await;
    gw.simulator.set_delay(Duration::from_millis(50));
    let mut clients = Vec::new();
    for n in 0..12 {
        let target = format!("{}?fromQueueCallId={n}", path("id", "103"));
        clients.push(spawn_get(gw.addr, target));
    }
    for client in clients {
        assert_eq!(client.await.unwrap().status, 200);
    }
    assert_eq!(gw.simulator.request_count(), 12);
    assert_eq!(gw.simulator.max_concurrency(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_waits_too_long_for_a_slot_is_a_503() {
    let gw = Gateway::start(Options {
        account: "max_concurrent_requests = 1\nqueue_timeout = \"100ms\"".into(),
        ..Options::default()
    })
    .await;
    gw.simulator.hold();
    let first = spawn_get(gw.addr, path("id", "1"));
    assert!(
        gw.simulator
            .wait_for_requests(1, Duration::from_secs(10))
            .await
    );
    let queued = gw.get(&path("id", "103")).await;
    assert_eq!(queued.status, 503, "{}", queued.text());
    assert_eq!(queued.header("retry-after"), Some("1"));
    assert!(
        queued
            .header("cache-status")
            .unwrap()
            .contains("detail=queue_timeout")
    );
    gw.simulator.release();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(
        account_metric(&gw.metrics().await, "upstream_queue_rejections_total"),
        1.0
    );
}

#[tokio::test]
async fn an_oversized_body_is_a_502_and_not_stored() {
    let gw = Gateway::start(Options {
        account: "max_body_bytes = \"4KiB\"".into(),
        cache: NO_STALE,
        ..Options::default()
    })
    .await;
    for _ in 0..2 {
        let reply = gw.get(&path("id", "103")).await;
        assert_eq!(reply.status, 502);
        assert!(
            reply.json()["error"]
                .as_str()
                .unwrap()
                .contains("4096 bytes")
        );
    }
    assert_eq!(gw.simulator.request_count(), 2);
    assert_eq!(
        sample(&gw.metrics().await, "miralix_gateway_cache_entries"),
        0.0
    );
    // A list under the cap is served.
    assert_eq!(gw.get(&path("id", "105")).await.status, 200);
}

#[tokio::test]
async fn evictions_are_counted_by_cause() {
    let gw = Gateway::start(Options {
        cache: "max_bytes = \"24KiB\"\nmax_entry_bytes = \"24KiB\"",
        ..Options::default()
    })
    .await;
    for id in ["103", "1", "104"] {
        assert_eq!(gw.get(&path("id", id)).await.status, 200);
        // Weighed with its gzip copy once finished.
        gw.settled().await;
    }
    let metrics = gw.metrics().await;
    assert!(
        sample(
            &metrics,
            "miralix_gateway_cache_evictions_total{cause=\"size\"}"
        ) >= 1.0
    );
    assert!(sample(&metrics, "miralix_gateway_cache_bytes") <= 24.0 * 1024.0);
}

#[tokio::test]
async fn a_list_that_is_not_utf8_json_is_a_502_and_never_stored() {
    let gw = Gateway::start(Options {
        cache: NO_STALE,
        ..Options::default()
    })
    .await;
    gw.simulator.set_failure(Failure::InvalidUtf8);
    for _ in 0..2 {
        let reply = gw.get(&path("id", "103")).await;
        assert_eq!(reply.status, 502, "{}", reply.text());
        assert!(reply.json()["error"].as_str().unwrap().contains("not JSON"));
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
    }
    assert_eq!(gw.simulator.request_count(), 2, "nothing was stored");
    assert_eq!(
        sample(&gw.metrics().await, "miralix_gateway_cache_entries"),
        0.0
    );
}

#[tokio::test]
async fn a_stored_list_is_served_as_json_whatever_the_box_labelled_it() {
    let gw = Gateway::start(Options::default()).await;
    gw.simulator.set_failure(Failure::MislabelledJson);
    let miss = gw.get(&path("id", "103")).await;
    let hit = gw.get(&path("id", "103")).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    for reply in [&miss, &hit] {
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-type"),
            Some("application/json; charset=utf-8")
        );
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
    }
}

#[tokio::test]
async fn head_on_audio_works_when_the_box_does_not_answer_head() {
    let gw = Gateway::start(Options::default()).await;
    gw.simulator.set_failure(Failure::NoHead);
    let audio = format!("/mot/{ACCOUNT}/queues/calls/recordings/150000");
    let get = gw.get(&audio).await;
    assert_eq!(get.status, 200);
    let raw = exchange(
        gw.addr,
        format!("HEAD {audio} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let head = parse_reply(&raw).expect("an answer");
    assert_eq!(head.status, 200, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(head.header("content-length"), get.header("content-length"));
    assert_eq!(head.header("content-type"), get.header("content-type"));
    let text = String::from_utf8_lossy(&raw);
    assert!(text.ends_with("\r\n\r\n"), "no body after the head: {text}");
    let methods: Vec<String> = gw
        .simulator
        .received()
        .iter()
        .map(|r| r.method.to_string())
        .collect();
    assert_eq!(methods, ["GET", "GET"]);
}

#[tokio::test]
async fn a_stalled_tls_handshake_says_it_is_the_connect_timeout() {
    // Accepts connections and never says a word: the handshake stalls.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", silent.local_addr().unwrap());
    let _hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let gw = Gateway::start(Options {
        base_url: Some(base),
        cache: NO_STALE,
        account: "connect_timeout = \"300ms\"\ntimeout = \"5s\"".into(),
        ..Options::default()
    })
    .await;
    let reply = gw.get(&path("id", "103")).await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    let error = reply.json()["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("300ms") && error.contains("connect_timeout"),
        "{error}"
    );
    assert!(!error.contains("5s"), "{error}");
    assert_eq!(
        reply.header("cache-status"),
        Some("miralix-gateway; fwd=miss; detail=connect_timeout")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_to_store_is_shared_served_and_backed_off() {
    // 64 KiB of cache stores answers up to 8 KiB; agent 103's list is about 13.7 KB.
    let gw = Gateway::start(Options {
        cache: "max_bytes = \"64KiB\"",
        ..Options::default()
    })
    .await;
    gw.simulator.hold();
    let clients: Vec<_> = (0..5)
        .map(|_| spawn_get(gw.addr, path("id", "103")))
        .collect();
    wait_until("all five wait on the one fetch", || async {
        gw.state.waiting() == 5
    })
    .await;
    gw.simulator.release();
    let mut statuses = Vec::new();
    for client in clients {
        let reply = client.await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json().as_array().unwrap().len(), 40);
        assert_eq!(reply.header("cache-control"), Some("no-store"));
        statuses.push(reply.header("cache-status").unwrap().to_owned());
    }
    assert_eq!(gw.simulator.request_count(), 1, "one fetch for all five");
    assert!(
        statuses.contains(&"miralix-gateway; fwd=miss; detail=too-large".to_owned()),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&"miralix-gateway; fwd=miss; collapsed; detail=too-large".to_owned()),
        "{statuses:?}"
    );
    // Not stored, and not a HIT.
    let metrics = gw.metrics().await;
    assert_eq!(sample(&metrics, "miralix_gateway_cache_entries"), 0.0);

    // During the error backoff the box is not asked again.
    let held_back = gw.get(&path("id", "103")).await;
    assert_eq!(held_back.status, 503, "{}", held_back.text());
    assert!(held_back.header("retry-after").is_some());
    assert!(
        held_back.json()["error"]
            .as_str()
            .unwrap()
            .contains("cache.max_entry_bytes")
    );
    assert_eq!(gw.simulator.request_count(), 1);
    // The breaker is not the answer: it stays closed.
    assert_eq!(
        account_metric(&gw.metrics().await, "upstream_breaker_state"),
        0.0
    );
    gw.clock.advance(Duration::from_secs(1));
    let again = gw.get(&path("id", "103")).await;
    assert_eq!(again.status, 200);
    assert_eq!(gw.simulator.request_count(), 2);
    // Smaller answers are stored as usual.
    assert_eq!(gw.get(&path("id", "105")).await.status, 200);
    assert_eq!(
        gw.get(&path("id", "105")).await.header("x-cache"),
        Some("HIT")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_fetch_whose_clients_all_hung_up_never_reaches_the_box() {
    let gw = Gateway::start(Options {
        account: "max_concurrent_requests = 2\nqueue_timeout = \"30s\"".into(),
        ..Options::default()
    })
    .await;
    gw.simulator.hold();
    // 40 clients, each for an agent of its own; two fetches take the box's slots.
    let mut clients = Vec::new();
    for n in 0..40 {
        let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "GET {} HTTP/1.1\r\nHost: gw\r\n\r\n",
            path("id", &(5000 + n).to_string())
        );
        tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
            .await
            .unwrap();
        clients.push(stream);
    }
    wait_until("40 fetches, 2 of them at the box", || async {
        gw.state.fetches_in_flight() == 40 && gw.simulator.request_count() == 2
    })
    .await;
    drop(clients);
    wait_until("the 38 queued fetches are dropped", || async {
        account_metric(&gw.metrics().await, "upstream_abandoned_total") == 38.0
    })
    .await;
    assert_eq!(gw.state.fetches_in_flight(), 2, "the two sent are kept");
    gw.simulator.release();
    wait_until("the two sent fetches finish", || async {
        gw.state.fetches_in_flight() == 0
    })
    .await;
    assert_eq!(
        gw.simulator.request_count(),
        2,
        "nothing queued reached the box"
    );
    // What a sent fetch brought is stored; a dropped one left nothing behind, not even a
    // backoff: the next request for it is an ordinary miss.
    let first = gw.simulator.received()[0].target.clone();
    let stored = gw.get(&first).await;
    assert_eq!(stored.header("x-cache"), Some("HIT"), "{first}");
    let dropped = (5000..5040)
        .map(|n| path("id", &n.to_string()))
        .find(|p| !gw.simulator.received().iter().any(|r| &r.target == p))
        .unwrap();
    let again = gw.get(&dropped).await;
    assert_eq!(again.status, 404);
    assert_eq!(again.header("x-cache"), Some("MISS"));
    assert_eq!(gw.simulator.request_count(), 3);
}
