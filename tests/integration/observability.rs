//! What operators plug in: `/metrics` as `promtool` and a real Prometheus server read it, the
//! alert rules in `deploy/prometheus/` (checked and unit-tested by promtool, evaluated by
//! Prometheus), and the Grafana dashboard's queries against a real exposition.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use miralix_gateway::simulator::Failure;

use crate::support::redis::free_port;
use crate::support::*;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

/// A tool from Debian's `prometheus` package (which `.ci/run` installs).
fn tool(name: &'static str) -> &'static str {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "{name} is not installed: apt-get install prometheus (.ci/run installs it)"
    );
    name
}

/// A gateway with a disk tier that has answered hits, misses, a 404, a 400, a box failure and
/// a refresh, so every family of the exposition has samples.
async fn busy_gateway(dir: &Path) -> Gateway {
    let cache: &'static str = Box::leak(
        format!(
            "ttl = \"30s\"\n[cache.disk]\npath = \"{}\"",
            dir.join("cache.redb").display()
        )
        .into_boxed_str(),
    );
    let gateway = Gateway::start(Options {
        cache,
        ..Options::default()
    })
    .await;
    for target in [
        path("id", "103"),
        path("id", "103"),
        path("id", "999"),
        path("id", "x!"),
    ] {
        gateway.get(&target).await;
    }
    gateway.simulator.set_failure(Failure::Status(500));
    gateway.get(&path("id", "1")).await;
    gateway.simulator.set_failure(Failure::None);
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    request(
        gateway.admin,
        "POST",
        &format!("/cache/{ACCOUNT}/agents/id/103/refresh"),
        &[("authorization", &bearer)],
    )
    .await;
    gateway
}

/// The `expr` of every rule in an alert rules file (single-line or `|` blocks).
fn rule_expressions(yaml: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        if rest.trim() != "|" {
            exprs.push(rest.trim().to_owned());
            continue;
        }
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            if next.len() - next.trim_start().len() <= indent && !next.trim().is_empty() {
                break;
            }
            block.push_str(next.trim());
            block.push(' ');
            lines.next();
        }
        exprs.push(block.trim().to_owned());
    }
    exprs
}

/// Every query of the dashboard, with Grafana's `$__rate_interval` as Prometheus reads it.
fn dashboard_expressions() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(deploy("grafana/miralix-gateway.json")).unwrap())
            .unwrap();
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap().clone())
        .map(|target| {
            target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
        })
        .collect()
}

/// The metric names an expression reads (ours and the standard process ones).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (start, _) in expr
        .match_indices("miralix_gateway_")
        .chain(expr.match_indices("process_"))
    {
        if start > 0 && expr.as_bytes()[start - 1].is_ascii_alphanumeric() {
            continue;
        }
        let name: String = expr[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.push(name);
    }
    names
}

