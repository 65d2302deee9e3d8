//! Access control: API keys and client certificates per account, checked before the cache;
//! request limits.

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::support::{
    ACCOUNT, API_KEY, ClientIdentity, Gateway, KeepAlive, Options, Reply, SECRET, TestCa, path,
    request,
};

const OTHER_KEY: &str = "other-key-0123456789";

fn keyed() -> Options {
    Options {
        account: format!("api_keys = [\"{API_KEY}\"]"),
        ..Options::default()
    }
}

#[tokio::test]
async fn a_request_without_a_valid_key_learns_nothing() {
    let gw = Gateway::start(keyed()).await;
    let list = path("id", "103");
    let ok = request(gw.addr, "GET", &list, &[("X-Api-Key", API_KEY)]).await;
    assert_eq!(ok.status, 200);
    let bearer = format!("Bearer {API_KEY}");
    let again = request(gw.addr, "GET", &list, &[("Authorization", &bearer)]).await;
    assert_eq!(again.header("x-cache"), Some("HIT"));

    let asked = gw.simulator.request_count();
    let wrong = format!("{API_KEY}0");
    for (headers, challenge) in [
        (vec![], "Bearer realm=\"miralix-gateway\""),
        (
            vec![("X-Api-Key", wrong.as_str())],
            "Bearer realm=\"miralix-gateway\", error=\"invalid_token\"",
        ),
        (
            vec![("Authorization", "Basic a2V5OnZhbHVl")],
            "Bearer realm=\"miralix-gateway\"",
        ),
        (
            vec![("X-Miralix-Shared-Secret", SECRET)],
            "Bearer realm=\"miralix-gateway\"",
        ),
    ] {
        for target in [
            list.clone(),
            format!("{list}?fromQueueCallId=1"),
            path("id", "999"),
            format!("/mot/{ACCOUNT}/queues/calls/recordings/150000"),
        ] {
            let reply = request(gw.addr, "GET", &target, &headers).await;
            assert_eq!(reply.status, 401, "{target} {headers:?}");
            assert_eq!(reply.header("www-authenticate"), Some(challenge));
            assert_eq!(reply.header("x-cache"), None, "no hint of the cache");
            assert_eq!(reply.header("etag"), None);
            assert!(reply.json()["error"].as_str().unwrap().contains("API key"));
        }
    }
    assert_eq!(
        gw.simulator.request_count(),
        asked,
        "nothing reached the box"
    );
}

#[tokio::test]
async fn a_key_of_one_account_opens_no_other_and_keys_rotate_without_losing_the_cache() {
    let gw = Gateway::start(keyed()).await;
    let list = path("id", "103");
    assert_eq!(
        request(gw.addr, "GET", &list, &[("X-Api-Key", API_KEY)])
            .await
            .status,
        200
    );
    // A second account on the same box, with its own key.
    let two = format!(
        "{}\n[accounts.bluebox]\nbase_url = \"{}\"\nshared_secret = \"x\"\npin_sha256 = \"{}\"\napi_keys = [\"{OTHER_KEY}\"]\n",
        gw.config_text,
        gw.simulator.base_url(),
        crate::support::pin_of(&gw.simulator)
    );
    gw.reload_text(&two).await.unwrap();
    let blue = "/mot/bluebox/agents/id/103/recordings";
    let denied = request(gw.addr, "GET", blue, &[("X-Api-Key", API_KEY)]).await;
    assert_eq!(denied.status, 401);
    let other = request(gw.addr, "GET", &list, &[("X-Api-Key", OTHER_KEY)]).await;
    assert_eq!(other.status, 401);
    let own = request(gw.addr, "GET", blue, &[("X-Api-Key", OTHER_KEY)]).await;
    assert_ne!(own.status, 401, "bluebox's key opens bluebox");

    // Rotate greenbox's key: the new one works at once, the old one no longer, and the
    // account's cache entries stay (the box is reached the same way).
    let rotated = two.replacen(
        &format!("api_keys = [\"{API_KEY}\"]"),
        "api_keys = [\"rotated-key-0123456789\"]",
        1,
    );
    let report = gw.reload_text(&rotated).await.unwrap();
    assert!(report.unchanged.contains(&ACCOUNT.to_owned()), "{report:?}");
    let old = request(gw.addr, "GET", &list, &[("X-Api-Key", API_KEY)]).await;
    assert_eq!(old.status, 401);
    let new = request(
        gw.addr,
        "GET",
        &list,
        &[("X-Api-Key", "rotated-key-0123456789")],
    )
    .await;
    assert_eq!(new.header("x-cache"), Some("HIT"));
}

