//! Domain-aware caching: `fromQueueCallId` answered from the stored full list, delta refresh,
//! the full-refresh interval, 6.5 emulation, compression, purge and refresh, audio.

use std::io::Read as _;
use std::time::Duration;

use miralix_gateway::simulator::{Failure, audio_byte};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    ACCOUNT, ADMIN_TOKEN, EMAIL, Gateway, Options, SECRET, ids, list_fetches, path, request,
    sample, wait_until,
};

fn gunzip(body: &[u8]) -> Vec<u8> {
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut plain)
        .expect("a gzip body");
    plain
}

/// `[cache]` where a request after the TTL fetches in the foreground (no revalidate window),
/// so a test sees each refresh as the answer to its own request.
const FOREGROUND: &str =
    "ttl = \"30s\"\nstale_while_revalidate = \"0s\"\nfull_refresh_interval = \"2m\"";

#[tokio::test]
async fn from_queue_call_id_is_selected_from_the_stored_list_without_asking_the_box() {
    let gw = Gateway::plain("ttl = \"30s\"", "").await;
    let list = path("id", "103");
    let full = gw.get(&list).await;
    assert_eq!(full.header("x-cache"), Some("MISS"));
    let all = ids(&full.body);
    let (first, last) = (all[0], all[all.len() - 1]);
    let points = [
        0,
        first - 1,
        first,
        all[2],
        all[20] + 1,
        last - 1,
        last,
        u64::MAX,
    ];
    let mut expected = Vec::new();
    for n in points {
        expected.push(gw.box_answer(&format!("{list}?fromQueueCallId={n}")).await);
    }
    let asked = gw.simulator.request_count();

    for (n, expected) in points.iter().zip(&expected) {
        // Another spelling of the same agent, and the parameter in another case.
        let target = format!("{}?FROMqueueCALLID={n}", path("ID", "0103"));
        let reply = gw.get(&target).await;
        assert_eq!(reply.status, 200, "{n}");
        assert_eq!(reply.header("x-cache"), Some("HIT"), "{n}");
        let got: Value = serde_json::from_slice(&reply.body).unwrap();
        let want: Value = serde_json::from_slice(expected).unwrap();
        assert_eq!(got, want, "fromQueueCallId={n}");
        assert_eq!(&reply.body, expected, "each element's bytes, in order");
        assert!(reply.header("etag").is_some());
    }
    assert_eq!(gw.simulator.request_count(), asked, "the box was not asked");
    let metrics = gw.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            &format!("miralix_gateway_cache_selections_total{{account=\"{ACCOUNT}\"}}")
        ),
        points.len() as f64
    );
    assert_eq!(sample(&metrics, &list_fetches("full")), 1.0);
    assert_eq!(sample(&metrics, &list_fetches("filtered")), 0.0);
}

