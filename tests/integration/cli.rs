//! The `miralix-gateway` binary: check-config, a full run's logs, and the demo as printed.

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::Duration;

use miralix_gateway::simulator::{Failure, Simulator, SimulatorTls};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_miralix-gateway");

fn check_config(path: &std::path::Path) -> (bool, String, String) {
    let output = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_example_config_is_valid() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let config = miralix_gateway::config::load(&example).expect("config/example.toml loads");
    assert!(config.accounts.contains_key("greenbox"));
    let (ok, stdout, stderr) = check_config(&example);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("example.toml: ok: 2 account(s) (12986, greenbox)"),
        "{stdout}"
    );
}

#[test]
fn check_config_reports_every_problem_by_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        r#"
[cache]
ttl = "30 seconds please"
max_bites = "1GiB"

[accounts.greenbox]
base_url = "https://192.168.1.10"
shared_secret = "s"
pin_sha256 = "not-a-pin"
"#,
    )
    .unwrap();
    let (ok, _, stderr) = check_config(&path);
    assert!(!ok);
    let file = path.display().to_string();
    for line in [
        format!("{file}: cache.max_bites: unknown key"),
        format!("{file}: cache.ttl: \"30 seconds please\" is not a duration"),
        format!("{file}: accounts.greenbox.pin_sha256: expected the SHA-256 fingerprint"),
    ] {
        assert!(stderr.contains(&line), "missing {line:?} in:\n{stderr}");
    }

    let (ok, _, stderr) = check_config(&dir.path().join("missing.toml"));
    assert!(!ok);
    assert!(stderr.contains("missing.toml"), "{stderr}");
}

