//! The way to the box: certificate trust and the mapping of its failures.

use std::time::Duration;

use miralix_gateway::simulator::{Failure, SimulatorTls};

use crate::support::*;

async fn first_request_succeeds(tls: SimulatorTls, trust: Trust) {
    let gw = Gateway::start(Options {
        tls,
        trust,
        ..Options::default()
    })
    .await;
    let reply = gw.get(&path("email", EMAIL)).await;
    assert_eq!(
        reply.status,
        200,
        "{tls:?} with {trust:?}: {}",
        reply.text()
    );
    assert_eq!(gw.simulator.request_count(), 1);
}

#[tokio::test]
async fn a_ca_file_with_the_issuing_ca_is_trusted() {
    first_request_succeeds(SimulatorTls::IssuedByCa, Trust::CaFile).await;
}

#[tokio::test]
async fn a_self_signed_certificate_in_ca_file_is_trusted_with_or_without_ca_true() {
    first_request_succeeds(SimulatorTls::SelfSigned, Trust::CaFile).await;
    first_request_succeeds(SimulatorTls::SelfSignedCa, Trust::CaFile).await;
}

#[tokio::test]
async fn a_matching_pin_is_trusted_whatever_the_issuer() {
    first_request_succeeds(SimulatorTls::SelfSigned, Trust::Pin).await;
    first_request_succeeds(SimulatorTls::IssuedByCa, Trust::Pin).await;
}

