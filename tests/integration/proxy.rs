//! The public route: caching, normalization, coalescing, refusals and headers.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn miss_then_hit_reaches_the_box_once_with_identical_bytes() {
    let gw = Gateway::start(Options::default()).await;
    let first = gw.get(&path("email", EMAIL)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(
        first.header("cache-status"),
        Some("miralix-gateway; fwd=miss; stored")
    );
    assert_eq!(first.header("age"), Some("0"));
    assert_eq!(
        first.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(first.json().as_array().unwrap().len(), 40);

    gw.clock.advance(Duration::from_secs(12));
    let second = gw.get(&path("email", EMAIL)).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert_eq!(
        second.header("cache-status"),
        Some("miralix-gateway; hit; ttl=18")
    );
    assert_eq!(second.header("age"), Some("12"));
    assert_eq!(second.header("cache-control"), Some("private, max-age=18"));
    assert_eq!(second.body, first.body, "a hit serves the stored bytes");
    assert_eq!(gw.simulator.request_count(), 1);
}

#[tokio::test]
async fn the_secret_is_added_and_client_credentials_never_reach_the_box() {
    let gw = Gateway::start(Options::default()).await;
    let reply = request(
        gw.addr,
        "GET",
        &path("id", "103"),
        &[
            ("X-Miralix-Shared-Secret", "client-supplied"),
            ("Authorization", "Bearer client-token"),
            ("Cookie", "session=abc"),
            ("X-Forwarded-For", "10.9.8.7"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let received = gw.simulator.received();
    assert_eq!(received.len(), 1);
    let headers = &received[0].headers;
    let secrets: Vec<_> = headers.get_all("x-miralix-shared-secret").iter().collect();
    assert_eq!(secrets, [SECRET], "exactly the configured secret");
    for forbidden in ["authorization", "cookie", "x-forwarded-for"] {
        assert!(
            headers.get(forbidden).is_none(),
            "{forbidden} was forwarded"
        );
    }
    assert_eq!(headers["accept"], "application/json");
    assert!(
        headers["user-agent"]
            .to_str()
            .unwrap()
            .starts_with("miralix-gateway/")
    );
}

#[tokio::test]
async fn every_spelling_of_an_agent_shares_one_entry_and_the_box_sees_the_canonical_form() {
    let gw = Gateway::start(Options::default()).await;
    let groups: [(&str, &[&str], &str); 4] = [
        (
            "email",
            &[
                "derek.a@company.local",
                "Derek.A@Company.Local",
                "DEREK.A%40COMPANY.LOCAL",
                "%20derek.a@company.local%20",
            ],
            "/mot/greenbox/agents/email/derek.a@company.local/recordings",
        ),
        (
            "sipUri",
            &[
                "sip:lp1@company.local",
                "SIP:LP1@company.local",
                "sips:lp1@company.local",
                "lp1@company.local",
                "%3Csip:lp1@company.local%3E",
                "sip:lp1@company.local%3Btransport=tls",
            ],
            "/mot/greenbox/agents/sipUri/sip:lp1@company.local/recordings",
        ),
        (
            "id",
            &["103", "0103", "00000103"],
            "/mot/greenbox/agents/id/103/recordings",
        ),
        (
            "syncId",
            &[
                "f4fd9e5f-017d-4350-adf8-8dd811bc1a2e",
                "F4FD9E5F-017D-4350-ADF8-8DD811BC1A2E",
                "%7Bf4fd9e5f-017d-4350-adf8-8dd811bc1a2e%7D",
                "f4fd9e5f017d4350adf88dd811bc1a2e",
            ],
            "/mot/greenbox/agents/syncId/f4fd9e5f-017d-4350-adf8-8dd811bc1a2e/recordings",
        ),
    ];
    let mut expected_requests = 0;
    for (kind, spellings, canonical) in groups {
        for (n, spelling) in spellings.iter().enumerate() {
            // The type segment is case-insensitive too.
            let kind = if n % 2 == 1 {
                kind.to_uppercase()
            } else {
                kind.to_owned()
            };
            let reply = gw.get(&path(&kind, spelling)).await;
            assert_eq!(reply.status, 200, "{kind}/{spelling}: {}", reply.text());
            let expected = if n == 0 { "MISS" } else { "HIT" };
            assert_eq!(reply.header("x-cache"), Some(expected), "{kind}/{spelling}");
        }
        expected_requests += 1;
        let received = gw.simulator.received();
        assert_eq!(
            received.len(),
            expected_requests,
            "{kind}: one upstream request"
        );
        assert_eq!(received.last().unwrap().target, canonical);
    }
}

#[tokio::test]
async fn bad_input_is_refused_with_a_message_and_never_forwarded() {
    let gw = Gateway::start(Options::default()).await;
    let long_email = format!("{}@company.local", "a".repeat(300));
    let long_path = format!("/mot/greenbox/agents/id/{}/recordings", "1".repeat(3000));
    let cases: Vec<(String, u16, &str)> = vec![
        (
            path("phone", "123"),
            400,
            "accepted types are sipUri, id, email and syncId",
        ),
        (path("emails", EMAIL), 400, "accepted types"),
        (path("email", "derek.company.local"), 400, "invalid email"),
        (path("email", "a@b@c"), 400, "more than one"),
        (path("email", "@company.local"), 400, "invalid email"),
        (path("email", "de%20rek@company.local"), 400, "whitespace"),
        (path("email", &long_email), 400, "longer than 254 bytes"),
        (path("syncId", "f4fd9e5f-017d-4350-adf8"), 400, "GUID"),
        (path("syncId", "not-a-guid"), 400, "GUID"),
        (path("id", "12a"), 400, "decimal digits"),
        (path("id", "-1"), 400, "decimal digits"),
        (path("id", "99999999999999999999"), 400, "decimal digits"),
        (path("id", "%20"), 400, "empty"),
        (path("sipUri", "sip:"), 400, "invalid sipUri"),
        (path("sipUri", "sip:lp1"), 400, "invalid sipUri"),
        (
            path("email", "a%2Fb@company.local"),
            400,
            "forbidden character",
        ),
        (
            path("email", "a%5Cb@company.local"),
            400,
            "forbidden character",
        ),
        (
            path("email", "a%00b@company.local"),
            400,
            "forbidden character",
        ),
        (
            path("email", "a%0D%0AX-Evil:%201@company.local"),
            400,
            "forbidden character",
        ),
        (path("id", ".."), 400, "decimal digits"),
        (path("id", "%2E%2E"), 400, "decimal digits"),
        (
            path("email", "%C0%AE@x.y"),
            400,
            "not valid percent-encoded UTF-8",
        ),
        (
            format!("{}?fromQueueCallId=abc", path("id", "103")),
            400,
            "fromQueueCallId",
        ),
        (
            format!("{}?fromQueueCallId=-5", path("id", "103")),
            400,
            "fromQueueCallId",
        ),
        (
            format!("{}?fromQueueCallId=", path("id", "103")),
            400,
            "fromQueueCallId",
        ),
        (
            format!("{}?fromQueueCallId=1&fromQueueCallId=2", path("id", "103")),
            400,
            "more than once",
        ),
        (long_path, 414, "longer than 2048 bytes"),
        (
            "/mot/greenbox/agents/id/103/../../../admin".into(),
            404,
            "no such route",
        ),
        (
            "/mot/greenbox/agents/id/103/recordings/..".into(),
            404,
            "no such route",
        ),
    ];
    for (target, status, message) in &cases {
        let reply = gw.get(target).await;
        assert_eq!(reply.status, *status, "{target}: {}", reply.text());
        let body = reply.json();
        assert_eq!(body["status"], *status, "{target}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains(message),
            "{target}: {error:?} lacks {message:?}"
        );
        assert_eq!(reply.header("cache-control"), Some("no-store"), "{target}");
    }
    assert_eq!(
        gw.simulator.request_count(),
        0,
        "nothing invalid reached the box"
    );
}

#[tokio::test]
async fn unknown_accounts_and_foreign_paths_are_404_and_not_forwarded() {
    let gw = Gateway::start(Options::default()).await;
    for target in [
        "/",
        "/mot/greenbox/agents/",
        "/mot/greenbox/queues",
        "/mot/greenbox/queues/1/calls",
        "/mot/greenbox/queues/calls/recordings",
        "/mot/otherbox/agents?state=any",
        "/mot/otherbox/queues/calls/recordings/47610",
        "/mot/greenbox/agents/id/103/recordings/extra",
        "/metrics",
        "/mot/otherbox/agents/id/103/recordings",
        "/mot/GREENBOX/agents/id/103/recordings",
    ] {
        let reply = gw.get(target).await;
        assert_eq!(reply.status, 404, "{target}: {}", reply.text());
        assert!(reply.json()["error"].is_string(), "{target}");
    }
    let unknown = gw.get("/mot/otherbox/agents/id/103/recordings").await;
    assert!(
        unknown.text().contains("unknown account \\\"otherbox\\\""),
        "{}",
        unknown.text()
    );
    assert_eq!(gw.simulator.request_count(), 0);
}

#[tokio::test]
async fn other_methods_get_405_with_allow_and_head_gets_headers_only() {
    let gw = Gateway::start(Options::default()).await;
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let reply = request(
            gw.addr,
            method,
            &path("id", "103"),
            &[("Content-Length", "0")],
        )
        .await;
        assert_eq!(reply.status, 405, "{method}");
        assert_eq!(reply.header("allow"), Some("GET, HEAD"));
    }
    assert_eq!(gw.simulator.request_count(), 0);

    let get = gw.get(&path("id", "103")).await;
    let head = request(gw.addr, "HEAD", &path("id", "103"), &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("x-cache"), Some("HIT"));
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length").unwrap(),
        get.body.len().to_string()
    );
    assert_eq!(gw.simulator.request_count(), 1);
}

#[tokio::test]
async fn unknown_agents_are_remembered_for_the_negative_ttl() {
    let gw = Gateway::start(Options {
        cache: NO_STALE,
        ..Options::default()
    })
    .await;
    let first = gw.get(&path("id", "999")).await;
    assert_eq!(first.status, 404);
    assert_eq!(
        first.json()["Message"],
        "Agent not found.",
        "the box's body passes through"
    );
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let again = gw.get(&path("id", "0999")).await;
    assert_eq!(again.status, 404);
    assert_eq!(again.header("x-cache"), Some("HIT"));
    assert_eq!(again.header("cache-control"), Some("private, max-age=5"));
    assert_eq!(gw.simulator.request_count(), 1);

    gw.clock.advance(Duration::from_secs(5));
    let expired = gw.get(&path("id", "999")).await;
    assert_eq!(expired.header("x-cache"), Some("MISS"));
    assert_eq!(gw.simulator.request_count(), 2);
}

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    let gw = Gateway::start(Options {
        cache: NO_STALE,
        ..Options::default()
    })
    .await;
    assert_eq!(
        gw.get(&path("id", "1")).await.header("x-cache"),
        Some("MISS")
    );
    gw.clock.advance(Duration::from_secs(29));
    assert_eq!(
        gw.get(&path("id", "1")).await.header("x-cache"),
        Some("HIT")
    );
    gw.clock.advance(Duration::from_secs(1));
    let refetched = gw.get(&path("id", "1")).await;
    assert_eq!(refetched.header("x-cache"), Some("MISS"));
    assert_eq!(refetched.header("age"), Some("0"));
    assert_eq!(gw.simulator.request_count(), 2);
}

#[tokio::test]
async fn zero_ttls_coalesce_but_never_store() {
    let gw = Gateway::start(Options {
        cache: "ttl = \"0s\"\nnegative_ttl = \"0s\"",
        ..Options::default()
    })
    .await;
    for _ in 0..2 {
        let reply = gw.get(&path("id", "1")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-cache"), Some("MISS"));
        assert_eq!(reply.header("cache-control"), Some("no-store"));
    }
    assert_eq!(gw.simulator.request_count(), 2);
}

#[tokio::test]
async fn with_caching_off_from_queue_call_id_is_forwarded_canonical() {
    let gw = Gateway::start(Options {
        cache: "ttl = \"0s\"",
        ..Options::default()
    })
    .await;
    let all = gw.get(&path("id", "103")).await.json();
    let third = all[2]["QueueCallId"].as_u64().unwrap();
    let target = format!(
        "{}?fromQueueCallId=000{third}&unrelated=1",
        path("id", "0103")
    );
    let after = gw.get(&target).await;
    assert_eq!(after.header("x-cache"), Some("MISS"));
    let after = after.json();
    assert_eq!(after.as_array().unwrap().len(), 37);
    assert!(
        after
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["QueueCallId"].as_u64().unwrap() > third)
    );
    let received = gw.simulator.received();
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[1].target,
        format!("/mot/greenbox/agents/id/103/recordings?fromQueueCallId={third}"),
        "only fromQueueCallId is forwarded, canonical"
    );
}