#[tokio::test]
async fn a_full_run_at_trace_level_never_shows_the_secret() {
    let simulator = start_box(SimulatorTls::SelfSigned).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("greenbox.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let config = dir.path().join("gateway.toml");
    let audit_file = dir.path().join("audit.log");
    let pin = pin_of(&simulator);
    let config_text = |keys: &str| {
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
token_file = "{}"
[log]
audit_file = "{}"
[accounts.{ACCOUNT}]
base_url = "{}"
shared_secret_file = "{}"
pin_sha256 = "{pin}"
api_keys = [{keys}]
"#,
            token_file.display(),
            audit_file.display(),
            simulator.base_url(),
            secret_file.display()
        )
    };
    std::fs::write(&config, config_text(&format!("\"{API_KEY}\""))).unwrap();
    let bearer = format!("Bearer {API_KEY}");
    let admin_bearer = format!("Bearer {ADMIN_TOKEN}");
    let mut gateway = Running::spawn(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "trace"),
        false,
    );
    let serving = gateway.wait_for("miralix-gateway serving");
    let public = addr_after(&serving, "public=");
    let admin = addr_after(&serving, "admin=");

    let mut bodies = Vec::new();
    for target in [
        path("email", EMAIL),
        path("email", EMAIL),
        path("id", "999"),
        path("phone", "1"),
        format!("{}?fromQueueCallId=x", path("id", "1")),
        format!("{}?fromQueueCallId=1", path("email", EMAIL)),
    ] {
        bodies.push(
            request(
                public,
                "GET",
                &target,
                &[
                    ("X-Miralix-Shared-Secret", "guess"),
                    ("Authorization", &bearer),
                ],
            )
            .await,
        );
    }
    let key = [("X-Api-Key", API_KEY)];
    bodies.push(request(public, "POST", &path("id", "1"), &[("Content-Length", "0")]).await);
    bodies.push(request(public, "GET", &path("id", "1"), &[]).await);
    let wrong = format!("{API_KEY}x");
    bodies.push(request(public, "GET", &path("id", "1"), &[("X-Api-Key", &wrong)]).await);
    let audio = format!("/mot/{ACCOUNT}/queues/calls/recordings/150000");
    let range = [("Range", "bytes=0-9"), ("X-Api-Key", API_KEY)];
    bodies.push(request(public, "GET", &audio, &range).await);
    let refresh = format!("/cache/{ACCOUNT}/agents/email/{EMAIL}/refresh");
    let admin_auth = [("Authorization", admin_bearer.as_str())];
    bodies.push(request(admin, "POST", &refresh, &admin_auth).await);
    bodies.push(
        request(
            admin,
            "DELETE",
            "/cache",
            &[("Authorization", "Bearer nope")],
        )
        .await,
    );
    bodies.push(request(admin, "DELETE", "/cache", &admin_auth).await);
    for failure in [Failure::Status(500), Failure::Status(401), Failure::Close] {
        simulator.set_failure(failure);
        bodies.push(request(public, "GET", &path("id", "104"), &key).await);
    }
    let statuses: Vec<u16> = bodies.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [
            200, 200, 404, 400, 400, 200, 405, 401, 401, 206, 200, 401, 200, 502, 502, 502
        ]
    );

    // Reloads: a refused one whose file quotes the secret and a key in a parse error and a
    // type error, then one that rotates the key, after the audit file was moved away.
    simulator.set_failure(Failure::None);
    let rotated_key = "rotated-key-0123456789";
    for broken in [
        format!(
            "{}\n[cache]\nttl = \"{SECRET}\n",
            config_text(&format!("\"{API_KEY}\""))
        ),
        config_text(&format!("\"{API_KEY}\""))
            .replace(&format!("[\"{API_KEY}\"]"), &format!("\"{API_KEY}\"")),
    ] {
        std::fs::write(&config, broken).unwrap();
        send_signal(&gateway.child, "-HUP");
        gateway.wait_for("reload refused");
    }
    let rotated_audit = dir.path().join("audit.log.1");
    std::fs::rename(&audit_file, &rotated_audit).unwrap();
    std::fs::write(&config, config_text(&format!("\"{rotated_key}\""))).unwrap();
    send_signal(&gateway.child, "-HUP");
    gateway.wait_for("configuration reloaded");
    let old_key = request(public, "GET", &path("email", EMAIL), &key).await;
    let new_key = request(
        public,
        "GET",
        &path("email", EMAIL),
        &[("X-Api-Key", rotated_key)],
    )
    .await;
    assert_eq!((old_key.status, new_key.status), (401, 200));
    bodies.extend([old_key, new_key]);

    let metrics = request(admin, "GET", "/metrics", &[]).await;
    assert_eq!(metrics.status, 200);

    let logs = gateway.finish();
    let before_rotation = std::fs::read_to_string(&rotated_audit).unwrap();
    let after_rotation = std::fs::read_to_string(&audit_file).unwrap();
    assert!(
        logs.contains("cache=\"hit\""),
        "the access log was captured:\n{logs}"
    );
    assert!(logs.contains("TRACE"), "trace level was on");
    assert!(
        !logs.contains('\u{1b}'),
        "no ANSI colour codes when not on a terminal"
    );
    // Audit events went to their own file, as JSON lines, and not to stderr.
    assert!(
        !logs.contains("miralix_gateway::audit"),
        "audit events are not on stderr:\n{logs}"
    );
    let key_id = |key: &str| {
        // A key's id is the first four bytes of its SHA-256, in hex.
        let digest = miralix_gateway::crypto::sha256(key.as_bytes());
        format!("key:{}", miralix_gateway::crypto::hex(&digest[..4]))
    };
    let events = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    };
    let read_by = |events: &[serde_json::Value], key: &str| {
        events.iter().any(|e| {
            e["message"] == "read"
                && e["client"] == key_id(key)
                && e["account"] == ACCOUNT
                && e["resource"] == format!("agents/email/{EMAIL}/recordings")
                && e["status"] == 200
        })
    };
    let (before, after) = (events(&before_rotation), events(&after_rotation));
    assert!(read_by(&before, API_KEY), "{before_rotation}");
    assert!(
        before.iter().any(|e| e["message"] == "cache purged"),
        "{before_rotation}"
    );
    assert!(read_by(&after, rotated_key), "{after_rotation}");
    assert!(!read_by(&before, rotated_key) && !read_by(&after, API_KEY));
    for (what, text) in [
        ("logs", logs.clone()),
        ("audit log", before_rotation + &after_rotation),
        ("metrics", metrics.text()),
        (
            "bodies",
            bodies
                .iter()
                .map(Reply::text)
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    ] {
        assert!(!text.contains(SECRET), "the secret appears in the {what}");
        assert!(!text.contains(API_KEY), "an API key appears in the {what}");
        assert!(
            !text.contains(rotated_key),
            "an API key appears in the {what}"
        );
        assert!(
            !text.contains(ADMIN_TOKEN),
            "the admin token appears in the {what}"
        );
    }
    // The box received it, so the test would have seen it had it been logged.
    assert!(
        simulator
            .received()
            .iter()
            .all(|r| r.headers["x-miralix-shared-secret"] == SECRET)
    );
}

