//! The audio store (`[cache.audio]`): a recording downloaded once and then served from disk,
//! `Range` and conditionals answered from the file, one download for concurrent requests, an
//! interrupted download never stored, box errors passed on, the size bound, a warm restart
//! and access control.

use std::path::Path;
use std::time::Duration;

use miralix_gateway::simulator::{Failure, SimulatorTls, audio_byte};

use crate::support::{ACCOUNT, API_KEY, Gateway, Options, SmallDisk, request, sample, wait_until};

/// The first recording of agent 103 on the demo box.
const RECORDING: u64 = 47_000 + 103 * 1_000;

/// Agent 103's recordings, from its list.
async fn recordings(gw: &Gateway) -> Vec<u64> {
    let list = gw
        .get(&format!("/mot/{ACCOUNT}/agents/id/103/recordings"))
        .await;
    let list: Vec<serde_json::Value> = serde_json::from_slice(&list.body).unwrap();
    list.iter()
        .map(|r| r["QueueCallId"].as_u64().unwrap())
        .collect()
}

fn audio_path(id: u64) -> String {
    format!("/mot/{ACCOUNT}/queues/calls/recordings/{id}")
}

fn expected(id: u64, range: std::ops::Range<u64>) -> Vec<u8> {
    range.map(|offset| audio_byte(id, offset)).collect()
}

/// `[cache]` lines with an audio store in `dir`.
fn store_in(dir: &Path, extra: &str) -> &'static str {
    Box::leak(
        format!(
            "ttl = \"30s\"\n[cache.audio]\npath = \"{}\"\n{extra}",
            dir.display()
        )
        .into_boxed_str(),
    )
}

async fn gateway(dir: &Path, extra: &str, account: &str) -> Gateway {
    Gateway::start(Options {
        tls: SimulatorTls::Plain,
        cache: store_in(dir, extra),
        account: account.to_owned(),
        ..Options::default()
    })
    .await
}

/// The whole stored files in the store's directory (not its temporary files).
fn stored_files(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "audio"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, e.metadata().unwrap().len())
        })
        .collect();
    files.sort();
    files
}

fn tmp_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("tmp")).map_or(0, |d| d.flatten().count())
}

async fn metric(gw: &Gateway, name: &str) -> f64 {
    sample(
        &gw.metrics().await,
        &format!("miralix_gateway_{name}{{account=\"{ACCOUNT}\"}}"),
    )
}

async fn wait_stored(gw: &Gateway, dir: &Path, count: usize) {
    wait_until("the download to be stored", || async {
        stored_files(dir).len() == count
    })
    .await;
    gw.state.sync_audio().await;
}

