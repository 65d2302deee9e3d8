//! Running it like production: TLS termination, reload, shutdown, timeouts and limits.

use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::support::*;

fn tls_options() -> Options {
    Options {
        terminate_tls: true,
        ..Options::default()
    }
}

async fn tls_connect(gw: &Gateway, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    gw.tls
        .as_ref()
        .unwrap()
        .connector(alpn)
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the gateway")
}

fn peer_certificate(
    stream: &tokio_rustls::client::TlsStream<TcpStream>,
) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

#[tokio::test]
async fn https_requests_are_served_with_the_configured_certificate() {
    let gw = Gateway::start(tls_options()).await;
    let stream = tls_connect(&gw, &[b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut client = KeepAlive::new(stream);
    let first = client.get(&path("email", EMAIL)).await.unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let second = client.get(&path("email", EMAIL)).await.unwrap();
    assert_eq!(second.header("x-cache"), Some("HIT"));

    // Plain HTTP on the TLS port is not served.
    let raw = exchange(gw.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(!raw.starts_with(b"HTTP/1.1 200"));
}

#[tokio::test]
async fn http2_is_negotiated_with_alpn() {
    let gw = Gateway::start(tls_options()).await;
    let stream = tls_connect(&gw, &[b"h2", b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(stream);

    // curl speaks HTTP/2 for real; it is installed by .ci/run.
    let ca = gw.dir().join("gateway-ca.pem");
    std::fs::write(&ca, &gw.tls.as_ref().unwrap().ca_pem).unwrap();
    let port = gw.addr.port();
    let url = format!("https://localhost:{port}{}", path("id", "103"));
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "--http2", "--cacert"])
            .arg(&ca)
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args([
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                &url,
            ])
            .output()
            .expect("curl runs")
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "2 200",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_reloaded_certificate_is_used_for_new_connections_while_open_ones_keep_working() {
    let gw = Gateway::start(tls_options()).await;
    let old_stream = tls_connect(&gw, &[b"http/1.1"]).await;
    let old_certificate = peer_certificate(&old_stream);
    let mut old = KeepAlive::new(old_stream);
    assert_eq!(old.get(&path("id", "1")).await.unwrap().status, 200);

    let new_certificate = gw.tls.as_ref().unwrap().issue();
    assert_ne!(new_certificate, old_certificate);
    let report = gw.reload().await.expect("reload succeeds");
    assert_eq!(report.unchanged, ["greenbox"]);
    assert!(report.restart_required.is_empty());

    let new_stream = tls_connect(&gw, &[b"http/1.1"]).await;
    assert_eq!(
        peer_certificate(&new_stream),
        new_certificate,
        "new handshake, new certificate"
    );
    let mut new = KeepAlive::new(new_stream);
    assert_eq!(
        new.get(&path("id", "1")).await.unwrap().header("x-cache"),
        Some("HIT")
    );
    let again = old
        .get(&path("id", "1"))
        .await
        .expect("the old connection is still open");
    assert_eq!(again.status, 200);
    assert_eq!(
        again.header("x-cache"),
        Some("HIT"),
        "the cache survived the reload"
    );
    assert_eq!(gw.simulator.request_count(), 1);
}

#[tokio::test]
async fn a_failed_reload_changes_nothing() {
    let gw = Gateway::start(tls_options()).await;
    let mut before = KeepAlive::new(tls_connect(&gw, &[b"http/1.1"]).await);
    assert_eq!(before.get(&path("id", "1")).await.unwrap().status, 200);
    let tls = gw.tls.as_ref().unwrap();
    for broken in [
        gw.config_text
            .replace("[cache]", "[cache]\nttl_typo = \"1s\""),
        gw.config_text
            .replace(&tls.key_path.display().to_string(), "/nonexistent/key.pem"),
        gw.config_text
            .replace("base_url = \"https://", "base_url = \"ftp://"),
    ] {
        let error = gw.reload_text(&broken).await.unwrap_err();
        assert!(error.contains("reload.toml"), "{error}");
    }
    // A key that does not belong to the certificate is refused too.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let key_path = gw.dir().join("other-key.pem");
    std::fs::write(&key_path, other_key.serialize_pem()).unwrap();
    let mismatched = gw.config_text.replace(
        &tls.key_path.display().to_string(),
        &key_path.display().to_string(),
    );
    let error = gw.reload_text(&mismatched).await.unwrap_err();
    assert!(
        error.contains("does not belong to the certificate"),
        "{error}"
    );

    let stream = tls_connect(&gw, &[b"http/1.1"]).await;
    let mut client = KeepAlive::new(stream);
    let reply = client.get(&path("id", "1")).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-cache"), Some("HIT"));
}

#[tokio::test]
async fn reload_keeps_unchanged_accounts_cached_and_refreshes_changed_ones() {
    let gw = Gateway::start(Options::default()).await;
    assert_eq!(
        gw.get(&path("id", "1")).await.header("x-cache"),
        Some("MISS")
    );

    let same = gw.reload().await.unwrap();
    assert_eq!(same.unchanged, ["greenbox"]);
    assert_eq!(
        gw.get(&path("id", "1")).await.header("x-cache"),
        Some("HIT")
    );

    let changed_text = gw
        .config_text
        .replace(
            "[accounts.greenbox]",
            "[accounts.greenbox]\nconnect_timeout = \"2s\"",
        )
        .replace("[server]", "[server]\nmax_connections = 10");
    let changed = gw.reload_text(&changed_text).await.unwrap();
    assert_eq!(changed.changed, ["greenbox"]);
    assert_eq!(changed.restart_required, ["server.max_connections"]);
    assert_eq!(
        gw.get(&path("id", "1")).await.header("x-cache"),
        Some("MISS")
    );
    assert_eq!(gw.simulator.request_count(), 2);

    // A removed account is gone at once.
    let renamed = changed_text.replace("[accounts.greenbox]", "[accounts.bluebox]");
    let report = gw.reload_text(&renamed).await.unwrap();
    assert_eq!(
        (report.added, report.removed),
        (vec!["bluebox".to_owned()], vec!["greenbox".to_owned()])
    );
    // Still not what runs: the process started with the default.
    assert_eq!(report.restart_required, ["server.max_connections"]);
    assert_eq!(gw.get(&path("id", "1")).await.status, 404);
    // Back to what runs: nothing waits for a restart, whatever the files in between said.
    let original = gw.reload_text(&gw.config_text).await.unwrap();
    assert!(
        original.restart_required.is_empty(),
        "{:?}",
        original.restart_required
    );
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish_and_refuses_new_connections() {
    let mut gw = Gateway::start(Options {
        server: "shutdown_grace = \"20s\"",
        ..Options::default()
    })
    .await;
    gw.simulator.hold();
    let in_flight = spawn_get(gw.addr, path("id", "103"));
    assert!(
        gw.simulator
            .wait_for_requests(1, Duration::from_secs(10))
            .await
    );
    gw.signal_stop();
    wait_until("the listeners close", || async { !gw.state.is_ready() }).await;
    let refused = TcpStream::connect(gw.addr).await;
    assert_eq!(
        refused.map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    gw.simulator.release();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json().as_array().unwrap().len(),
        40,
        "the complete response"
    );
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_cuts_off_what_outlasts_the_grace_period() {
    let mut gw = Gateway::start(Options {
        server: "shutdown_grace = \"200ms\"",
        ..Options::default()
    })
    .await;
    gw.simulator.hold();
    let addr = gw.addr;
    let stuck = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", path("id", "1")).as_bytes(),
        )
        .await
        .unwrap();
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw).await;
        raw
    });
    assert!(
        gw.simulator
            .wait_for_requests(1, Duration::from_secs(10))
            .await
    );
    let started = Instant::now();
    gw.signal_stop();
    gw.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped after the grace period"
    );
    assert!(
        stuck.await.unwrap().is_empty(),
        "the stuck request was cut off"
    );
}

#[tokio::test]
async fn a_client_that_sends_half_a_request_is_disconnected() {
    let gw = Gateway::start(Options {
        server: "header_read_timeout = \"300ms\"",
        ..Options::default()
    })
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"GET /mot/greenbox/agents/id/1/recordings HTTP/1.1\r\nHost: x\r\n",
    )
    .await
    .unwrap();
    let mut client = KeepAlive::new(stream);
    assert!(client.closed_by_server(Duration::from_secs(10)).await);
    assert_eq!(gw.simulator.request_count(), 0);
}