#[test]
fn the_demo_prints_curl_commands_that_work_as_printed() {
    let mut demo = Running::spawn(
        Command::new(BIN).args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ]),
        true,
    );
    demo.wait_for("Press Ctrl-C to stop.");
    let commands: Vec<String> = demo
        .seen
        .iter()
        .filter_map(|l| {
            l.trim_start()
                .strip_prefix("curl ")
                .map(|c| format!("curl {c}"))
        })
        .collect();
    assert_eq!(commands.len(), 13, "{:#?}", demo.seen);
    let run = |command: &str| {
        let command = command.split("  #").next().unwrap();
        let output = Command::new("sh").args(["-c", command]).output().unwrap();
        assert!(output.status.success(), "{command} failed");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let mut outputs: Vec<String> = commands.iter().map(|c| run(c)).collect();
    // The gzip copy is made after the first answer, on a thread at nice 19: on a host this busy
    // (the other tests run beside this one) it may come after the next command, which then gets
    // the list uncompressed, as documented. Asked again until the finished entry is there.
    let gzip_bytes = |output: &str| -> usize {
        output
            .strip_suffix(" bytes gzip\n")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{output}"))
    };
    let compressed = |output: &str| (100..5_000).contains(&gzip_bytes(output));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !compressed(&outputs[4]) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        outputs[4] = run(&commands[4]);
    }
    // Each command prints what its comment promises: headers, or one line, never a body.
    for (command, output) in commands.iter().zip(&outputs) {
        let comment = command
            .split("  # ")
            .nth(1)
            .unwrap_or_else(|| panic!("no comment: {command}"));
        let lines: Vec<&str> = output.lines().collect();
        assert!(!lines.is_empty(), "{command} printed nothing");
        for line in &lines {
            let header = line.starts_with("HTTP/")
                || line.split_once(": ").is_some_and(|(name, _)| {
                    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            let promised = header
                || (comment.starts_with("one line") && lines.len() == 1)
                || (comment.contains("one line of JSON") && lines.len() == 1)
                || (comment == "counter lines" && line.starts_with("miralix_gateway_"))
                || (comment.ends_with(": 404") && *line == "404");
            assert!(
                promised,
                "{command}\nprinted a line its comment ({comment:?}) does not promise: {line:?}"
            );
        }
    }
    let lower = |n: usize| outputs[n].to_lowercase();
    assert!(outputs[0].starts_with("HTTP/1.1 200 OK"), "{}", outputs[0]);
    assert!(lower(0).contains("x-cache: miss"), "{}", outputs[0]);
    assert!(
        lower(1).contains("x-cache: hit") && lower(1).contains("age: "),
        "{}",
        outputs[1]
    );
    assert!(lower(2).contains("x-cache: hit"), "{}", outputs[2]);
    assert!(
        lower(3).contains("x-cache: hit"),
        "fromQueueCallId from the stored list: {}",
        outputs[3]
    );
    assert!(compressed(&outputs[4]), "{}", outputs[4]);
    assert_eq!(outputs[5], "206 1000 bytes of audio\n");
    assert!(
        outputs[6].contains("\"refreshed\":true") && outputs[6].contains("\"recordings\":40"),
        "{}",
        outputs[6]
    );
    assert!(outputs[7].contains("\"purged\":1"), "{}", outputs[7]);
    assert_eq!(outputs[8], "404\n");
    assert!(outputs[9].starts_with("{\"status\":400"), "{}", outputs[9]);
    assert!(lower(10).contains("x-cache: miss"), "{}", outputs[10]);
    assert!(outputs[11].starts_with("200 "), "{}", outputs[11]);
    assert!(
        outputs[12].contains("miralix_gateway_cache_hits_total{account=\"greenbox\"} 4"),
        "{}",
        outputs[12]
    );
    let printed = demo.seen.join("\n");
    assert!(
        printed.contains("ttl 1m for lists"),
        "the demo says its TTL: {printed}"
    );
    let logs = demo.finish();
    assert!(
        !logs.contains(miralix_gateway::demo::SHARED_SECRET),
        "{logs}"
    );
}

/// Datagrams from the gateway on a `$NOTIFY_SOCKET`, as systemd would receive them.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &std::path::Path) -> Self {
        let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Self {
            socket,
            seen: Vec::new(),
        }
    }

    /// Messages until one contains every `needle`; that message is returned.
    fn wait_for(&mut self, needles: &[&str]) -> String {
        let mut buffer = [0u8; 4096];
        loop {
            let n = self
                .socket
                .recv(&mut buffer)
                .unwrap_or_else(|e| panic!("no {needles:?} ({e}); saw {:?}", self.seen));
            let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
            self.seen.push(message.clone());
            if needles.iter().all(|needle| message.contains(needle)) {
                return message;
            }
        }
    }
}