#[tokio::test]
async fn a_leader_that_hangs_up_does_not_cancel_the_fetch_for_others() {
    let gw = Gateway::start(Options::default()).await;
    gw.simulator.hold();
    let leader = spawn_get(gw.addr, path("id", "104"));
    assert!(
        gw.simulator
            .wait_for_requests(1, Duration::from_secs(10))
            .await
    );
    leader.abort();
    let _ = leader.await;
    let follower = spawn_get(gw.addr, path("id", "104"));
    wait_until("the follower joins the flight", || async {
        gw.state.waiting() >= 1
    })
    .await;
    gw.simulator.release();
    let reply = follower.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        gw.simulator.request_count(),
        1,
        "the fetch was neither cancelled nor restarted"
    );
    assert_eq!(
        gw.get(&path("id", "104")).await.header("x-cache"),
        Some("HIT")
    );
}

#[tokio::test]
async fn metrics_count_hits_misses_and_upstream_requests() {
    let gw = Gateway::start(Options::default()).await;
    gw.get(&path("id", "1")).await;
    gw.get(&path("id", "1")).await;
    gw.get(&path("id", "1")).await;
    gw.get(&path("id", "999")).await;
    gw.get(&path("phone", "1")).await;
    let metrics = gw.metrics().await;
    let account = "{account=\"greenbox\"}";
    assert_eq!(
        sample(
            &metrics,
            &format!("miralix_gateway_cache_hits_total{account}")
        ),
        2.0
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("miralix_gateway_cache_misses_total{account}")
        ),
        2.0
    );
    assert_eq!(
        sample(
            &metrics,
            "miralix_gateway_upstream_requests_total{account=\"greenbox\",status=\"200\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "miralix_gateway_upstream_requests_total{account=\"greenbox\",status=\"404\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("miralix_gateway_upstream_request_duration_seconds_count{account}")
        ),
        2.0
    );
    assert_eq!(
        sample(&metrics, "miralix_gateway_requests_total{status=\"200\"}"),
        3.0
    );
    assert_eq!(
        sample(&metrics, "miralix_gateway_requests_total{status=\"400\"}"),
        1.0
    );
    assert_eq!(sample(&metrics, "miralix_gateway_cache_entries"), 2.0);
    assert!(sample(&metrics, "miralix_gateway_cache_bytes") > 3000.0);
}