#[tokio::test]
async fn promtool_finds_the_exposition_clean_in_either_format() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = busy_gateway(dir.path()).await;
    let classic = request(gateway.admin, "GET", "/metrics", &[]).await;
    assert_eq!(
        classic.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = classic.text();
    assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    let mut check = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
    for series in [
        "miralix_gateway_build_info{version=\"",
        "miralix_gateway_request_duration_seconds_bucket{le=\"0.0001\",cache=\"hit\"}",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "process_open_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(text.contains(series), "{series} missing");
    }
    let open = request(
        gateway.admin,
        "GET",
        "/metrics",
        &[(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )],
    )
    .await;
    assert_eq!(
        open.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(open.text().ends_with("# EOF\n"));
}

#[test]
fn the_alert_rules_check_and_pass_their_unit_tests() {
    let dir = deploy("prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new(tool("promtool"))
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    assert_eq!(rule_expressions(&rules).len(), 8);
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_read_is_exposed() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = busy_gateway(dir.path()).await;
    let exposed = gateway.metrics().await;
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let mut queries = dashboard_expressions();
    queries.extend(rule_expressions(&rules));
    let mut checked = 0;
    for expr in &queries {
        for name in metric_names(expr) {
            let present = exposed.lines().any(|line| {
                line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
            });
            assert!(present, "{name} (in {expr}) is not in /metrics");
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} names found");
}

/// A Prometheus API query's `data.result`.
async fn query(prometheus: std::net::SocketAddr, expr: &str) -> serde_json::Value {
    let encoded: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
    let reply = request(
        prometheus,
        "GET",
        &format!("/api/v1/query?query={encoded}"),
        &[],
    )
    .await;
    let body = reply.json();
    assert_eq!(body["status"], "success", "{expr}: {body}");
    body["data"]["result"].clone()
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_gateway_and_evaluates_every_query() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = busy_gateway(dir.path()).await;
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: miralix-gateway\n    static_configs:\n      - targets: [\"{}\"]\n",
            deploy("prometheus/alerts.yml").display(),
            gateway.admin
        ),
    )
    .unwrap();
    let _prometheus = Running::spawn(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}")),
        false,
    );
    let api: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Its start (a new TSDB) and a first scrape take a few seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Until its TSDB is open, the API answers 503 in plain text.
        if tokio::net::TcpStream::connect(api).await.is_ok()
            && request(api, "GET", "/-/ready", &[]).await.status == 200
        {
            let up = query(api, "up{job=\"miralix-gateway\"}").await;
            if up.as_array().is_some_and(|r| !r.is_empty()) {
                assert_eq!(up[0]["value"][1], "1", "{up}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the gateway"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hits = query(
        api,
        "miralix_gateway_cache_hits_total{account=\"greenbox\"}",
    )
    .await;
    assert_eq!(hits[0]["value"][1], "1", "{hits}");
    let build = query(api, "miralix_gateway_build_info").await;
    assert_eq!(build[0]["metric"]["version"], env!("CARGO_PKG_VERSION"));
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    for expr in dashboard_expressions()
        .iter()
        .chain(&rule_expressions(&rules))
    {
        query(api, expr).await;
    }
    let loaded = request(api, "GET", "/api/v1/rules", &[]).await.json();
    let groups = loaded["data"]["groups"].as_array().unwrap();
    assert_eq!(groups[0]["rules"].as_array().unwrap().len(), 8, "{loaded}");
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
async fn request_ids_and_trace_context_go_back_to_the_client_and_on_to_the_box() {
    let gateway = Gateway::start(Options::default()).await;
    let traced = [
        ("x-request-id", "crm-widget-7f3a"),
        ("traceparent", TRACEPARENT),
    ];
    let reply = request(gateway.addr, "GET", &path("id", "103"), &traced).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-request-id"), Some("crm-widget-7f3a"));
    let audio = request(
        gateway.addr,
        "GET",
        &format!(
            "/mot/{ACCOUNT}/queues/calls/recordings/{}",
            47_000 + 103 * 1_000
        ),
        &[("x-request-id", "archiver-1"), ("traceparent", "00-bogus")],
    )
    .await;
    assert_eq!(audio.header("x-request-id"), Some("archiver-1"));
    let received = gateway.simulator.received();
    assert_eq!(received.len(), 2);
    let header = |n: usize, name: &str| {
        received[n]
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(
        header(0, "x-request-id").as_deref(),
        Some("crm-widget-7f3a")
    );
    assert_eq!(header(0, "traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(header(1, "x-request-id").as_deref(), Some("archiver-1"));
    assert_eq!(
        header(1, "traceparent"),
        None,
        "a malformed traceparent is dropped"
    );
    // Errors carry one too; a missing or unusable id is replaced by the gateway's own.
    let long = "x".repeat(200);
    for (target, headers) in [
        (path("id", "x!"), vec![]),
        ("/nowhere".to_owned(), vec![("x-request-id", long.as_str())]),
        (path("id", "9999"), vec![("x-request-id", "two words")]),
    ] {
        let reply = request(gateway.addr, "GET", &target, &headers).await;
        assert!(reply.status >= 400, "{target}");
        let id = reply
            .header("x-request-id")
            .expect("every answer has an id");
        assert_eq!(id.len(), 32, "{target}: {id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}

#[tokio::test]
async fn the_access_event_carries_the_ids_the_query_and_a_numeric_duration() {
    let boxsim = start_box(miralix_gateway::simulator::SimulatorTls::Plain).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("g.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n[accounts.{ACCOUNT}]\nbase_url = \"{}\"\nshared_secret = \"{SECRET}\"\n",
            boxsim.base_url()
        ),
    )
    .unwrap();
    let mut gateway = Running::spawn(
        Command::new(env!("CARGO_BIN_EXE_miralix-gateway"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info"),
        false,
    );
    let serving: serde_json::Value =
        serde_json::from_str(&gateway.wait_for("miralix-gateway serving")).unwrap();
    let addr = serving["fields"]["public"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let target = format!("{}?fromQueueCallId=0", path("id", "103"));
    let traced = [("x-request-id", "qa-dash-19"), ("traceparent", TRACEPARENT)];
    assert_eq!(request(addr, "GET", &target, &traced).await.status, 200);
    let line = gateway.wait_for("miralix_gateway::access");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    let fields = &event["fields"];
    assert_eq!(fields["request_id"], "qa-dash-19", "{line}");
    assert_eq!(fields["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(fields["path"], target.as_str());
    assert!(fields["duration_ms"].is_f64(), "{line}");
    assert!(fields["status"].is_u64(), "{line}");
    // A refused target is logged under the account it names.
    assert_eq!(
        request(addr, "GET", &path("phone", "1"), &[]).await.status,
        400
    );
    let refused: serde_json::Value =
        serde_json::from_str(&gateway.wait_for("miralix_gateway::access")).unwrap();
    assert_eq!(refused["fields"]["account"], ACCOUNT);
    assert_eq!(refused["fields"]["status"], 400);
}

/// A gateway whose box is down, started through `sh` so that `JOURNAL_STREAM` can name the
/// stderr it is given (as systemd does) or, with `named` false, another stream.
fn journal_gateway(dir: &Path, named: bool) -> (Running, std::net::SocketAddr) {
    let config = dir.join(format!("journal-{named}.toml"));
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[accounts.{ACCOUNT}]\nbase_url = \"http://127.0.0.1:{}\"\nshared_secret = \"{SECRET}\"\n",
            free_port()
        ),
    )
    .unwrap();
    let stream = match named {
        true => "$(stat -L -c %d:%i /proc/self/fd/2)",
        false => "1:1",
    };
    let mut gateway = Running::spawn(
        Command::new("sh")
            .arg("-c")
            .arg(format!("JOURNAL_STREAM={stream} exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_miralix-gateway"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info"),
        false,
    );
    let serving = gateway.wait_for("miralix-gateway serving");
    assert!(
        serving.starts_with("20"),
        "info goes without a prefix: {serving}"
    );
    let addr = serving
        .split("public=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    (gateway, addr)
}

#[tokio::test]
async fn on_the_journal_a_warning_carries_its_syslog_priority() {
    let dir = tempfile::tempdir().unwrap();
    for named in [true, false] {
        let (mut gateway, addr) = journal_gateway(dir.path(), named);
        assert_eq!(
            request(addr, "GET", &path("id", "103"), &[]).await.status,
            502
        );
        let warned = gateway.wait_for("upstream fetch failed");
        // journald takes `<4>` as the entry's priority (warning) and strips it.
        assert_eq!(warned.starts_with("<4>"), named, "{warned}");
    }
}

const ACCESS_DROPPED: &str = "miralix_gateway_access_log_dropped_lines_total";
const ACCESS_QUEUE: usize = miralix_gateway::telemetry::ACCESS_QUEUE_LINES;

#[tokio::test]
async fn a_log_reader_that_stops_reading_holds_up_no_request_and_every_line_is_accounted_for() {
    use std::io::BufRead;
    let boxsim = start_box(miralix_gateway::simulator::SimulatorTls::Plain).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("g.toml");
    // The audit log in a file of its own: on stderr it would wait for the reader, since no
    // audit record is ever dropped.
    let audit = dir.path().join("audit.log");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\naudit_file = \"{}\"\n[accounts.{ACCOUNT}]\nbase_url = \"{}\"\nshared_secret = \"{SECRET}\"\n",
            audit.display(),
            boxsim.base_url()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_miralix-gateway"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("miralix-gateway serving") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "exited early");
    }
    let (public, admin) = (addr_after(&line, "public="), addr_after(&line, "admin="));
    // From here on nobody reads the gateway's stderr: the pipe fills after a few hundred
    // access lines, then the queue; more requests than both hold.
    let requests = ACCESS_QUEUE + 2_000;
    let stream = tokio::net::TcpStream::connect(public).await.unwrap();
    let mut client = KeepAlive::new(stream);
    let target = path("id", "103");
    for _ in 0..requests {
        let reply = client.get(&target).await.expect("an answer");
        assert_eq!(reply.status, 200);
    }
    let dropped = sample(
        &request(admin, "GET", "/metrics", &[]).await.text(),
        ACCESS_DROPPED,
    );
    assert!(dropped > 0.0, "the queue holds {ACCESS_QUEUE} lines");
    // Reading again: every access line either arrives or was counted as dropped, and the
    // drops are reported.
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let (mut arrived, mut warned) = (0, false);
    while !(warned && arrived + dropped as usize == requests) {
        let line = received
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{arrived} access lines arrived, {dropped} dropped, of {requests}; warned: {warned}"));
        arrived += usize::from(line.contains("miralix_gateway::access: request"));
        warned |= line.contains("access log lines dropped");
    }
    // The audit record is whole.
    let audited = std::fs::read_to_string(&audit).unwrap().lines().count();
    assert_eq!(audited, requests);
    child.kill().unwrap();
    child.wait().unwrap();
}