fn send_signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal}");
}

/// A configuration for the binary: public and admin listeners on port 0, `server` lines
/// added to `[server]`, `tables` before the account, and the account on `simulator`.
fn serve_config(simulator: &Simulator, server: &str, tables: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}[admin]\nlisten = \"127.0.0.1:0\"\n{tables}\
         [accounts.{ACCOUNT}]\nbase_url = \"{}\"\nshared_secret = \"{SECRET}\"\n\
         pin_sha256 = \"{}\"\n",
        simulator.base_url(),
        pin_of(simulator)
    )
}

/// `serve --config config` (with `env` applied), once it says it is serving.
fn serve(config: &std::path::Path, env: impl FnOnce(&mut Command)) -> (Running, String) {
    let mut command = Command::new(BIN);
    command.args(["serve", "--config"]).arg(config);
    env(&mut command);
    let mut gateway = Running::spawn(&mut command, false);
    let serving = gateway.wait_for("miralix-gateway serving");
    (gateway, serving)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_it_notifies_reloads_on_sighup_and_stops_cleanly() {
    let simulator = start_box(SimulatorTls::SelfSigned).await;
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("greenbox-secret"), SECRET).unwrap();
    let pin = pin_of(&simulator);
    let config_text = |ttl: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [cache]\nttl = \"{ttl}\"\n[accounts.{ACCOUNT}]\nbase_url = \"{}\"\n\
             shared_secret_credential = \"greenbox-secret\"\npin_sha256 = \"{pin}\"\n",
            simulator.base_url()
        )
    };
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, config_text("30s")).unwrap();
    let mut notify = NotifySocket::bind(&dir.path().join("notify.sock"));
    let mut gateway = Running::spawn(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", dir.path().join("notify.sock"))
            .env("CREDENTIALS_DIRECTORY", &credentials)
            .env("WATCHDOG_USEC", "400000")
            .env_remove("WATCHDOG_PID"),
        false,
    );
    notify.wait_for(&["READY=1"]);
    let serving = gateway.wait_for("miralix-gateway serving");
    let public = addr_after(&serving, "public=");
    let reply = request(public, "GET", &path("id", "1"), &[]).await;
    assert_eq!(
        reply.status,
        200,
        "the secret from the credential was accepted: {}",
        reply.text()
    );
    notify.wait_for(&["WATCHDOG=1"]);

    std::fs::write(&config, config_text("10s")).unwrap();
    send_signal(&gateway.child, "-HUP");
    notify.wait_for(&["RELOADING=1", "MONOTONIC_USEC="]);
    notify.wait_for(&["READY=1", "STATUS=serving (reloaded)"]);
    gateway.wait_for("configuration reloaded");

    std::fs::write(&config, "[cache]\nttl = \"never\"\n").unwrap();
    send_signal(&gateway.child, "-HUP");
    notify.wait_for(&["RELOADING=1"]);
    notify.wait_for(&["READY=1", "refused"]);
    gateway.wait_for("reload refused");
    let reply = request(public, "GET", &path("id", "1"), &[]).await;
    assert_eq!(
        reply.status, 200,
        "still serving the previous configuration"
    );
    assert_eq!(reply.header("x-cache"), Some("HIT"), "and its cache");

    send_signal(&gateway.child, "-TERM");
    notify.wait_for(&["STOPPING=1"]);
    let status = gateway.child.wait().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let simulator = start_box(SimulatorTls::SelfSigned).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        serve_config(&simulator, "", "[log]\nformat = \"json\"\n"),
    )
    .unwrap();
    let (mut gateway, serving) = serve(&config, |_| {});
    let line: serde_json::Value = serde_json::from_str(&serving).expect("a JSON log line");
    let public: SocketAddr = line["fields"]["public"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        request(public, "GET", &path("id", "1"), &[]).await.status,
        200
    );
    let access = gateway.wait_for("miralix_gateway::access");
    let access: serde_json::Value = serde_json::from_str(&access).expect("a JSON access line");
    assert_eq!(access["fields"]["cache"], "miss");
    assert_eq!(access["fields"]["status"], 200);
    // The connection's span once, in the span list (no `span` repeating its last element).
    assert_eq!(access["spans"][0]["name"], "conn");
    assert!(access["spans"][0]["client.addr"].is_string(), "{access}");
    assert!(access.get("span").is_none(), "{access}");
    let logs = gateway.finish();
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    assert!(!logs.contains(SECRET));
}