#[tokio::test]
async fn a_recording_is_downloaded_once_then_served_from_disk_with_ranges() {
    const SIZE: u64 = 3 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "", "").await;
    gw.simulator.set_audio_bytes(SIZE);
    let target = audio_path(RECORDING);

    let first = gw.get(&target).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(first.header("content-length"), Some(&*SIZE.to_string()));
    assert_eq!(first.body, expected(RECORDING, 0..SIZE));
    wait_stored(&gw, dir.path(), 1).await;
    let etag = first.header("etag").expect("an ETag").to_owned();
    let last_modified = first
        .header("last-modified")
        .expect("Last-Modified")
        .to_owned();
    let from_box = gw.simulator.audio_bytes_sent();
    assert_eq!(from_box, SIZE);

    let second = gw.get(&target).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert_eq!(second.header("cache-status"), Some("miralix-gateway; hit"));
    assert_eq!(second.header("etag"), Some(&*etag));
    assert_eq!(second.header("content-type"), Some("audio/mpeg"));
    assert_eq!(second.header("accept-ranges"), Some("bytes"));
    assert_eq!(second.body, first.body);

    let range = |value: &str| {
        let target = target.clone();
        let value = value.to_owned();
        async move { request(gw.addr, "GET", &target, &[("Range", &value)]).await }
    };
    let part = range("bytes=1000-1999").await;
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some(&*format!("bytes 1000-1999/{SIZE}"))
    );
    assert_eq!(part.body, expected(RECORDING, 1000..2000));
    let tail = range("bytes=-10").await;
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, expected(RECORDING, SIZE - 10..SIZE));
    let open = range(&format!("bytes={}-", SIZE - 100)).await;
    assert_eq!(open.body, expected(RECORDING, SIZE - 100..SIZE));
    let beyond = range(&format!("bytes={SIZE}-")).await;
    assert_eq!(beyond.status, 416);
    assert_eq!(
        beyond.header("content-range"),
        Some(&*format!("bytes */{SIZE}"))
    );
    assert!(
        beyond.text().contains(&SIZE.to_string()),
        "{}",
        beyond.text()
    );
    let several = range("bytes=0-1,5-6").await;
    assert_eq!(several.status, 200, "a list of ranges is answered whole");

    let not_modified = request(gw.addr, "GET", &target, &[("If-None-Match", &etag)]).await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());
    let since = request(
        gw.addr,
        "GET",
        &target,
        &[("If-Modified-Since", &last_modified)],
    )
    .await;
    assert_eq!(since.status, 304);
    let stale_range = request(
        gw.addr,
        "GET",
        &target,
        &[("Range", "bytes=0-9"), ("If-Range", "\"another\"")],
    )
    .await;
    assert_eq!(stale_range.status, 200, "If-Range that no longer matches");
    let head = request(gw.addr, "HEAD", &target, &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some(&*SIZE.to_string()));
    assert!(head.body.is_empty());

    assert_eq!(
        gw.simulator.audio_bytes_sent(),
        from_box,
        "the box sent it once"
    );
    assert_eq!(gw.simulator.request_count(), 1);
    assert_eq!(metric(&gw, "audio_cache_misses_total").await, 1.0);
    assert_eq!(metric(&gw, "audio_cache_hits_total").await, 10.0);
    assert_eq!(metric(&gw, "audio_bytes_total").await, SIZE as f64);
    let disk = metric(&gw, "audio_disk_bytes_total").await;
    // Four whole bodies (the first read from the download's file) and three parts.
    assert_eq!(disk, (4 * SIZE + 1000 + 10 + 100) as f64);
}

#[tokio::test]
async fn concurrent_requests_for_one_recording_make_one_download() {
    const SIZE: u64 = 2 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "", "").await;
    gw.simulator.set_audio_bytes(SIZE);
    gw.simulator.hold();
    let target = audio_path(RECORDING);
    let clients: Vec<_> = (0..6)
        .map(|n| {
            let (addr, target) = (gw.addr, target.clone());
            tokio::spawn(async move {
                let range = format!("bytes={}-", n * 1000);
                request(addr, "GET", &target, &[("Range", &range)]).await
            })
        })
        .collect();
    assert!(
        gw.simulator
            .wait_for_requests(1, Duration::from_secs(5))
            .await
    );
    wait_until("every client to wait for the download", || async {
        metric(&gw, "audio_cache_misses_total").await == 6.0
    })
    .await;
    gw.simulator.release();
    for (n, client) in clients.into_iter().enumerate() {
        let reply = client.await.unwrap();
        let start = n as u64 * 1000;
        assert_eq!(reply.status, 206, "client {n}");
        assert_eq!(reply.body, expected(RECORDING, start..SIZE), "client {n}");
    }
    assert_eq!(gw.simulator.request_count(), 1, "one box download");
    assert_eq!(gw.simulator.audio_bytes_sent(), SIZE);
    wait_stored(&gw, dir.path(), 1).await;
}

#[tokio::test]
async fn an_interrupted_download_is_never_stored_or_served_as_whole() {
    const SIZE: u64 = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "", "").await;
    gw.simulator.set_audio_bytes(SIZE);
    gw.simulator.set_failure(Failure::ResetMidBody);
    let target = audio_path(RECORDING);
    let broken = gw.get(&target).await;
    assert!(
        (broken.body.len() as u64) < SIZE,
        "the client sees the answer break off ({} bytes)",
        broken.body.len()
    );
    wait_until("the partial file to go", || async {
        tmp_files(dir.path()) == 0
    })
    .await;
    assert!(stored_files(dir.path()).is_empty(), "nothing stored");

    gw.simulator.set_failure(Failure::None);
    let whole = gw.get(&target).await;
    assert_eq!(whole.header("x-cache"), Some("MISS"), "asked again");
    assert_eq!(whole.body, expected(RECORDING, 0..SIZE));
    wait_stored(&gw, dir.path(), 1).await;
    assert_eq!(gw.simulator.request_count(), 2);
}