#[tokio::test]
async fn a_stale_list_is_refreshed_by_delta_and_equals_a_full_fetch() {
    let gw = Gateway::plain(FOREGROUND, "").await;
    let list = path("id", "103");
    let before = gw.get(&list).await;
    let max = *ids(&before.body).iter().max().unwrap();
    let added = gw.simulator.add_calls(ACCOUNT, 103, 3);
    assert_eq!(added.len(), 3);

    gw.settled().await;
    gw.clock.advance(Duration::from_secs(31));
    let after = gw.get(&list).await;
    assert_eq!(after.status, 200);
    assert_eq!(after.header("x-cache"), Some("MISS"));
    let received = gw.simulator.received();
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[1].target,
        format!("/mot/{ACCOUNT}/agents/id/103/recordings?fromQueueCallId={max}"),
        "the refresh asked only for what is new"
    );
    let whole = gw.box_answer(&list).await;
    let merged: Value = serde_json::from_slice(&after.body).unwrap();
    assert_eq!(merged, serde_json::from_slice::<Value>(&whole).unwrap());
    assert_ne!(before.header("etag"), after.header("etag"));

    // The new calls are selectable at once, still without asking the box.
    let asked = gw.simulator.request_count();
    let news = gw.get(&format!("{list}?fromQueueCallId={max}")).await;
    assert_eq!(ids(&news.body), added);
    assert_eq!(gw.simulator.request_count(), asked);

    // Nothing new: the entry (and its tag) is kept as it was.
    gw.settled().await;
    gw.clock.advance(Duration::from_secs(31));
    let same = gw.get(&list).await;
    assert_eq!(same.header("etag"), after.header("etag"));
    assert_eq!(same.body, after.body);
    let metrics = gw.metrics().await;
    assert_eq!(sample(&metrics, &list_fetches("full")), 1.0);
    assert_eq!(sample(&metrics, &list_fetches("delta")), 2.0);
    let delta_bytes = sample(
        &metrics,
        &format!(
            "miralix_gateway_upstream_list_bytes_total{{account=\"{ACCOUNT}\",kind=\"delta\"}}"
        ),
    );
    assert!(
        delta_bytes < before.body.len() as f64 / 5.0,
        "deltas moved {delta_bytes} bytes against a {}-byte list",
        before.body.len()
    );
}

#[tokio::test]
async fn a_deletion_on_the_box_shows_up_after_the_full_refresh_interval() {
    let gw = Gateway::plain(FOREGROUND, "").await;
    let list = path("id", "103");
    let first = ids(&gw.get(&list).await.body);
    let gone = first[5];
    assert!(gw.simulator.delete_recording(ACCOUNT, gone));

    // A delta cannot see a deletion...
    gw.settled().await;
    gw.clock.advance(Duration::from_secs(31));
    let delta = gw.get(&list).await;
    assert!(ids(&delta.body).contains(&gone));
    assert!(
        gw.simulator.received()[1]
            .target
            .contains("fromQueueCallId=")
    );

    // ...the whole list, fetched once the interval (2m) has passed since the last one, does.
    gw.clock.advance(Duration::from_secs(90));
    let full = gw.get(&list).await;
    let received = gw.simulator.received();
    assert_eq!(
        received.last().unwrap().target,
        format!("/mot/{ACCOUNT}/agents/id/103/recordings")
    );
    let now = ids(&full.body);
    assert!(!now.contains(&gone));
    assert_eq!(now.len(), first.len() - 1);
}

#[tokio::test]
async fn an_expired_list_is_still_the_base_of_a_delta() {
    // No stale windows at all: the entry can no longer be served after the TTL, but it is
    // kept (within the full-refresh interval) to refresh from.
    let gw = Gateway::plain(
        "ttl = \"30s\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"0s\"",
        "",
    )
    .await;
    let list = path("id", "1");
    gw.get(&list).await;
    gw.settled().await;
    gw.clock.advance(Duration::from_secs(60));
    assert_eq!(gw.get(&list).await.header("x-cache"), Some("MISS"));
    assert!(
        gw.simulator.received()[1]
            .target
            .contains("fromQueueCallId=")
    );
}