#[test]
fn check_config_reports_every_problem_found_while_building_too() {
    let dir = tempfile::tempdir().unwrap();
    // Valid PEM around bytes that are no certificate: loading accepts it, building refuses it.
    let bad_anchor = dir.path().join("box-ca.pem");
    std::fs::write(
        &bad_anchor,
        "-----BEGIN CERTIFICATE-----\nAAAAAAAAAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let other_key = dir.path().join("other-key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(
        &other_key,
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let path = dir.path().join("gateway.toml");
    let account = |name: &str| {
        format!(
            "[accounts.{name}]\nbase_url = \"https://10.0.0.1\"\nshared_secret = \"s\"\nca_file = \"{}\"\nallow_anonymous = true\n",
            bad_anchor.display()
        )
    };
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
            cert.display(),
            other_key.display(),
            account("bluebox"),
            account("greenbox"),
        ),
    )
    .unwrap();
    let (ok, _, stderr) = check_config(&path);
    assert!(!ok);
    let file = path.display().to_string();
    for line in [
        format!(
            "{file}: accounts.bluebox: no certificate in ca_file could be used as a trust anchor"
        ),
        format!(
            "{file}: accounts.greenbox: no certificate in ca_file could be used as a trust anchor"
        ),
        format!(
            "{file}: server.tls.key: the private key does not belong to the certificate in {}",
            cert.display()
        ),
    ] {
        assert!(stderr.contains(&line), "missing {line:?} in:\n{stderr}");
    }
}