#[tokio::test]
async fn box_errors_are_passed_on_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "", "").await;
    let unknown = audio_path(1);
    for _ in 0..2 {
        let reply = gw.get(&unknown).await;
        assert_eq!(reply.status, 404);
        assert!(
            reply.text().contains("Recording not found"),
            "{}",
            reply.text()
        );
        assert_eq!(
            reply.header("cache-status"),
            Some("miralix-gateway; fwd=miss; fwd-status=404")
        );
    }
    assert_eq!(gw.simulator.request_count(), 2, "a 404 is asked again");
    gw.simulator.set_failure(Failure::Status(500));
    let failed = gw.get(&audio_path(RECORDING)).await;
    assert_eq!(failed.status, 502, "{}", failed.text());
    assert!(stored_files(dir.path()).is_empty());
}

#[tokio::test]
async fn the_store_stays_within_its_bound_and_evicts_the_least_recently_used() {
    const SIZE: u64 = 300 * 1024;
    let dir = tempfile::tempdir().unwrap();
    // Room for three 300 KiB recordings (and their 4 KiB headers), not four.
    let gw = gateway(
        dir.path(),
        "max_bytes = \"1MiB\"\nmax_file_bytes = \"1MiB\"",
        "",
    )
    .await;
    gw.simulator.set_audio_bytes(SIZE);
    let ids = recordings(&gw).await;
    let (a, b, c, d, big_one) = (ids[1], ids[2], ids[3], ids[4], ids[5]);
    // One at a time, each indexed before the next is asked for: the index's order is a, b, c
    // (a download is indexed after its client has the whole body, so two could cross).
    for (n, id) in [a, b, c].into_iter().enumerate() {
        assert_eq!(gw.get(&audio_path(id)).await.status, 200);
        wait_until("the download to be indexed", || async {
            sample(&gw.metrics().await, "miralix_gateway_audio_store_files") == (n + 1) as f64
        })
        .await;
    }
    wait_stored(&gw, dir.path(), 3).await;
    // a is used again: b is now the least recently used (once the index has taken the read in).
    assert_eq!(gw.get(&audio_path(a)).await.header("x-cache"), Some("HIT"));
    gw.state.sync_audio().await;
    assert_eq!(gw.get(&audio_path(d)).await.status, 200);
    wait_until(
        "the fourth download to be stored and the eviction",
        || async {
            gw.state.sync_audio().await;
            let stored = sample(
                &gw.metrics().await,
                "miralix_gateway_audio_store_downloads_total",
            );
            stored == 4.0 && stored_files(dir.path()).len() == 3
        },
    )
    .await;
    let total: u64 = stored_files(dir.path()).iter().map(|(_, len)| len).sum();
    assert!(total <= 1024 * 1024, "{total} bytes on disk");
    assert_eq!(gw.get(&audio_path(a)).await.header("x-cache"), Some("HIT"));
    assert_eq!(gw.get(&audio_path(c)).await.header("x-cache"), Some("HIT"));
    assert_eq!(
        gw.get(&audio_path(b)).await.header("x-cache"),
        Some("MISS"),
        "b went"
    );
    let metrics = gw.metrics().await;
    assert!(sample(&metrics, "miralix_gateway_audio_store_bytes") <= 1024.0 * 1024.0);
    assert_eq!(
        sample(&metrics, "miralix_gateway_audio_store_max_bytes"),
        1024.0 * 1024.0
    );

    // Larger than max_file_bytes: served whole, not stored.
    gw.simulator.set_audio_bytes(2 * 1024 * 1024);
    let big = gw.get(&audio_path(big_one)).await;
    assert_eq!(big.body.len(), 2 * 1024 * 1024);
    wait_until("the oversized download to be dropped", || async {
        tmp_files(dir.path()) == 0
    })
    .await;
    assert_eq!(
        gw.get(&audio_path(RECORDING + 4)).await.header("x-cache"),
        Some("MISS")
    );
}

