//! Hostile input: a table of raw requests, each with the answers it must get and exactly what
//! may reach the box because of it. Every request is sent on a new connection, byte for byte,
//! after the cache was emptied, so a valid spelling always shows its canonical upstream target.

use crate::support::{
    ACCOUNT, ADMIN_TOKEN, Gateway, Options, SECRET, exchange, parse_replies, parse_reply, request,
};

/// Canonical upstream targets of agent 103 (Derek) and of his audio.
const ID: &str = "/mot/greenbox/agents/id/103/recordings";
const EMAIL: &str = "/mot/greenbox/agents/email/derek.a@company.local/recordings";
const SIP: &str = "/mot/greenbox/agents/sipUri/sip:lp1@company.local/recordings";
const SYNC: &str = "/mot/greenbox/agents/syncId/f4fd9e5f-017d-4350-adf8-8dd811bc1a2e/recordings";
const AUDIO: &str = "/mot/greenbox/queues/calls/recordings/150000";

struct Case {
    name: &'static str,
    raw: Vec<u8>,
    /// The status of each answer, in order; empty when the connection is closed unanswered.
    statuses: Vec<u16>,
    /// Every target the box receives because of this request, in order.
    upstream: Vec<String>,
}

/// A GET of `target` with a Host header, closing the connection after the answer.
fn get(name: &'static str, target: &str, status: u16, upstream: &[&str]) -> Case {
    raw(
        name,
        format!("GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").into_bytes(),
        &[status],
        upstream,
    )
}

fn raw(name: &'static str, raw: Vec<u8>, statuses: &[u16], upstream: &[&str]) -> Case {
    Case {
        name,
        raw,
        statuses: statuses.to_vec(),
        upstream: upstream.iter().map(|t| t.to_string()).collect(),
    }
}