#[tokio::test]
async fn health_and_readiness_on_the_admin_listener_only() {
    let gw = Gateway::start(Options::default()).await;
    for endpoint in ["/healthz", "/readyz"] {
        assert_eq!(
            request(gw.admin, "GET", endpoint, &[]).await.status,
            200,
            "{endpoint}"
        );
        assert_eq!(
            gw.get(endpoint).await.status,
            404,
            "{endpoint} on the public listener"
        );
    }
    assert_eq!(request(gw.admin, "GET", "/nope", &[]).await.status, 404);
    gw.stop().await;
}

#[tokio::test]
async fn if_none_match_with_the_current_etag_is_answered_304() {
    let gw = Gateway::start(Options::default()).await;
    let first = gw.get(&path("id", "103")).await;
    let etag = first
        .header("etag")
        .expect("a stored list has an ETag")
        .to_owned();
    assert!(
        etag.starts_with('"') && !etag.starts_with("W/"),
        "strong: {etag}"
    );

    for (value, expected) in [
        (etag.clone(), 304),
        (format!("W/{etag}"), 304),
        ("*".to_owned(), 304),
        (format!("\"other\", {etag}"), 304),
        ("\"other\"".to_owned(), 200),
    ] {
        let reply = request(
            gw.addr,
            "GET",
            &path("id", "103"),
            &[("If-None-Match", &value)],
        )
        .await;
        assert_eq!(reply.status, expected, "If-None-Match: {value}");
        assert_eq!(reply.header("etag"), Some(etag.as_str()));
        assert_eq!(reply.header("x-cache"), Some("HIT"));
        assert!(
            reply
                .header("cache-control")
                .unwrap()
                .starts_with("private, max-age=")
        );
        if expected == 304 {
            assert!(reply.body.is_empty());
            assert_eq!(reply.header("content-type"), None);
        } else {
            assert_eq!(reply.body, first.body);
        }
    }
    let head = request(
        gw.addr,
        "HEAD",
        &path("id", "103"),
        &[("If-None-Match", &etag)],
    )
    .await;
    assert_eq!(head.status, 304);
    assert_eq!(
        gw.simulator.request_count(),
        1,
        "all answered from the cache"
    );

    // The same bytes fetched again carry the same tag.
    gw.clock.advance(Duration::from_secs(61));
    let refetched = gw.get(&path("id", "103")).await;
    assert_eq!(refetched.header("x-cache"), Some("MISS"));
    assert_eq!(refetched.header("etag"), Some(etag.as_str()));
    let metrics = gw.metrics().await;
    assert_eq!(
        sample(&metrics, "miralix_gateway_requests_total{status=\"304\"}"),
        5.0
    );
}

#[tokio::test]
async fn unknown_agents_and_uncached_answers_have_no_etag() {
    let gw = Gateway::start(Options::default()).await;
    let missing = request(
        gw.addr,
        "GET",
        &path("id", "999"),
        &[("If-None-Match", "*")],
    )
    .await;
    assert_eq!(missing.status, 404, "no representation to match");
    assert_eq!(missing.header("etag"), None);
    gw.simulator
        .set_failure(miralix_gateway::simulator::Failure::Status(403));
    let forbidden = gw.get(&path("id", "1")).await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(forbidden.header("etag"), None);
}