#[tokio::test]
async fn a_kept_alive_client_that_sends_half_of_its_next_request_is_disconnected() {
    let (gw, mut client) =
        kept_alive_after_one_request("header_read_timeout = \"300ms\"\nidle_timeout = \"30s\"")
            .await;
    send_half_a_head_and_wait_for_the_close(&mut client).await;
    assert_eq!(gw.simulator.request_count(), 1);
}

/// A gateway with these `[server]` settings and a kept-alive HTTP/1.1 connection to it that has
/// had one request answered.
async fn kept_alive_after_one_request(server: &'static str) -> (Gateway, KeepAlive<TcpStream>) {
    let gw = Gateway::start(Options {
        server,
        ..Options::default()
    })
    .await;
    let mut client = KeepAlive::new(TcpStream::connect(gw.addr).await.unwrap());
    assert_eq!(client.get(&path("id", "1")).await.unwrap().status, 200);
    (gw, client)
}

/// Sends half of a request head on a kept-alive connection and waits for the server to close
/// it: within 10 s (`header_read_timeout`, not the tests' 30 s `idle_timeout`), and no sooner
/// than about the 300 ms head timeout after the head's first byte.
async fn send_half_a_head_and_wait_for_the_close(client: &mut KeepAlive<TcpStream>) {
    let started = Instant::now();
    let half = b"GET /mot/greenbox/agents/id/2/recordings HTTP/1.1\r\nHost: x\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut client.stream, half)
        .await
        .unwrap();
    assert!(
        client.closed_by_server(Duration::from_secs(10)).await,
        "held to header_read_timeout, not idle_timeout"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before the head timeout, counted from the head's first byte"
    );
}