#[tokio::test]
async fn a_6_5_box_gets_no_parameter_and_the_gateway_filters() {
    let gw = Gateway::plain(FOREGROUND, "api_version = \"6.5\"").await;
    gw.simulator.set_api_6_5(true);
    let list = path("sipUri", "sip:lp1@company.local");
    let whole = gw.box_answer(&list).await;
    let all = ids(&whole);
    let from = all[30];
    let reply = gw.get(&format!("{list}?fromQueueCallId={from}")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(ids(&reply.body), all[31..].to_vec());

    gw.clock.advance(Duration::from_secs(31));
    gw.get(&format!("{list}?fromQueueCallId={from}")).await;
    for received in &gw.simulator.received() {
        assert!(
            !received.target.contains('?'),
            "a 6.5 box is never sent a query: {}",
            received.target
        );
    }
    assert_eq!(
        gw.simulator.request_count(),
        3,
        "two fetches of the whole list"
    );

    // A list without numeric ids cannot be filtered, and a 6.5 box cannot do it either.
    gw.simulator.set_failure(Failure::TextIds);
    let other = gw
        .get(&format!("{}?fromQueueCallId=1", path("id", "1")))
        .await;
    assert_eq!(other.status, 502);
    assert!(other.text().contains("6.5"), "{}", other.text());
}

#[tokio::test]
async fn a_list_without_numeric_ids_is_cached_as_plain_bytes() {
    let gw = Gateway::plain(FOREGROUND, "").await;
    gw.simulator.set_failure(Failure::TextIds);
    let list = path("id", "104");
    let full = gw.get(&list).await;
    assert_eq!(full.status, 200);
    let target = format!("{list}?fromQueueCallId=5");
    let filtered = gw.get(&target).await;
    assert_eq!(filtered.status, 200);
    assert_eq!(
        gw.simulator.received()[1].target,
        format!("/mot/{ACCOUNT}/agents/id/104/recordings?fromQueueCallId=5"),
        "the box filters what the gateway cannot"
    );
    assert_eq!(gw.get(&target).await.header("x-cache"), Some("HIT"));
    // And the full list is refreshed whole: there is no highest id to ask after.
    gw.clock.advance(Duration::from_secs(31));
    gw.get(&list).await;
    assert_eq!(
        gw.simulator.received()[2].target,
        format!("/mot/{ACCOUNT}/agents/id/104/recordings")
    );
}

#[tokio::test]
async fn gzip_is_served_to_clients_that_accept_it_and_round_trips() {
    let gw = Gateway::start(Options::default()).await;
    let list = path("id", "103");
    let plain = gw.get(&list).await;
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("vary"), Some("accept-encoding"));
    gw.settled().await;
    let zipped = request(gw.addr, "GET", &list, &[("Accept-Encoding", "br, gzip")]).await;
    assert_eq!(zipped.header("x-cache"), Some("HIT"));
    assert_eq!(zipped.header("content-encoding"), Some("gzip"));
    assert_eq!(zipped.header("vary"), Some("accept-encoding"));
    assert!(zipped.body.len() < plain.body.len() / 3);
    assert_eq!(gunzip(&zipped.body), plain.body);
    let (plain_tag, zipped_tag) = (
        plain.header("etag").unwrap(),
        zipped.header("etag").unwrap(),
    );
    assert_ne!(plain_tag, zipped_tag, "one tag per representation");

    let revalidate = |tag: String, encoding: &'static str| {
        let (addr, list) = (gw.addr, list.clone());
        async move {
            request(
                addr,
                "GET",
                &list,
                &[("If-None-Match", &tag), ("Accept-Encoding", encoding)],
            )
            .await
        }
    };
    let not_modified = revalidate(zipped_tag.to_owned(), "gzip").await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());
    assert_eq!(not_modified.header("content-encoding"), None);
    assert_eq!(not_modified.header("etag"), Some(zipped_tag));
    assert_eq!(
        revalidate(zipped_tag.to_owned(), "identity").await.status,
        200
    );
    assert_eq!(
        revalidate(plain_tag.to_owned(), "gzip;q=0").await.status,
        304
    );

    let head = request(gw.addr, "HEAD", &list, &[("Accept-Encoding", "gzip")]).await;
    assert_eq!(
        head.header("content-length"),
        Some(zipped.body.len().to_string().as_str())
    );
    // A selection is compressed too, and a short one (`[]`) is not worth it.
    let selected = request(
        gw.addr,
        "GET",
        &format!("{list}?fromQueueCallId=1"),
        &[("Accept-Encoding", "gzip")],
    )
    .await;
    assert_eq!(gunzip(&selected.body), plain.body);
    let empty = request(
        gw.addr,
        "GET",
        &format!("{list}?fromQueueCallId={}", u64::MAX),
        &[("Accept-Encoding", "gzip")],
    )
    .await;
    assert_eq!(empty.header("content-encoding"), None);
    assert_eq!(empty.body, b"[]");
}