/// A request head with these lines after the request line, closing after the answer.
fn head(request_line: &str, lines: &[&str]) -> Vec<u8> {
    let mut head = format!("{request_line}\r\n");
    for line in lines {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    head.into_bytes()
}

fn agent(id_type: &str, identification: &str) -> String {
    format!("/mot/{ACCOUNT}/agents/{id_type}/{identification}/recordings")
}

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    let long_email = format!(
        "{}@{}.{}.example",
        "a".repeat(60),
        "b".repeat(60),
        "c".repeat(60)
    );
    let long_email_upstream = agent("email", &long_email);
    let with_params = |n: usize| format!("{ID}?{}fromQueueCallId=150000", "a=1&".repeat(n));
    let many_params = with_params(3_000);
    let too_many_params = with_params(5_000);
    let lookalike_o = agent("email", "derek.a@c%D0%BEmpany.local");
    let lookalike_e = agent("email", "d%D0%B5rek.a@company.local");
    let fullwidth_d = agent("email", "%EF%BD%84erek.a@company.local");
    let unknown_id = agent("id", "99999");
    let dotted_dots = agent("email", "a..b@company.local");
    let huge_id = agent("email", &format!("{}@x.y", "a".repeat(300)));
    let huge_path = format!("/mot/{ACCOUNT}/agents/id/{}/recordings", "1".repeat(2100));
    let pipelined = [ID, "/mot/greenbox/agents/id/1%2F03/recordings", SIP]
        .iter()
        .map(|t| format!("GET {t} HTTP/1.1\r\nHost: gw\r\n\r\n"))
        .collect::<String>()
        + &format!("GET {EMAIL} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
    let hundred_same = format!("GET {ID} HTTP/1.1\r\nHost: gw\r\n\r\n").repeat(99)
        + &format!("GET {ID} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
    let smuggled = format!(
        "GET {ID} HTTP/1.1\r\nHost: gw\r\nContent-Length: 60\r\nTransfer-Encoding: chunked\r\n\r\n\
         0\r\n\r\nGET /mot/greenbox/agents/id/1%00/recordings HTTP/1.1\r\nHost: gw\r\n\r\n"
    );

    vec![
        // Spellings of one agent: one canonical upstream target each.
        get("plain id", ID, 200, &[ID]),
        get("leading zeros", &agent("id", "000103"), 200, &[ID]),
        get("type in capitals", &agent("ID", "103"), 200, &[ID]),
        get("encoded email", &agent("email", "Derek.A%40Company.Local"), 200, &[EMAIL]),
        get("email in capitals", &agent("EMAIL", "DEREK.A@COMPANY.LOCAL"), 200, &[EMAIL]),
        get("email with spaces around", &agent("email", "%20derek.a@company.local%20"), 200, &[EMAIL]),
        get("email with a tab around", &agent("email", "%09derek.a@company.local"), 200, &[EMAIL]),
        get("sip name-addr", &agent("sipUri", "%3Csip%3Alp1%40company.local%3E"), 200, &[SIP]),
        get("sips with parameters", &agent("sipuri", "SIPS:LP1@Company.Local;transport=tls"), 200, &[SIP]),
        get("sip without scheme", &agent("sipUri", "lp1@company.local"), 200, &[SIP]),
        get("guid in braces", &agent("syncId", "%7BF4FD9E5F-017D-4350-ADF8-8DD811BC1A2E%7D"), 200, &[SYNC]),
        get("guid without hyphens", &agent("SYNCID", "f4fd9e5f017d4350adf88dd811bc1a2e"), 200, &[SYNC]),
        // The Kelvin sign lowercases to ASCII 'k': the same agent, canonical upstream.
        get("kelvin sign", &agent("email", "dere%E2%84%AA.a@company.local"), 200, &[EMAIL]),
        // Queries: only fromQueueCallId counts, answered from the stored full list.
        get("fromQueueCallId", &format!("{ID}?fromQueueCallId=150000"), 200, &[ID]),
        get("fromQueueCallId in capitals", &format!("{ID}?FROMQUEUECALLID=150000"), 200, &[ID]),
        get("other parameters dropped", &format!("{ID}?x=1&fromQueueCallId=5&y=2"), 200, &[ID]),
        get("CRLF in another parameter", &format!("{ID}?x=%0D%0AX-Injected:%201"), 200, &[ID]),
        get("thousands of parameters", &many_params, 200, &[ID]),
        get("too many parameters for the head", &too_many_params, 431, &[]),
        get("fromQueueCallId twice", &format!("{ID}?fromQueueCallId=1&fromQueueCallId=2"), 400, &[]),
        get("negative fromQueueCallId", &format!("{ID}?fromQueueCallId=-1"), 400, &[]),
        get("exponent fromQueueCallId", &format!("{ID}?fromQueueCallId=1e3"), 400, &[]),
        get("overflowing fromQueueCallId", &format!("{ID}?fromQueueCallId=18446744073709551616"), 400, &[]),
        get("empty fromQueueCallId", &format!("{ID}?fromQueueCallId="), 400, &[]),
        get("NUL fromQueueCallId", &format!("{ID}?fromQueueCallId=%00"), 400, &[]),
        get("CRLF fromQueueCallId", &format!("{ID}?fromQueueCallId=1%0D%0AHost:%20x"), 400, &[]),
        // Encoded and double-encoded slashes and dots.
        get("encoded slash in id", &agent("id", "1%2F03"), 400, &[]),
        get("encoded slash in email", &agent("email", "derek%2F..%2Fadmin@company.local"), 400, &[]),
        get("encoded backslash", &agent("email", "derek.a@company.local%5C"), 400, &[]),
        get("encoded dot-dot id", &agent("id", "%2E%2E"), 400, &[]),
        get("encoded dot-dot email", &agent("email", "%2e%2e@company.local"), 400, &[]),
        get("double dot in email", &dotted_dots, 400, &[]),
        get("double-encoded slash", &agent("id", "%252F"), 400, &[]),
        get("double-encoded at", &agent("email", "derek.a%2540company.local"), 400, &[]),
        get("dot-dot segments", "/mot/greenbox/agents/id/../../admin/recordings", 404, &[]),
        get("dot segment", "/mot/greenbox/agents/./id/103/recordings", 404, &[]),
        get("encoded dot-dot account", "/mot/%2e%2e/agents/id/103/recordings", 404, &[]),
        get("encoded slash in account", "/mot/green%2Fbox/agents/id/103/recordings", 404, &[]),
        get("account in capitals", "/mot/GREENBOX/agents/id/103/recordings", 404, &[]),
        get("encoded slash in audio id", "/mot/greenbox/queues/calls/recordings/150000%2F..", 400, &[]),
        get("negative audio id", "/mot/greenbox/queues/calls/recordings/-1", 400, &[]),
        // NUL, CR and LF, encoded.
        get("NUL in id", &agent("id", "103%00"), 400, &[]),
        get("NUL in email", &agent("email", "derek.a@company.local%00.evil"), 400, &[]),
        get("NUL in account", "/mot/greenbox%00/agents/id/103/recordings", 404, &[]),
        get("CRLF in email", &agent("email", "%0D%0AX-Injected:%20yes"), 400, &[]),
        get("CRLF header in sip", &agent("sipUri", "sip:lp1@company.local%0D%0AHost:%20evil"), 400, &[]),
        get("CRLF before id", &agent("id", "%0D%0A103"), 400, &[]),
        get("LF after email", &agent("email", "derek.a@company.local%0A"), 400, &[]),
        // Overlong and invalid UTF-8.
        get("overlong dots", &agent("email", "%C0%AE%C0%AE@company.local"), 400, &[]),
        get("overlong slash", &agent("id", "%C0%AF103"), 400, &[]),
        get("three-byte overlong slash", &agent("email", "%E0%80%AFa@x.y"), 400, &[]),
        get("surrogate", &agent("email", "%ED%A0%80@x.y"), 400, &[]),
        get("byte 0xFF", &agent("email", "%FF@x.y"), 400, &[]),
        // Raw UTF-8 in the target is read like its percent-encoding, and sent up encoded.
        raw("raw UTF-8 in the target", head("GET /mot/greenbox/agents/email/d\u{e9}rek@x.y/recordings HTTP/1.1", &["Host: gw"]), &[404], &["/mot/greenbox/agents/email/d%C3%A9rek@x.y/recordings"]),
        raw("raw invalid UTF-8 in the target", [b"GET /mot/greenbox/agents/id/\xC0\xAF103/recordings HTTP/1.1\r\nHost: gw\r\n\r\n".as_slice(),].concat(), &[400], &[]),
        // Unicode look-alikes: another agent, never Derek's entry; encoded on the way up.
        get("cyrillic o in email", &lookalike_o, 404, &[&lookalike_o]),
        get("cyrillic e in email", &lookalike_e, 404, &[&lookalike_e]),
        get("fullwidth d in email", &fullwidth_d, 404, &[&fullwidth_d]),
        get("zero-width space", &agent("email", "derek%E2%80%8B.a@company.local"), 400, &[]),
        get("right-to-left override", &agent("email", "derek.a@%E2%80%AElacol.ynapmoc"), 400, &[]),
        get("byte order mark", &agent("id", "%EF%BB%BF103"), 400, &[]),
        get("soft hyphen", &agent("email", "de%C2%ADrek.a@company.local"), 400, &[]),
        // Huge and empty identifications.
        get("empty id", &agent("id", ""), 400, &[]),
        get("blank email", &agent("email", "%20%20"), 400, &[]),
        get("email over 254 bytes", &huge_id, 400, &[]),
        get("long but valid email", &long_email_upstream, 404, &[&long_email_upstream]),
        get("path over 2048 bytes", &huge_path, 414, &[]),
        get("id beyond u64", &agent("id", "18446744073709551616"), 400, &[]),
        get("unknown id", &unknown_id, 404, &[&unknown_id]),
        get("unknown type", &agent("phone", "103"), 400, &[]),
        get("email without at", &agent("email", "derek.company.local"), 400, &[]),
        get("sip with two ats", &agent("sipUri", "sip:a@b@c"), 400, &[]),
        get("unbalanced angle", &agent("sipUri", "%3Csip:lp1@company.local"), 400, &[]),
        get("short guid", &agent("syncId", "f4fd9e5f-017d-4350"), 400, &[]),
        // Duplicated and trailing slashes.
        get("leading double slash", &format!("/{ID}"), 404, &[]),
        get("double slash after mot", "/mot//greenbox/agents/id/103/recordings", 404, &[]),
        get("double slash before type", "/mot/greenbox/agents//id/103/recordings", 404, &[]),
        get("double slash before recordings", "/mot/greenbox/agents/id/103//recordings", 404, &[]),
        get("trailing slash", &format!("{ID}/"), 404, &[]),
        // Request-target forms.
        get("absolute-form", &format!("http://gw{ID}"), 200, &[ID]),
        get("absolute-form naming another host", &format!("http://evil.example:8080{ID}"), 200, &[ID]),
        get("absolute-form with userinfo", &format!("http://user:pass@evil.example{ID}"), 400, &[]),
        get("absolute-form https", &format!("https://gw{ID}"), 200, &[ID]),
        get("absolute-form ftp", &format!("ftp://evil.example{ID}"), 400, &[]),
        get("absolute-form file", &format!("file://evil.example{ID}"), 400, &[]),
        get("absolute-form with an unknown scheme", &format!("gopher://gw{ID}"), 400, &[]),
        get("authority-form on GET", "box.example:443", 400, &[]),
        raw("authority-form CONNECT", head("CONNECT 127.0.0.1:443 HTTP/1.1", &["Host: 127.0.0.1:443"]), &[400], &[]),
        raw("asterisk-form OPTIONS", head("OPTIONS * HTTP/1.1", &["Host: gw"]), &[400], &[]),
        get("relative target", "mot/greenbox/agents/id/103/recordings", 400, &[]),
        // A fragment is never part of a request; it is dropped, as hyper reads the target.
        get("fragment", &format!("{ID}#x"), 200, &[ID]),
        // Host tricks.
        raw("no Host", head(&format!("GET {ID} HTTP/1.1"), &[]), &[400], &[]),
        raw("two Hosts", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "Host: evil.example"]), &[400], &[]),
        raw("Host of another site", head(&format!("GET {ID} HTTP/1.1"), &["Host: evil.example"]), &[200], &[ID]),
        raw("Host with a path", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw/../admin"]), &[200], &[ID]),
        raw("HTTP/1.0 without Host", head(&format!("GET {ID} HTTP/1.0"), &[]), &[200], &[ID]),
        raw("client's own shared secret header", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "X-Miralix-Shared-Secret: guess", "X-Injected: yes",]), &[200], &[ID]),
        // Malformed heads and header injection.
        raw("bare CR in a header value", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "X-A: a\rX-Injected: yes"]), &[400], &[]),
        raw("NUL in a header value", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "X-A: a\0b"]), &[400], &[]),
        raw("space in a header name", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "Bad Header: x"]), &[400], &[]),
        raw("obsolete line folding", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "X-A: a", " folded"]), &[400], &[]),
        raw("lowercase method", head(&format!("get {ID} HTTP/1.1"), &["Host: gw"]), &[405], &[]),
        raw("lowercase version", head(&format!("GET {ID} http/1.1"), &["Host: gw"]), &[400], &[]),
        raw("HTTP/2.0 on an HTTP/1 connection", head(&format!("GET {ID} HTTP/2.0"), &["Host: gw"]), &[400], &[]),
        raw("header name over the head limit", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", &format!("{}: x", "X".repeat(20_000))]), &[431], &[]),
        // Bodies: Content-Length and Transfer-Encoding conflicts.
        raw("Content-Length and chunked", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "Content-Length: 5", "Transfer-Encoding: chunked"]).into_iter().chain(*b"0\r\n\r\n").collect(), &[413], &[]),
        raw("two Content-Lengths", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "Content-Length: 1", "Content-Length: 2"]), &[400], &[]),
        raw("negative Content-Length", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "Content-Length: -1"]), &[400], &[]),
        raw("signed Content-Length", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "Content-Length: +0"]), &[400], &[]),
        raw("gzip, chunked", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "Transfer-Encoding: gzip, chunked"]).into_iter().chain(*b"0\r\n\r\n").collect(), &[413], &[]),
        raw("chunked not last", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "Transfer-Encoding: chunked, gzip"]), &[400], &[]),
        raw("smuggled request after an empty chunked body", smuggled.into_bytes(), &[413], &[]),
        // Methods.
        raw("POST", head(&format!("POST {ID} HTTP/1.1"), &["Host: gw", "Content-Length: 0"]), &[405], &[]),
        raw("DELETE", head(&format!("DELETE {ID} HTTP/1.1"), &["Host: gw"]), &[405], &[]),
        raw("TRACE", head(&format!("TRACE {ID} HTTP/1.1"), &["Host: gw"]), &[405], &[]),
        raw("unknown method", head(&format!("FOO {ID} HTTP/1.1"), &["Host: gw"]), &[405], &[]),
        raw("HEAD", head(&format!("HEAD {ID} HTTP/1.1"), &["Host: gw"]), &[200], &[ID]),
        get("audio", AUDIO, 200, &[AUDIO]),
        raw("HEAD on audio", head(&format!("HEAD {AUDIO} HTTP/1.1"), &["Host: gw"]), &[200], &[AUDIO]),
        // One credential per request, not one try per header.
        raw("two X-Api-Key headers", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "X-Api-Key: a", "X-Api-Key: b"]), &[400], &[]),
        raw("Authorization and X-Api-Key", head(&format!("GET {ID} HTTP/1.1"), &["Host: gw", "Authorization: Bearer a", "X-Api-Key: b"]), &[400], &[]),
        // Pipelining: answers in order, each request on its own merits.
        raw("pipelined good, bad, good, good", pipelined.into_bytes(), &[200, 400, 200, 200], &[ID, SIP, EMAIL]),
        raw("a hundred pipelined requests for one agent", hundred_same.into_bytes(), &[200; 100], &[ID]),
    ]
}