#[tokio::test]
async fn a_wrong_pin_is_a_502_and_nothing_is_served_or_stored() {
    let gw = Gateway::start(Options {
        trust: Trust::WrongPin,
        ..Options::default()
    })
    .await;
    for attempt in 0..2 {
        let reply = gw.get(&path("email", EMAIL)).await;
        assert_eq!(reply.status, 502, "{}", reply.text());
        assert_eq!(
            reply.json()["error"],
            "could not connect to the Miralix box or verify its TLS certificate"
        );
        assert!(!reply.text().contains("Derek"));
        assert_eq!(reply.header("x-cache"), Some("MISS"));
        assert_eq!(reply.header("cache-control"), Some("no-store"));
        // The second request falls in the key's error backoff: the box is not tried again.
        let expected = if attempt == 0 {
            "miralix-gateway; fwd=miss; detail=connect_error"
        } else {
            "miralix-gateway; fwd=miss; detail=connect_error; detail=backoff"
        };
        assert_eq!(reply.header("cache-status"), Some(expected));
    }
    assert_eq!(
        gw.simulator.request_count(),
        0,
        "no request was sent over the refused handshake"
    );
    let metrics = gw.metrics().await;
    assert_eq!(sample(&metrics, "miralix_gateway_cache_entries"), 0.0);
    assert_eq!(
        sample(
            &metrics,
            "miralix_gateway_upstream_requests_total{account=\"greenbox\",status=\"connect_error\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn a_ca_file_that_did_not_issue_the_certificate_is_refused() {
    for tls in [SimulatorTls::SelfSigned, SimulatorTls::IssuedByCa] {
        let gw = Gateway::start(Options {
            tls,
            trust: Trust::UnrelatedCaFile,
            ..Options::default()
        })
        .await;
        let reply = gw.get(&path("id", "1")).await;
        assert_eq!(reply.status, 502, "{tls:?}: {}", reply.text());
        assert_eq!(gw.simulator.request_count(), 0);
    }
}

#[tokio::test]
async fn server_name_replaces_the_url_host_in_verification() {
    let refused = Gateway::start(Options {
        tls: SimulatorTls::IssuedByCa,
        trust: Trust::CaFile,
        account: "server_name = \"miralix.example\"".into(),
        ..Options::default()
    })
    .await;
    assert_eq!(refused.get(&path("id", "1")).await.status, 502);
    assert_eq!(refused.simulator.request_count(), 0);

    let accepted = Gateway::start(Options {
        tls: SimulatorTls::IssuedByCa,
        trust: Trust::CaFile,
        account: "server_name = \"localhost\"".into(),
        ..Options::default()
    })
    .await;
    assert_eq!(accepted.get(&path("id", "1")).await.status, 200);
}

#[tokio::test]
async fn upstream_statuses_and_failures_are_mapped() {
    let gw = Gateway::start(Options {
        cache: NO_STALE,
        // Five failures in a row would open the breaker; that is tested on its own.
        account: "breaker_failures = 100".into(),
        ..Options::default()
    })
    .await;
    let cases = [
        (
            Failure::Status(500),
            502,
            "the Miralix box answered 500 Internal Server Error",
            Some("500"),
        ),
        (
            Failure::Status(503),
            502,
            "the Miralix box answered 503 Service Unavailable",
            Some("503"),
        ),
        (
            Failure::Status(401),
            502,
            "the box rejected the configured shared secret",
            Some("401"),
        ),
        (
            Failure::Status(302),
            502,
            "the Miralix box answered 302 Found",
            Some("302"),
        ),
        (
            Failure::Close,
            502,
            "the connection to the Miralix box failed before a complete answer arrived",
            None,
        ),
    ];
    for (failure, status, message, fwd_status) in cases {
        gw.simulator.set_failure(failure.clone());
        let reply = gw.get(&path("id", "1")).await;
        assert_eq!(reply.status, status, "{failure:?}: {}", reply.text());
        assert_eq!(reply.json()["error"], message, "{failure:?}");
        let cache_status = reply.header("cache-status").unwrap();
        match fwd_status {
            Some(code) => assert!(
                cache_status.contains(&format!("fwd-status={code}")),
                "{cache_status}"
            ),
            None => assert!(!cache_status.contains("fwd-status"), "{cache_status}"),
        }
    }
    // Failures are not stored: the next good answer is a miss and then a hit.
    gw.simulator.set_failure(Failure::None);
    assert_eq!(
        gw.get(&path("id", "1")).await.header("x-cache"),
        Some("MISS")
    );
    assert_eq!(
        gw.get(&path("id", "1")).await.header("x-cache"),
        Some("HIT")
    );
}

#[tokio::test]
async fn bad_request_and_forbidden_pass_through_uncached() {
    let gw = Gateway::start(Options::default()).await;
    for code in [400u16, 403] {
        gw.simulator.set_failure(Failure::Status(code));
        for _ in 0..2 {
            let reply = gw.get(&path("id", "1")).await;
            assert_eq!(reply.status, code);
            assert_eq!(
                reply.json()["Message"],
                "simulated failure",
                "the box's body passes through"
            );
            assert_eq!(reply.header("cache-control"), Some("no-store"));
            assert_eq!(
                reply.header("cache-status"),
                Some(format!("miralix-gateway; fwd=miss; fwd-status={code}").as_str())
            );
        }
    }
    assert_eq!(gw.simulator.request_count(), 4);
}

#[tokio::test]
async fn a_slow_box_is_a_504_after_the_timeout() {
    let gw = Gateway::start(Options {
        account: "timeout = \"300ms\"".into(),
        ..Options::default()
    })
    .await;
    gw.simulator.set_delay(Duration::from_secs(5));
    let reply = gw.get(&path("id", "1")).await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(
        reply.json()["error"],
        "the Miralix box did not answer within 300ms"
    );
}

#[tokio::test]
async fn an_unreachable_box_is_a_502() {
    let closed = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let gw = Gateway::start(Options {
        base_url: Some(format!("https://{dead}")),
        ..Options::default()
    })
    .await;
    let reply = gw.get(&path("id", "1")).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert!(
        !reply.text().contains(&dead.to_string()),
        "the box's address is not disclosed"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "miralix_gateway_upstream_requests_total{account=\"greenbox\",status=\"connect_error\"}"
        ),
        1.0
    );
}

/// The simulated box serves what issue-17 routes will read: recordings per queue and the
/// agent directory, behind the shared secret like every route.
#[tokio::test]
async fn the_simulated_box_serves_queue_recordings_and_the_agent_directory() {
    let boxsim = start_box(SimulatorTls::Plain).await;
    let secret = [("x-miralix-shared-secret", SECRET)];
    let queue = request(
        boxsim.addr(),
        "GET",
        &format!("/mot/{ACCOUNT}/queues/1/calls/recordings"),
        &secret,
    )
    .await;
    assert_eq!(queue.status, 200);
    let list = queue.json();
    let ids: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["QueueCallId"].as_u64().unwrap())
        .collect();
    assert!(!ids.is_empty() && ids.windows(2).all(|w| w[0] < w[1]));
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|r| r["QueueId"] == 1 && r["QueueName"] == "Support")
    );
    let after = request(
        boxsim.addr(),
        "GET",
        &format!(
            "/mot/{ACCOUNT}/queues/1/calls/recordings?fromQueueCallId={}",
            ids[0]
        ),
        &secret,
    )
    .await;
    assert_eq!(after.json().as_array().unwrap().len(), ids.len() - 1);
    for (target, status) in [
        (format!("/mot/{ACCOUNT}/queues/3/calls/recordings"), 404),
        (format!("/mot/{ACCOUNT}/queues/x/calls/recordings"), 400),
        (
            format!("/mot/{ACCOUNT}/queues/1/calls/recordings?fromQueueCallId=-1"),
            400,
        ),
        (format!("/mot/{ACCOUNT}/agents?state=busy"), 400),
    ] {
        assert_eq!(
            request(boxsim.addr(), "GET", &target, &secret).await.status,
            status,
            "{target}"
        );
    }
    let unauthorized = request(
        boxsim.addr(),
        "GET",
        &format!("/mot/{ACCOUNT}/agents?state=any"),
        &[],
    )
    .await;
    assert_eq!(unauthorized.status, 401);
    let everyone = request(
        boxsim.addr(),
        "GET",
        &format!("/mot/{ACCOUNT}/agents?state=any"),
        &secret,
    )
    .await;
    assert_eq!(everyone.json().as_array().unwrap().len(), 4);
    let logged_in = request(
        boxsim.addr(),
        "GET",
        &format!("/mot/{ACCOUNT}/agents"),
        &secret,
    )
    .await;
    let logged_in = logged_in.json();
    assert!(
        logged_in
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["State"] == "LoggedIn")
    );
    assert_eq!(logged_in.as_array().unwrap().len(), 3);
}