#[test]
fn a_busy_port_is_reported_once_naming_the_flag_and_what_to_do() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let output = std::process::Command::new(BIN)
        .args([
            "demo",
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.matches("cannot listen").count(), 1, "{stderr}");
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("cannot listen on {addr} (--listen)")),
        "{stderr}"
    );
    assert!(
        stderr.contains("127.0.0.1:0"),
        "suggests a free port: {stderr}"
    );
}

#[test]
fn every_flag_of_every_command_has_a_help_text() {
    for command in ["serve", "check-config", "demo", "simulate", "cache"] {
        let output = std::process::Command::new(BIN)
            .args([command, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{command}: {help}");
        let lines: Vec<&str> = help.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            let flag = line.trim_start();
            let is_flag = flag.starts_with("--") || flag.get(2..3) == Some(",");
            if flag.starts_with('-') && is_flag && !flag.contains("  ") {
                let next = lines.get(n + 1).map_or("", |l| l.trim());
                assert!(
                    !next.is_empty(),
                    "{command}: {flag} has no help text:\n{help}"
                );
            }
        }
    }
}

#[test]
fn an_unknown_key_gets_its_line_and_the_key_it_meant() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(
        &path,
        "[cache]\nttl = \"30s\"\ntll = \"30s\"\n[accounts.g]\nbase_url = \"http://127.0.0.1:9\"\nshared_secret = \"x\"\n",
    )
    .unwrap();
    let (ok, _, stderr) = check_config(&path);
    assert!(!ok);
    assert!(
        stderr.contains("cache.tll: unknown key (line 3); did you mean `ttl`?"),
        "{stderr}"
    );
}

/// `THP_enabled` from a process's `/proc/PID/status` (Linux 5.0 and later), if shown.
fn thp_enabled(pid: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(|value| value.trim().to_string())
}

#[tokio::test]
async fn the_process_opts_out_of_transparent_huge_pages_unless_told_to_keep_them() {
    let Some(inherited) = thp_enabled("self") else {
        eprintln!("skipped: this kernel's /proc/PID/status has no THP_enabled line");
        return;
    };
    let simulator = start_box(SimulatorTls::SelfSigned).await;
    let dir = tempfile::tempdir().unwrap();
    for (setting, expected) in [(None, "0"), (Some(false), "0"), (Some(true), &*inherited)] {
        let line = setting.map_or(String::new(), |keep| {
            format!("transparent_huge_pages = {keep}\n")
        });
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, serve_config(&simulator, &line, "")).unwrap();
        let (gateway, _) = serve(&config, |_| {});
        let pid = gateway.child.id().to_string();
        assert_eq!(
            thp_enabled(&pid).as_deref(),
            Some(expected),
            "server.transparent_huge_pages = {setting:?}"
        );
        gateway.finish();
    }
}

#[tokio::test]
async fn a_client_sending_an_ip_address_as_sni_leaves_no_warning_unless_rustls_is_asked_for() {
    let simulator = start_box(SimulatorTls::SelfSigned).await;
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let config = dir.path().join("gateway.toml");
    let tls = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    std::fs::write(&config, serve_config(&simulator, "", &tls)).unwrap();
    for rust_log in [None, Some("info,rustls=warn")] {
        let (gateway, serving) = serve(&config, |command| {
            match rust_log {
                Some(value) => command.env("RUST_LOG", value),
                None => command.env_remove("RUST_LOG"),
            };
        });
        let public = addr_after(&serving, "public=");
        let handshake = Command::new("openssl")
            .args(["s_client", "-connect", &public.to_string()])
            .args(["-servername", "127.0.0.1", "-CAfile"])
            .arg(&cert)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is installed (.ci/run installs it)");
        let said = String::from_utf8_lossy(&handshake.stdout);
        assert!(said.contains("Verify return code: 0 (ok)"), "{said}");
        let logs = gateway.finish();
        assert_eq!(
            logs.contains("Illegal SNI"),
            rust_log.is_some(),
            "RUST_LOG={rust_log:?}:\n{logs}"
        );
    }
}