#[tokio::test]
async fn a_restart_serves_stored_audio_while_the_box_is_down() {
    const SIZE: u64 = 512 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "", "").await;
    gw.simulator.set_audio_bytes(SIZE);
    assert_eq!(gw.get(&audio_path(RECORDING)).await.status, 200);
    wait_stored(&gw, dir.path(), 1).await;
    // A partial download an earlier run left behind is cleared at start-up.
    std::fs::write(dir.path().join("tmp").join("left-over"), b"partial").unwrap();
    gw.stop().await;

    let restarted = Gateway::start(Options {
        tls: SimulatorTls::Plain,
        cache: store_in(dir.path(), ""),
        base_url: Some("http://127.0.0.1:9".to_owned()),
        ..Options::default()
    })
    .await;
    wait_until("the store to be indexed", || async {
        sample(
            &restarted.metrics().await,
            "miralix_gateway_audio_store_files",
        ) == 1.0
    })
    .await;
    let reply = restarted.get(&audio_path(RECORDING)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-cache"), Some("HIT"));
    assert_eq!(reply.body, expected(RECORDING, 0..SIZE));
    assert_eq!(tmp_files(dir.path()), 0);
    // The box being down is still an error for what is not stored.
    assert_eq!(restarted.get(&audio_path(RECORDING + 1)).await.status, 502);
    assert_eq!(
        restarted
            .get(&audio_path(RECORDING + 1))
            .await
            .header("x-cache"),
        Some("MISS")
    );
}

#[tokio::test]
async fn stored_audio_is_served_only_to_clients_that_may_read_the_account() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "", &format!("api_keys = [\"{API_KEY}\"]")).await;
    let target = audio_path(RECORDING);
    let allowed = request(gw.addr, "GET", &target, &[("X-Api-Key", API_KEY)]).await;
    assert_eq!(allowed.status, 200);
    wait_stored(&gw, dir.path(), 1).await;
    for headers in [vec![], vec![("X-Api-Key", "not-the-key-0123456789")]] {
        let refused = request(gw.addr, "GET", &target, &headers).await;
        assert_eq!(refused.status, 401);
        assert!(refused.header("etag").is_none());
    }
    let again = request(gw.addr, "GET", &target, &[("X-Api-Key", API_KEY)]).await;
    assert_eq!(again.header("x-cache"), Some("HIT"));
    assert_eq!(gw.simulator.request_count(), 1);
}

#[tokio::test]
async fn the_status_page_shows_the_audio_store() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "max_bytes = \"64MiB\"", "").await;
    assert_eq!(gw.get(&audio_path(RECORDING)).await.status, 200);
    wait_stored(&gw, dir.path(), 1).await;
    let page = request(gw.admin, "GET", "/", &[]).await.text();
    assert!(
        page.contains("<span id=\"audio\">1 recordings, 3.0 MiB (max 64.0 MiB)</span>"),
        "{page}"
    );
}

#[tokio::test]
async fn a_store_that_cannot_be_used_leaves_audio_passed_through() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the directory should be.
    let blocked = dir.path().join("not-a-directory");
    std::fs::write(&blocked, b"x").unwrap();
    let gw = gateway(&blocked, "", "").await;
    let reply = gw.get(&audio_path(RECORDING)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("cache-status"),
        Some("miralix-gateway; fwd=bypass")
    );
    assert_eq!(reply.body.len() as u64, gw.simulator.audio_bytes_sent());
}

#[tokio::test]
async fn a_second_gateway_on_the_same_directory_passes_audio_through_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let first = gateway(dir.path(), "", "").await;
    assert_eq!(first.get(&audio_path(RECORDING)).await.status, 200);
    wait_stored(&first, dir.path(), 1).await;
    let stored = stored_files(dir.path());
    // A download the first one has under way.
    std::fs::write(dir.path().join("tmp").join("under-way"), b"partial").unwrap();

    let second = gateway(dir.path(), "", "").await;
    let reply = second.get(&audio_path(RECORDING)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("cache-status"),
        Some("miralix-gateway; fwd=bypass")
    );
    assert_eq!(reply.body, expected(RECORDING, 0..reply.body.len() as u64));
    assert_eq!(
        tmp_files(dir.path()),
        1,
        "the first one's download is left alone"
    );
    assert_eq!(stored_files(dir.path()), stored);
    assert_eq!(
        first.get(&audio_path(RECORDING)).await.header("x-cache"),
        Some("HIT")
    );

    // Once the first has stopped, the directory is free for the next one.
    first.stop().await;
    drop(second);
    let next = gateway(dir.path(), "", "").await;
    let reply = next.get(&audio_path(RECORDING)).await;
    assert_eq!(reply.status, 200);
    assert_ne!(
        reply.header("cache-status"),
        Some("miralix-gateway; fwd=bypass")
    );
}