#[tokio::test]
async fn a_kept_alive_http1_connection_may_idle_past_the_head_timeout() {
    let (gw, mut client) =
        kept_alive_after_one_request("header_read_timeout = \"300ms\"\nidle_timeout = \"30s\"")
            .await;
    // Three head timeouts pass with no byte sent: the connection stays open (idle_timeout),
    // as nginx keeps one for keepalive_timeout.
    assert!(
        !client.closed_by_server(Duration::from_millis(900)).await,
        "an idle kept-alive connection was held to the head timeout"
    );
    assert_eq!(client.get(&path("id", "1")).await.unwrap().status, 200);
    assert!(!client.closed_by_server(Duration::from_millis(900)).await);
    // A head begun now has the head timeout from its first byte, not from the last answer.
    send_half_a_head_and_wait_for_the_close(&mut client).await;
    assert_eq!(gw.simulator.request_count(), 1);
}

#[tokio::test]
async fn an_http2_connection_that_has_made_a_request_may_idle_past_the_head_timeout() {
    let gw = Gateway::start(Options {
        server: "header_read_timeout = \"300ms\"\nidle_timeout = \"30s\"",
        ..Options::default()
    })
    .await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let mut connection = tokio::spawn(connection);
    let get = |id: &str| {
        let request = http::Request::get(format!("http://gw{}", path("id", id)))
            .body(())
            .unwrap();
        let client = client.clone();
        async move {
            let (response, _) = client
                .ready()
                .await
                .unwrap()
                .send_request(request, true)
                .unwrap();
            response.await.unwrap().status()
        }
    };
    assert_eq!(get("1").await, 200);
    // Three head timeouts pass with no request: the connection stays open (idle_timeout).
    let ended = tokio::time::timeout(Duration::from_millis(900), &mut connection).await;
    assert!(ended.is_err(), "closed after the head timeout: {ended:?}");
    assert_eq!(get("1").await, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let (_gw, mut client) =
        kept_alive_after_one_request("idle_timeout = \"300ms\"\nheader_read_timeout = \"30s\"")
            .await;
    let started = Instant::now();
    assert!(client.closed_by_server(Duration::from_secs(10)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the idle timeout"
    );
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_for_a_free_slot() {
    let gw = Gateway::start(Options {
        server: "max_connections = 1",
        ..Options::default()
    })
    .await;
    let mut first = KeepAlive::new(TcpStream::connect(gw.addr).await.unwrap());
    assert_eq!(first.get(&path("id", "1")).await.unwrap().status, 200);
    let second = spawn_get(gw.addr, path("id", "1"));
    // The second client is connected (kernel backlog) but not served while the first is open.
    tokio::task::yield_now().await;
    let waited = tokio::time::timeout(Duration::from_millis(300), async {
        while !second.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_err(), "served beyond max_connections");
    // The admin listener has its own allowance.
    assert_eq!(request(gw.admin, "GET", "/healthz", &[]).await.status, 200);
    drop(first);
    assert_eq!(second.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resets_most_of_its_streams_gets_goaway() {
    let gw = Gateway::start(Options {
        account: "max_concurrent_requests = 2\nqueue_timeout = \"30s\"".into(),
        server: "max_cancelled_requests = 20",
        ..Options::default()
    })
    .await;
    // Every fetch waits at the box, so no request is answered before its reset.
    gw.simulator.hold();
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut sent = 0;
    for n in 0..200u64 {
        let Ok(mut ready) = client.clone().ready().await else {
            break;
        };
        let request =
            http::Request::get(format!("http://gw{}", path("id", &(7000 + n).to_string())))
                .body(())
                .unwrap();
        let Ok((response, mut stream)) = ready.send_request(request, true) else {
            break;
        };
        sent += 1;
        // Reset once the gateway has the request in hand, waiting for its fetch.
        wait_until("the request to wait on its fetch", || async {
            gw.state.waiting() == 1
        })
        .await;
        stream.send_reset(h2::Reason::CANCEL);
        drop(response);
        wait_until("the reset to reach the gateway", || async {
            gw.state.waiting() == 0
        })
        .await;
        if connection.is_finished() {
            break;
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the gateway closed the connection");
    assert!(ended.is_ok());
    assert!(
        (20..40).contains(&sent),
        "GOAWAY after about 20 cancelled requests; sent {sent}"
    );
    // Only the two fetches that took the box's slots were sent; the rest were dropped.
    assert_eq!(gw.simulator.request_count(), 2);
    let metrics = gw.metrics().await;
    assert!(
        sample(
            &metrics,
            "miralix_gateway_upstream_abandoned_total{account=\"greenbox\"}"
        ) >= 17.0
    );
    gw.simulator.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_requests_already_sent_are_answered_with_close_and_idle_connections_close_at_once()
 {
    let mut gw = Gateway::start(Options {
        server: "shutdown_grace = \"20s\"",
        ..Options::default()
    })
    .await;
    let list = path("id", "103");
    assert_eq!(
        gw.get(&list).await.status,
        200,
        "cached: later answers are instant"
    );
    let open = |n: usize| {
        let addr = gw.addr;
        async move {
            let mut connections = Vec::new();
            for _ in 0..n {
                let mut c = KeepAlive::new(TcpStream::connect(addr).await.unwrap());
                assert_eq!(c.get(&path("id", "103")).await.unwrap().status, 200);
                connections.push(c);
            }
            connections
        }
    };
    // Idle keep-alive connections, and as many whose next request is on its way.
    let mut idle = open(10).await;
    let mut sending = open(20).await;
    let head = format!("GET {list} HTTP/1.1\r\nHost: gw\r\n\r\n");
    for c in &mut sending {
        tokio::io::AsyncWriteExt::write_all(&mut c.stream, head.as_bytes())
            .await
            .unwrap();
    }
    gw.signal_stop();
    for c in &mut sending {
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.stream.read_to_end(&mut raw))
            .await
            .expect("closed after the answer")
            .expect("a clean close, not a reset");
        // Answered, with `Connection: close` unless the answer went out before the stop.
        let reply = parse_reply(&raw).expect("the request sent before the stop is answered");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json().as_array().unwrap().len(), 40);
    }
    for c in &mut idle {
        assert!(
            c.closed_by_server(Duration::from_secs(2)).await,
            "idle: closed at once"
        );
    }
    gw.stop().await;
}

/// What TLS termination does with a client's server name (SNI): a bare IP address is ignored,
/// as if none was sent (some clients send one, against RFC 6066); a name that is not a host
/// name at all, such as `127.0.0.1:8490` with its port, is refused with `illegal_parameter`
/// by rustls, which has no setting to accept it (see docs/troubleshooting.md).
#[tokio::test]
async fn a_client_that_sends_an_ip_address_as_its_server_name_is_served_one_with_a_port_is_not() {
    let gw = Gateway::start(Options {
        terminate_tls: true,
        ..Options::default()
    })
    .await;
    let ca = gw.dir().join("front-ca.pem");
    std::fs::write(&ca, &gw.tls.as_ref().unwrap().ca_pem).unwrap();
    let handshake = |server_name: &'static str| {
        let (addr, ca) = (gw.addr, ca.clone());
        tokio::task::spawn_blocking(move || {
            let output = std::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &addr.to_string(),
                    "-servername",
                    server_name,
                ])
                .arg("-CAfile")
                .arg(&ca)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("openssl is installed (.ci/run installs it)");
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr)
        })
    };
    let bare = handshake("127.0.0.1").await.unwrap();
    assert!(bare.contains("Verify return code: 0 (ok)"), "{bare}");
    let with_port = handshake("127.0.0.1:8490").await.unwrap();
    assert!(with_port.contains("illegal parameter"), "{with_port}");
}