#[tokio::test]
async fn hostile_requests_get_their_answer_and_only_canonical_targets_reach_the_box() {
    let gw = Gateway::start(Options::default()).await;
    let admin_auth = format!("Bearer {ADMIN_TOKEN}");
    let cases = cases();
    assert!(cases.len() >= 80, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let purged = request(
            gw.admin,
            "DELETE",
            "/cache",
            &[("Authorization", &admin_auth)],
        )
        .await;
        assert_eq!(purged.status, 200);
        let before = gw.simulator.received().len();
        let answer = exchange(gw.addr, &case.raw).await;
        let statuses: Vec<u16> = match case.raw.starts_with(b"HEAD ") {
            // A HEAD answer announces a length it does not send.
            true => parse_reply(&answer).map(|r| r.status).into_iter().collect(),
            false => parse_replies(&answer).iter().map(|r| r.status).collect(),
        };
        let replies = parse_replies(&answer);
        // hyper answers a head it cannot parse itself, with no body (nothing to sniff).
        let sniffable =
            |r: &&crate::support::Reply| !r.body.is_empty() || r.header("content-type").is_some();
        if let Some(reply) = replies
            .iter()
            .filter(sniffable)
            .find(|r| r.header("x-content-type-options") != Some("nosniff"))
        {
            failures.push(format!(
                "{}: an answer without nosniff: {:?}",
                case.name, reply.headers
            ));
        }
        let received = gw.simulator.received();
        let upstream: Vec<String> = received[before..]
            .iter()
            .map(|r| r.target.clone())
            .collect();
        if statuses != case.statuses || upstream != case.upstream {
            failures.push(format!(
                "{}: answers {statuses:?} (expected {:?}), box saw {upstream:?} (expected {:?}); {:?}",
                case.name,
                case.statuses,
                case.upstream,
                String::from_utf8_lossy(&answer[..answer.len().min(300)])
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Whatever reached the box carried the configured secret and no header of the client's.
    for request in gw.simulator.received() {
        // HEAD included: the box is only ever asked with GET.
        assert_eq!(request.method, "GET", "{request:?}");
        assert_eq!(request.headers["x-miralix-shared-secret"], SECRET);
        assert!(request.headers.get("x-injected").is_none(), "{request:?}");
    }
}