#[tokio::test]
async fn an_operator_can_delete_stored_recordings() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), "", "").await;
    gw.simulator.set_audio_bytes(64 * 1024);
    let ids = recordings(&gw).await;
    for id in &ids[..3] {
        assert_eq!(gw.get(&audio_path(*id)).await.status, 200);
    }
    wait_stored(&gw, dir.path(), 3).await;
    let admin = |method: &'static str, target: String| {
        let bearer = format!("Bearer {}", crate::support::ADMIN_TOKEN);
        async move { request(gw.admin, method, &target, &[("Authorization", &bearer)]).await }
    };
    let one = admin("DELETE", format!("/cache/{ACCOUNT}/recordings/{}", ids[0])).await;
    assert_eq!(one.status, 200, "{}", one.text());
    assert_eq!(one.json()["purged_audio"], 1);
    assert_eq!(stored_files(dir.path()).len(), 2, "its file is deleted");
    let again = admin("DELETE", format!("/cache/{ACCOUNT}/recordings/{}", ids[0])).await;
    assert_eq!(again.json()["purged_audio"], 0);
    assert_eq!(
        admin("GET", format!("/cache/{ACCOUNT}/recordings/{}", ids[0]))
            .await
            .status,
        405
    );
    let account = admin("DELETE", format!("/cache/{ACCOUNT}")).await;
    assert_eq!(account.json()["purged_audio"], 2);
    assert!(stored_files(dir.path()).is_empty());
    assert_eq!(
        gw.get(&audio_path(ids[1])).await.header("x-cache"),
        Some("MISS")
    );
}

/// The size of each recording in the full-disk tests: one fits on their 5 MiB disk, two do not.
const FULL_DISK_RECORDING: u64 = 3 * 1024 * 1024;

/// A gateway whose audio store (with `extra` settings) is on a 5 MiB tmpfs that holds one stored
/// recording (the first of `ids`), with the box answering chunked or not; `None` where no tmpfs
/// can be mounted.
async fn store_on_a_full_disk(
    chunked: bool,
    extra: &str,
) -> Option<(tempfile::TempDir, SmallDisk, Gateway, Vec<u64>)> {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(dir.path(), "5m")?;
    let gw = gateway(dir.path(), extra, "").await;
    gw.simulator.set_audio_bytes(FULL_DISK_RECORDING);
    gw.simulator.set_audio_chunked(chunked);
    let ids = recordings(&gw).await;
    let first = gw.get(&audio_path(ids[0])).await;
    let length = first.header("content-length").map(str::to_owned);
    assert_eq!(
        length.is_none(),
        chunked,
        "the box answered chunked: {chunked}"
    );
    assert_eq!(first.body, expected(ids[0], 0..FULL_DISK_RECORDING));
    wait_stored(&gw, dir.path(), 1).await;
    Some((dir, disk, gw, ids))
}

/// Two clients ask for each of `ids` at once: each must get all of it, and the box must send
/// it once (the two share one download). None of them is stored beside the first recording.
/// Returns the bytes they were sent from memory (the part the disk refused), after checking
/// that those and the ones sent from the file add up to what the clients received.
async fn each_arrives_whole_and_once(gw: &Gateway, dir: &Path, ids: &[u64]) -> f64 {
    const SIZE: u64 = FULL_DISK_RECORDING;
    let sources = || async {
        let disk = metric(gw, "audio_disk_bytes_total").await;
        (disk, metric(gw, "audio_memory_bytes_total").await)
    };
    let (disk_before, memory_before) = sources().await;
    for &id in ids {
        let (_, memory) = sources().await;
        let sent = gw.simulator.audio_bytes_sent();
        let path = audio_path(id);
        let (a, b) = tokio::join!(gw.get(&path), gw.get(&path));
        for reply in [a, b] {
            assert_eq!(reply.status, 200);
            assert_eq!(reply.body.len() as u64, SIZE, "recording {id} broke off");
            assert_eq!(reply.body, expected(id, 0..SIZE), "recording {id}");
        }
        let box_sent = gw.simulator.audio_bytes_sent() - sent;
        assert_eq!(
            box_sent, SIZE,
            "recording {id}: the box sent {box_sent} bytes"
        );
        let from_memory = sources().await.1 - memory;
        assert!(
            from_memory > 0.0,
            "recording {id}: nothing was sent from memory"
        );
    }
    let (disk, memory) = sources().await;
    assert_eq!(
        (disk - disk_before) + (memory - memory_before),
        (2 * SIZE * ids.len() as u64) as f64,
        "every byte the clients got was counted once, from the file or from memory"
    );
    assert_eq!(stored_files(dir).len(), 1);
    assert_eq!(tmp_files(dir), 0);
    // Each one the store could not write is counted (what MiralixAudioStoreCannotWrite reads).
    let failures = sample(
        &gw.metrics().await,
        "miralix_gateway_audio_store_write_failures_total",
    );
    assert_eq!(failures, ids.len() as f64);
    memory - memory_before
}