#[tokio::test]
async fn gzip_can_be_turned_off() {
    let gw = Gateway::start(Options {
        cache: "gzip = false",
        ..Options::default()
    })
    .await;
    let reply = request(
        gw.addr,
        "GET",
        &path("id", "103"),
        &[("Accept-Encoding", "gzip")],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-encoding"), None);
    assert!(reply.json().is_array());
}

#[tokio::test]
async fn cache_control_needs_the_admin_token() {
    let gw = Gateway::start(Options::default()).await;
    gw.get(&path("id", "1")).await;
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong-token-0123456789")],
        vec![("Authorization", ADMIN_TOKEN)],
    ] {
        let reply = request(gw.admin, "DELETE", "/cache", &headers).await;
        assert_eq!(reply.status, 401, "{headers:?}");
        assert!(
            reply
                .header("www-authenticate")
                .unwrap()
                .starts_with("Bearer")
        );
    }
    assert_eq!(
        gw.get(&path("id", "1")).await.header("x-cache"),
        Some("HIT")
    );
    assert_eq!(
        request(gw.admin, "GET", "/metrics", &[]).await.status,
        200,
        "metrics stay open"
    );

    let closed = Gateway::start(Options {
        admin_token: false,
        ..Options::default()
    })
    .await;
    let reply = closed.admin("DELETE", "/cache").await;
    assert_eq!(reply.status, 403);
    assert!(
        reply.text().contains("admin.token_file"),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn purge_removes_one_agent_an_account_or_everything_and_says_how_many() {
    let gw = Gateway::start(Options::default()).await;
    for agent in ["1", "103", "104"] {
        gw.get(&path("id", agent)).await;
    }
    gw.get(&path("email", EMAIL)).await;
    gw.get(&format!("{}?fromQueueCallId=5", path("id", "103")))
        .await;

    let one = gw.admin("DELETE", "/cache/greenbox/agents/ID/0103").await;
    assert_eq!(one.status, 200, "{}", one.text());
    assert_eq!(
        one.json()["purged"],
        1,
        "id 103 only, not its email spelling"
    );
    assert_eq!(
        gw.get(&path("id", "103")).await.header("x-cache"),
        Some("MISS")
    );
    let by_email = gw
        .admin(
            "DELETE",
            "/cache/greenbox/agents/email/DEREK.A%40Company.Local",
        )
        .await;
    assert_eq!(by_email.json()["purged"], 1);

    let account = gw.admin("DELETE", "/cache/greenbox").await;
    assert_eq!(account.json()["purged"], 3);
    assert_eq!(
        gw.admin("DELETE", "/cache/greenbox").await.json()["purged"],
        0
    );
    gw.get(&path("id", "1")).await;
    assert_eq!(gw.admin("DELETE", "/cache").await.json()["purged"], 1);
    assert_eq!(
        gw.get(&path("id", "1")).await.header("x-cache"),
        Some("MISS")
    );

    let unknown = gw.admin("DELETE", "/cache/otherbox").await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.text().contains("otherbox"));
    let bad = gw.admin("DELETE", "/cache/greenbox/agents/id/abc").await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    // GET lists (see status.rs); other methods are refused.
    let wrong = gw.admin("POST", "/cache/greenbox").await;
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.header("allow"), Some("GET, HEAD, DELETE"));
    let wrong = gw.admin("GET", "/cache/greenbox/agents/id/1").await;
    assert_eq!(wrong.header("allow"), Some("DELETE"));
    let wrong = gw
        .admin("DELETE", "/cache/greenbox/agents/id/1/refresh")
        .await;
    assert_eq!(wrong.header("allow"), Some("POST"));
    // The public listener has no such endpoints.
    assert_eq!(request(gw.addr, "DELETE", "/cache", &[]).await.status, 404);
}