#[tokio::test]
async fn bodies_on_get_and_oversized_heads_are_refused() {
    let gw = Gateway::start(Options::default()).await;
    let list = path("id", "103");
    let cases: Vec<(String, u16)> = vec![
        (
            format!(
                "GET {list} HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
            ),
            413,
        ),
        (
            format!(
                "GET {list} HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
            413,
        ),
        (
            format!(
                "GET {list} HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n"
            ),
            // Framed by Transfer-Encoding (RFC 9112 6.3): a body, refused like any other.
            413,
        ),
        (
            format!(
                "GET {list} HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
                "a".repeat(20_000)
            ),
            431,
        ),
        (
            format!(
                "GET {list} HTTP/1.1\r\nHost: gw\r\n{}Connection: close\r\n\r\n",
                (0..120)
                    .map(|n| format!("X-H{n}: 1\r\n"))
                    .collect::<String>()
            ),
            431,
        ),
        (
            format!(
                "GET {list} HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
            200,
        ),
    ];
    for (raw, expected) in cases {
        let reply =
            crate::support::parse_reply(&crate::support::exchange(gw.addr, raw.as_bytes()).await)
                .unwrap_or_else(|| panic!("no answer to {:?}", &raw[..80.min(raw.len())]));
        assert_eq!(reply.status, expected, "{:?}", &raw[..120.min(raw.len())]);
    }
    assert_eq!(
        gw.simulator.request_count(),
        1,
        "only the clean request reached the box"
    );
}

fn mutual_tls(account: &str) -> Options {
    Options {
        terminate_tls: true,
        client_certificates: true,
        account: account.to_owned(),
        ..Options::default()
    }
}

/// One GET over a new TLS connection presenting `identity`; `None` when the gateway refused the
/// connection instead of answering.
async fn get_as(gw: &Gateway, identity: Option<&ClientIdentity>, target: &str) -> Option<Reply> {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let connector = gw
        .tls
        .as_ref()
        .unwrap()
        .connector_as(&[b"http/1.1"], identity);
    let name = ServerName::try_from("localhost").unwrap();
    // With TLS 1.3 the server's refusal arrives after the client's side of the handshake.
    let stream = connector.connect(name, tcp).await.ok()?;
    KeepAlive::new(stream).get(target).await
}

#[tokio::test]
async fn the_tls_listener_requires_a_certificate_from_the_client_ca() {
    let gw = Gateway::start(mutual_tls("")).await;
    let ca = gw.tls.as_ref().unwrap();
    let list = path("id", "103");
    let elsewhere = tempfile::tempdir().unwrap();
    let stranger = TestCa::new(elsewhere.path()).client_identity("crm-widget", &["crm"]);
    assert!(get_as(&gw, None, &list).await.is_none(), "no certificate");
    assert!(
        get_as(&gw, Some(&stranger), &list).await.is_none(),
        "a certificate from another CA"
    );
    assert_eq!(gw.simulator.request_count(), 0, "nothing reached the box");

    // An account with no keys and no names is opened by any certificate of the CA.
    let crm = ca.client_identity("crm-widget", &["crm.apps.example"]);
    let reply = get_as(&gw, Some(&crm), &list).await.expect("an answer");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(gw.simulator.request_count(), 1);
}

#[tokio::test]
async fn client_names_map_certificates_to_accounts() {
    let gw = Gateway::start(mutual_tls(&format!(
        "client_names = [\"crm.apps.example\", \"QA-Dashboard\"]\napi_keys = [\"{API_KEY}\"]"
    )))
    .await;
    let ca = gw.tls.as_ref().unwrap();
    let list = path("id", "103");
    // By DNS alternative name, and by common name in any case.
    for allowed in [
        ca.client_identity("crm-widget", &["crm.apps.example"]),
        ca.client_identity("qa-dashboard", &[]),
    ] {
        let reply = get_as(&gw, Some(&allowed), &list).await.expect("an answer");
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let asked = gw.simulator.request_count();
    let archiver = ca.client_identity("archiver", &["archiver.apps.example"]);
    let refused = get_as(&gw, Some(&archiver), &list)
        .await
        .expect("an answer");
    assert_eq!(
        refused.status,
        401,
        "this account also takes keys: {}",
        refused.text()
    );
    assert!(
        refused.json()["error"]
            .as_str()
            .unwrap()
            .contains("API key")
    );
    assert_eq!(
        gw.simulator.request_count(),
        asked,
        "nothing reached the box"
    );

    // Names only: a certificate that is not named gets a 403 saying why.
    let names_only = gw
        .config_text
        .replacen(&format!("api_keys = [\"{API_KEY}\"]"), "", 1);
    gw.reload_text(&names_only).await.unwrap();
    let refused = get_as(&gw, Some(&archiver), &list)
        .await
        .expect("an answer");
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(refused.header("www-authenticate"), None);
    assert!(
        refused.json()["error"]
            .as_str()
            .unwrap()
            .contains("client_names"),
        "{}",
        refused.text()
    );
    assert_eq!(
        gw.simulator.request_count(),
        asked,
        "nothing reached the box"
    );
}

const LIMIT: &str = "[server.rate_limit]\nrequests_per_second = 0.5\nburst = 3";

#[tokio::test]
async fn each_client_address_gets_a_token_bucket_when_a_rate_limit_is_set() {
    let gw = Gateway::start(Options {
        server: LIMIT,
        ..Options::default()
    })
    .await;
    let list = path("id", "103");
    for _ in 0..3 {
        assert_eq!(gw.get(&list).await.status, 200);
    }
    // Over the limit: bad requests and good ones alike, before routing and the cache.
    for target in [list.as_str(), "/mot/nobody/agents/id/1/recordings", "/%00"] {
        let limited = gw.get(target).await;
        assert_eq!(limited.status, 429, "{target}");
        assert_eq!(limited.header("retry-after"), Some("2"), "1 token at 0.5/s");
        assert_eq!(limited.header("x-cache"), None);
        assert!(
            limited.json()["error"]
                .as_str()
                .unwrap()
                .contains("server.rate_limit"),
            "{}",
            limited.text()
        );
    }
    assert_eq!(gw.simulator.request_count(), 1);
    // The admin listener is not limited.
    let metrics = gw.metrics().await;
    assert_eq!(
        crate::support::sample(&metrics, "miralix_gateway_rate_limited_total"),
        3.0
    );
    assert_eq!(
        crate::support::sample(&metrics, "miralix_gateway_requests_total{status=\"429\"}"),
        3.0
    );

    // Two seconds give one token back, and only one.
    gw.clock.advance(std::time::Duration::from_secs(2));
    assert_eq!(gw.get(&list).await.status, 200);
    assert_eq!(gw.get(&list).await.status, 429);

    // A reload that keeps the limit keeps the buckets; one that drops it lets everyone in.
    gw.reload().await.unwrap();
    assert_eq!(gw.get(&list).await.status, 429);
    let unlimited = gw.config_text.replace(LIMIT, "");
    gw.reload_text(&unlimited).await.unwrap();
    assert_eq!(gw.get(&list).await.status, 200);
}

#[tokio::test]
async fn one_credential_per_request_and_a_wrong_key_costs_twice() {
    let gw = Gateway::start(keyed()).await;
    let list = path("id", "103");
    let bearer = format!("Bearer {API_KEY}");
    // A right key among wrong ones, or in both headers, is not tried: 400, before the cache.
    for headers in [
        vec![("X-Api-Key", "wrong-key-000000000"), ("X-Api-Key", API_KEY)],
        vec![("Authorization", bearer.as_str()), ("X-Api-Key", API_KEY)],
    ] {
        let reply = request(gw.addr, "GET", &list, &headers).await;
        assert_eq!(reply.status, 400, "{headers:?}");
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains("send one credential"), "{error}");
        assert!(!error.contains(API_KEY));
        assert_eq!(reply.header("www-authenticate"), None);
    }
    assert_eq!(gw.simulator.request_count(), 0);

    // Burst 3: a wrong key takes its request's token and one more, so one request with the
    // right key is left, not two.
    let limited = Gateway::start(Options {
        server: LIMIT,
        ..keyed()
    })
    .await;
    let wrong_key = [("X-Api-Key", "wrong-key-000000000")];
    let wrong = request(limited.addr, "GET", &list, &wrong_key).await;
    assert_eq!(wrong.status, 401);
    let key = [("X-Api-Key", API_KEY)];
    assert_eq!(request(limited.addr, "GET", &list, &key).await.status, 200);
    let over = request(limited.addr, "GET", &list, &key).await;
    assert_eq!(over.status, 429, "the wrong key cost a second token");
}

#[tokio::test]
async fn cache_control_refusals_speak_of_the_admin_token() {
    let gw = Gateway::start(Options::default()).await;
    for (headers, challenge) in [
        (vec![], "Bearer realm=\"miralix-gateway admin\""),
        (
            vec![("Authorization", "Bearer nope")],
            "Bearer realm=\"miralix-gateway admin\", error=\"invalid_token\"",
        ),
    ] {
        let reply = request(gw.admin, "DELETE", "/cache", &headers).await;
        assert_eq!(reply.status, 401, "{headers:?}");
        assert_eq!(reply.header("www-authenticate"), Some(challenge));
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains("admin token"), "{error}");
        assert!(!error.contains("API key"), "{error}");
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
    }
}