#[tokio::test]
async fn on_a_disk_too_full_for_a_recording_the_audio_still_arrives_whole() {
    // Room for one recording: the next ones cannot be stored, and must still arrive whole.
    let Some((dir, _disk, gw, ids)) = store_on_a_full_disk(false, "").await else {
        return;
    };
    // The clients share one download, kept in memory and not stored: nothing came from disk.
    let from_memory = each_arrives_whole_and_once(&gw, dir.path(), &ids[1..4]).await;
    assert_eq!(from_memory, (2 * 3 * FULL_DISK_RECORDING) as f64);
    // A range of a recording that could not be stored: from the box, whole or in part.
    let range = request(
        gw.addr,
        "GET",
        &audio_path(ids[1]),
        &[("Range", "bytes=1000-1999")],
    )
    .await;
    assert_eq!(range.status, 206);
    assert_eq!(range.body, expected(ids[1], 1000..2000));
}

#[tokio::test]
async fn without_memory_for_refused_downloads_each_client_gets_the_recording_from_the_box() {
    // An operator who keeps no memory for them (or too little for a recording): each client's
    // recording comes from the box, whole, and none is kept in memory or stored.
    for limit in ["0", "1MiB"] {
        let extra = format!("max_memory_bytes = \"{limit}\"");
        let Some((dir, _disk, gw, ids)) = store_on_a_full_disk(false, &extra).await else {
            return;
        };
        let sent = gw.simulator.audio_bytes_sent();
        let path = audio_path(ids[1]);
        let (a, b) = tokio::join!(gw.get(&path), gw.get(&path));
        // One of them is handed the download's own answer; the other asks the box itself.
        let statuses: Vec<_> = [&a, &b]
            .iter()
            .map(|reply| reply.header("cache-status").unwrap_or_default().to_owned())
            .collect();
        let bypass = statuses.iter().filter(|s| s.contains("fwd=bypass")).count();
        assert_eq!(bypass, 1, "max_memory_bytes = {limit}: {statuses:?}");
        for reply in [a, b] {
            assert_eq!(reply.status, 200, "max_memory_bytes = {limit}");
            assert_eq!(reply.body, expected(ids[1], 0..FULL_DISK_RECORDING));
        }
        assert_eq!(
            gw.simulator.audio_bytes_sent() - sent,
            2 * FULL_DISK_RECORDING,
            "max_memory_bytes = {limit}: one copy per client"
        );
        assert_eq!(metric(&gw, "audio_memory_bytes_total").await, 0.0);
        assert_eq!(stored_files(dir.path()).len(), 1);
        assert_eq!(tmp_files(dir.path()), 0);
    }
}

#[tokio::test]
async fn a_chunked_recording_that_fills_the_disk_half_way_still_arrives_whole() {
    // Room for one recording and part of a second: without a length nothing can be reserved,
    // so the second fills the disk in the middle of its download.
    let Some((dir, _disk, gw, ids)) = store_on_a_full_disk(true, "").await else {
        return;
    };
    // The second client follows the first one's download, file and then memory.
    let _ = each_arrives_whole_and_once(&gw, dir.path(), &ids[1..3]).await;
    // The stored one is still served whole, from disk.
    let again = gw.get(&audio_path(ids[0])).await;
    assert_eq!(again.header("x-cache"), Some("HIT"));
    assert_eq!(again.body, expected(ids[0], 0..FULL_DISK_RECORDING));
}