#[tokio::test]
async fn refresh_fetches_the_whole_list_now() {
    let gw = Gateway::start(Options::default()).await;
    let list = path("id", "103");
    assert_eq!(ids(&gw.get(&list).await.body).len(), 40);
    let added = gw.simulator.add_calls(ACCOUNT, 103, 2);

    let reply = gw
        .admin("POST", "/cache/greenbox/agents/id/103/refresh")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["status"], 200);
    assert_eq!(json["recordings"], 42);
    assert_eq!(
        gw.simulator.received().last().unwrap().target,
        format!("/mot/{ACCOUNT}/agents/id/103/recordings"),
        "an operator's refresh is never a delta"
    );
    let now = gw.get(&list).await;
    assert_eq!(now.header("x-cache"), Some("HIT"));
    assert!(ids(&now.body).ends_with(&added));

    gw.simulator.set_failure(Failure::Status(500));
    let failed = gw
        .admin("POST", "/cache/greenbox/agents/id/103/refresh")
        .await;
    assert_eq!(failed.status, 502);
    assert_eq!(gw.get(&list).await.status, 200, "the stored list stays");
}

fn audio_path(id: u64) -> String {
    format!("/mot/{ACCOUNT}/queues/calls/recordings/{id}")
}

/// The first recording of agent 103 on the demo box.
const RECORDING: u64 = 47_000 + 103 * 1_000;

#[tokio::test]
async fn audio_is_streamed_with_flat_memory() {
    const TOTAL: u64 = 64 * 1024 * 1024;
    // Bytes that can be in flight between the box and the client: socket buffers on both
    // hops and the gateway's own. A buffering proxy would hold all 64 MiB first.
    const SLACK: u64 = 32 * 1024 * 1024;
    let gw = Gateway::start(Options::default()).await;
    gw.simulator.set_audio_bytes(TOTAL);
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        audio_path(RECORDING)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut raw = Vec::new();
    let body_start = loop {
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(n > 0, "closed before the headers");
        raw.extend_from_slice(&buffer[..n]);
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let headers = String::from_utf8_lossy(&raw[..body_start]).to_lowercase();
    assert!(headers.starts_with("http/1.1 200"), "{headers}");
    assert!(
        headers.contains(&format!("content-length: {TOTAL}")),
        "{headers}"
    );
    assert!(headers.contains("content-type: audio/mpeg"));
    assert!(
        !headers.contains("set-cookie"),
        "box headers are allow-listed"
    );
    let mut read = (raw.len() - body_start) as u64;
    let mut offset = 0u64;
    let check = |bytes: &[u8], offset: &mut u64| {
        for byte in bytes {
            assert_eq!(*byte, audio_byte(RECORDING, *offset), "byte {offset}");
            *offset += 1;
        }
    };
    check(&raw[body_start..], &mut offset);
    let mut max_lag = 0;
    while read < TOTAL {
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(n > 0, "ended after {read} bytes");
        check(&buffer[..n], &mut offset);
        read += n as u64;
        let lag = gw.simulator.audio_bytes_sent().saturating_sub(read);
        max_lag = max_lag.max(lag);
        assert!(lag <= SLACK, "the box is {lag} bytes ahead of the client");
    }
    assert_eq!(read, TOTAL);
    assert!(max_lag > 0, "the box was measured while it sent");
    let metrics = gw.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            &format!("miralix_gateway_audio_bytes_total{{account=\"{ACCOUNT}\"}}")
        ),
        TOTAL as f64
    );
    let received = gw.simulator.received();
    assert_eq!(received[0].target, audio_path(RECORDING));
    assert_eq!(
        received[0].headers["x-miralix-shared-secret"], SECRET,
        "the secret is added on the way"
    );
}

#[tokio::test]
async fn audio_ranges_are_forwarded_and_errors_are_clear() {
    let gw = Gateway::start(Options {
        account: "max_audio_streams = 1".into(),
        ..Options::default()
    })
    .await;
    gw.simulator.set_audio_bytes(10_000);
    let target = audio_path(RECORDING);
    let part = request(gw.addr, "GET", &target, &[("Range", "bytes=100-199")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-range"), Some("bytes 100-199/10000"));
    let expected: Vec<u8> = (100..200).map(|o| audio_byte(RECORDING, o)).collect();
    assert_eq!(part.body, expected);
    let tail = request(gw.addr, "GET", &target, &[("Range", "bytes=-10")]).await;
    assert_eq!(tail.header("content-range"), Some("bytes 9990-9999/10000"));
    let beyond = request(gw.addr, "GET", &target, &[("Range", "bytes=20000-")]).await;
    assert_eq!(beyond.status, 416);
    assert_eq!(beyond.header("content-range"), Some("bytes */10000"));
    let head = request(gw.addr, "HEAD", &target, &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("10000"));
    assert!(head.body.is_empty());
    assert_eq!(
        request(gw.addr, "GET", &audio_path(1), &[]).await.status,
        404
    );
    let bad = gw
        .get(&format!("/mot/{ACCOUNT}/queues/calls/recordings/abc"))
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("queueCallId"), "{}", bad.text());

    // One stream at a time for this account: a second gets 503 while the first runs.
    gw.simulator.hold();
    let asked = gw.simulator.request_count();
    let first = crate::support::spawn_get(gw.addr, target.clone());
    assert!(
        gw.simulator
            .wait_for_requests(asked + 1, Duration::from_secs(10))
            .await
    );
    let second = gw.get(&target).await;
    assert_eq!(second.status, 503, "{}", second.text());
    assert_eq!(second.header("retry-after"), Some("1"));
    assert!(second.text().contains("max_audio_streams"));
    gw.simulator.release();
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(gw.get(&target).await.status, 200, "the slot is free again");
}

#[tokio::test]
async fn a_miss_is_answered_before_its_compressed_copy_is_made_and_a_selection_is_made_from_it() {
    let gw = Gateway::plain("ttl = \"30s\"", "").await;
    let list = path("id", "103");
    let all = ids(&gw.box_answer(&list).await);
    let after = all[all.len() / 2];
    gw.simulator.hold();
    let gzip = [("Accept-Encoding", "gzip")];
    let (addr, full_target) = (gw.addr, list.clone());
    let full = tokio::spawn(async move { request(addr, "GET", &full_target, &gzip).await });
    let selected_target = format!("{list}?fromQueueCallId={after}");
    let selected = tokio::spawn(async move { request(addr, "GET", &selected_target, &[]).await });
    wait_until("both requests to wait for the one fetch", || async {
        gw.state.waiting() == 2
    })
    .await;
    gw.simulator.release();
    let (full, selected) = (full.await.unwrap(), selected.await.unwrap());
    // The first answer is the box's bytes as checked: not compressed, though gzip was
    // accepted, because its compressed copy was made after the waiting clients had it.
    assert_eq!(full.header("x-cache"), Some("MISS"));
    assert_eq!(full.header("content-encoding"), None);
    assert_eq!(ids(&full.body), all);
    assert!(
        full.header("etag").is_some(),
        "the tag is there from the first answer"
    );
    // The request that selects got its elements from the same first answer, and did not ask
    // the box itself.
    assert_eq!(selected.status, 200);
    let expected: Vec<u64> = all.iter().copied().filter(|id| *id > after).collect();
    assert_eq!(ids(&selected.body), expected);
    assert_eq!(
        gw.simulator.request_count(),
        2,
        "the direct read and one fetch"
    );
    // What was stored once the fill finished has its compressed copy, of the same bytes.
    gw.settled().await;
    let hit = request(gw.addr, "GET", &list, &[("Accept-Encoding", "gzip")]).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hit.header("content-encoding"), Some("gzip"));
    assert_eq!(gunzip(&hit.body), full.body);
}
