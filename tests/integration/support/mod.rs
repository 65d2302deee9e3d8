//! Fixtures: a gateway on port 0 in front of the simulated box, and a raw HTTP/1.1 client.
//!
//! The client writes request targets byte for byte (no URL normalization), so tests can send
//! `..`, encoded slashes and other input a real HTTP library would clean up first.

pub mod redis;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use miralix_gateway::AppState;
use miralix_gateway::clock::ManualClock;
use miralix_gateway::config::{self, format_pin};
use miralix_gateway::crypto::sha256;
use miralix_gateway::gateway::ReloadReport;
use miralix_gateway::server::Listeners;
use miralix_gateway::simulator::{Dataset, Simulator, SimulatorTls};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ACCOUNT: &str = "greenbox";
/// Distinctive, so a grep of logs and bodies cannot miss it.
pub const SECRET: &str = "sec-7Qx9-do-not-leak-5mK2";
/// An API key for tests that configure one; distinctive, like [`SECRET`].
pub const API_KEY: &str = "key-Zp4w-do-not-leak-7Hc3";

/// The admin token tests configure (see [`Options::admin_token`]).
pub const ADMIN_TOKEN: &str = "adm-3Rt8-do-not-leak-x9Q1";

/// Agent 103's canonical email address on the simulated box.
pub const EMAIL: &str = "derek.a@company.local";

/// `[cache]` lines for tests of plain expiry: no stale windows, no error backoff.
pub const NO_STALE: &str = "ttl = \"30s\"\nnegative_ttl = \"5s\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"0s\"\nerror_backoff = \"0s\"";

/// How the gateway is told to trust the simulated box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// `pin_sha256` of the box's certificate.
    Pin,
    /// `pin_sha256` of some other certificate.
    WrongPin,
    /// `ca_file` holding the box's issuing CA (its own certificate when self-signed).
    CaFile,
    /// `ca_file` holding a self-signed certificate that has nothing to do with the box.
    UnrelatedCaFile,
}

/// Options for [`Gateway::start`].
#[derive(Debug, Clone)]
pub struct Options {
    pub tls: SimulatorTls,
    pub trust: Trust,
    /// Extra lines for the `[cache]` table.
    pub cache: &'static str,
    /// Extra lines for the account table.
    pub account: String,
    /// Point the account somewhere other than the simulator.
    pub base_url: Option<String>,
    /// Extra lines for the `[server]` table.
    pub server: &'static str,
    /// Terminate TLS on the public listener with a certificate from a test CA.
    pub terminate_tls: bool,
    /// With `terminate_tls`: require client certificates issued by the same test CA.
    pub client_certificates: bool,
    /// Configure [`ADMIN_TOKEN`] for the cache endpoints.
    pub admin_token: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            tls: SimulatorTls::SelfSigned,
            trust: Trust::Pin,
            cache: "ttl = \"30s\"\nnegative_ttl = \"5s\"",
            account: String::new(),
            base_url: None,
            server: "",
            terminate_tls: false,
            client_certificates: false,
            admin_token: true,
        }
    }
}

/// A running gateway, its simulated box and its clock. Stops when dropped.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub state: Arc<AppState>,
    pub simulator: Simulator,
    pub clock: Arc<ManualClock>,
    /// The certificate authority behind the gateway's own certificate, with `terminate_tls`.
    pub tls: Option<TestCa>,
    /// The configuration text the gateway started with; [`Gateway::reload`] reads it again.
    pub config_text: String,
    dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A client certificate and its key.
pub struct ClientIdentity {
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
}

/// A test CA that issues the gateway's serving certificate into `cert.pem` / `key.pem`.
pub struct TestCa {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub ca_pem: String,
    pub cert_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
}

impl TestCa {
    pub fn new(dir: &std::path::Path) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gateway test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let ca_pem = ca.pem();
        let tls = Self {
            ca,
            ca_pem,
            cert_path: dir.join("cert.pem"),
            key_path: dir.join("key.pem"),
        };
        tls.issue();
        tls
    }

    /// Write a fresh certificate and key for `localhost`/`127.0.0.1`; returns the certificate.
    pub fn issue(&self) -> rustls::pki_types::CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(&self.cert_path, cert.pem()).unwrap();
        std::fs::write(&self.key_path, key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    /// A client certificate from this CA with a common name and DNS alternative names.
    pub fn client_identity(&self, common_name: &str, dns_names: &[&str]) -> ClientIdentity {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(
            dns_names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.ca).unwrap();
        ClientIdentity {
            chain: vec![cert.der().clone()],
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }

    /// A TLS client trusting only this CA, offering the given ALPN protocols.
    pub fn connector(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        self.connector_as(alpn, None)
    }

    /// The same, presenting `identity` when the server asks for a certificate.
    pub fn connector_as(
        &self,
        alpn: &[&[u8]],
        identity: Option<&ClientIdentity>,
    ) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config =
            rustls::ClientConfig::builder_with_provider(miralix_gateway::crypto::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        let mut config = match identity {
            Some(identity) => config
                .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
                .unwrap(),
            None => config.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

impl Gateway {
    pub async fn start(options: Options) -> Self {
        let simulator = start_box(options.tls).await;
        let dir = tempfile::tempdir().unwrap();
        let tls = options.terminate_tls.then(|| TestCa::new(dir.path()));
        let server_tls = tls.as_ref().map_or_else(String::new, |tls| {
            let client_ca = if options.client_certificates {
                let path = dir.path().join("client-ca.pem");
                std::fs::write(&path, &tls.ca_pem).unwrap();
                format!("client_ca = \"{}\"", path.display())
            } else {
                String::new()
            };
            format!(
                "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n{client_ca}",
                tls.cert_path.display(),
                tls.key_path.display()
            )
        });
        let trust = match (options.trust, simulator.certificate()) {
            (_, None) => String::new(),
            (Trust::Pin, Some(_)) => format!("pin_sha256 = \"{}\"", pin_of(&simulator)),
            (Trust::WrongPin, Some(_)) => format!("pin_sha256 = \"{}\"", "ab".repeat(32)),
            (Trust::CaFile, Some(cert)) => {
                let path = dir.path().join("box-ca.pem");
                std::fs::write(&path, &cert.ca_pem).unwrap();
                format!("ca_file = \"{}\"", path.display())
            }
            (Trust::UnrelatedCaFile, Some(_)) => {
                let other =
                    rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
                let path = dir.path().join("unrelated.pem");
                std::fs::write(&path, other.cert.pem()).unwrap();
                format!("ca_file = \"{}\"", path.display())
            }
        };
        let admin_token = if options.admin_token {
            let path = dir.path().join("admin.token");
            std::fs::write(&path, format!("{ADMIN_TOKEN}\n")).unwrap();
            format!("token_file = \"{}\"", path.display())
        } else {
            String::new()
        };
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
{server}
{server_tls}
[admin]
listen = "127.0.0.1:0"
{admin_token}
[cache]
{cache}
[accounts.{ACCOUNT}]
base_url = "{base}"
shared_secret = "{SECRET}"
{trust}
{account}
"#,
            server = options.server,
            cache = options.cache,
            base = options.base_url.unwrap_or_else(|| simulator.base_url()),
            account = options.account,
        );
        let config = config::from_toml_str(&text, "test.toml").expect("test config is valid");
        let clock = Arc::new(ManualClock::new());
        let state = Arc::new(AppState::new(config, clock.clone()).expect("state builds"));
        let listeners = Listeners {
            public: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            plain: None,
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let addr = listeners.public.local_addr().unwrap();
        let admin_addr = listeners.admin.local_addr().unwrap();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(miralix_gateway::run(listeners, state.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            admin: admin_addr,
            state,
            simulator,
            clock,
            tls,
            config_text: text,
            dir,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// A gateway in front of a plain-HTTP box (so a test can also ask the box directly), with
    /// extra `[cache]` and account lines.
    pub async fn plain(cache: &'static str, account: &str) -> Self {
        Self::start(Options {
            tls: SimulatorTls::Plain,
            cache,
            account: account.to_owned(),
            ..Options::default()
        })
        .await
    }

    pub async fn get(&self, target: &str) -> Reply {
        request(self.addr, "GET", target, &[]).await
    }

    /// Wait until no fetch is in flight and every fill has finished its entry (compressed,
    /// parsed). Clients are answered before that; a test that moves the clock or looks for
    /// the compressed copy right after a miss waits for it first.
    pub async fn settled(&self) {
        wait_until(
            "the fetches to land and their entries to be finished",
            || async { self.state.fetches_in_flight() == 0 },
        )
        .await;
    }

    /// What the box itself answers `200` for `target` (counted by the box like any request).
    pub async fn box_answer(&self, target: &str) -> Vec<u8> {
        let reply = request(
            self.simulator.addr(),
            "GET",
            target,
            &[("X-Miralix-Shared-Secret", SECRET)],
        )
        .await;
        assert_eq!(reply.status, 200, "{target}: {}", reply.text());
        reply.body
    }

    /// A request on the admin listener with [`ADMIN_TOKEN`].
    pub async fn admin(&self, method: &str, target: &str) -> Reply {
        let bearer = format!("Bearer {ADMIN_TOKEN}");
        request(self.admin, method, target, &[("Authorization", &bearer)]).await
    }

    pub async fn metrics(&self) -> String {
        let reply = request(self.admin, "GET", "/metrics", &[]).await;
        assert_eq!(reply.status, 200);
        reply.text()
    }

    /// Reload the configuration text it started with (re-reading the files it names).
    pub async fn reload(&self) -> Result<ReloadReport, String> {
        self.reload_text(&self.config_text.clone()).await
    }

    /// Reload from other configuration text, as SIGHUP does from the file.
    pub async fn reload_text(&self, text: &str) -> Result<ReloadReport, String> {
        let config = config::from_toml_str(text, "reload.toml").map_err(|e| e.to_string())?;
        self.state.reload(config).await.map_err(|e| e.to_string())
    }

    /// A scratch directory that lives as long as the gateway.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Ask the server to stop, without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Stop accepting and wait for the server to drain.
    pub async fn stop(mut self) {
        self.signal_stop();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A simulated box on a free loopback port serving the demo agents with [`SECRET`].
pub async fn start_box(tls: SimulatorTls) -> Simulator {
    Simulator::start(
        "127.0.0.1:0".parse().unwrap(),
        tls,
        Dataset::demo(ACCOUNT, SECRET),
    )
    .await
    .expect("simulator starts")
}

/// The `pin_sha256` value for a TLS simulator's certificate.
pub fn pin_of(simulator: &Simulator) -> String {
    format_pin(&sha256(
        &simulator.certificate().expect("a TLS box").leaf_der,
    ))
}

/// Path of agent `kind/value` on the test account.
pub fn path(kind: &str, value: &str) -> String {
    format!("/mot/{ACCOUNT}/agents/{kind}/{value}/recordings")
}

/// A parsed HTTP/1.1 answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

/// A GET running in the background (one of many concurrent clients).
pub fn spawn_get(addr: SocketAddr, target: String) -> JoinHandle<Reply> {
    tokio::spawn(async move { request(addr, "GET", &target, &[]).await })
}

/// Send one request with `Connection: close` and read the whole answer.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let raw = exchange(addr, head.as_bytes()).await;
    parse_reply(&raw).unwrap_or_else(|| {
        panic!(
            "unparsable answer to {method} {target}: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

/// Write raw bytes, read until the server closes (bounded by a timeout).
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw))
        .await
        .expect("answer within 20s")
        .expect("read");
    raw
}

pub fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head_len) = response.parse(raw).ok()? else {
        return None;
    };
    let headers: Vec<(String, String)> = response
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let mut body = raw[head_len..].to_vec();
    if let Some((_, length)) = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        body.truncate(length.parse().ok()?);
    } else if headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    }) {
        body = dechunk(&body)?;
    }
    Some(Reply {
        status: response.code?,
        headers,
        body,
    })
}

/// A chunked body (as other servers than the gateway send, e.g. Prometheus) decoded.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// A client connection kept open across requests (plain TCP or TLS).
pub struct KeepAlive<S> {
    pub stream: S,
    buffer: Vec<u8>,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> KeepAlive<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buffer: Vec::new(),
        }
    }

    /// One GET on the open connection; `None` if the server closed it instead of answering.
    pub async fn get(&mut self, target: &str) -> Option<Reply> {
        let head = format!("GET {target} HTTP/1.1\r\nHost: gateway\r\n\r\n");
        self.stream.write_all(head.as_bytes()).await.ok()?;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some((reply, used)) = complete_reply(&self.buffer) {
                self.buffer.drain(..used);
                return Some(reply);
            }
            let read = tokio::time::timeout(Duration::from_secs(20), self.stream.read(&mut chunk))
                .await
                .expect("an answer within 20s")
                .ok()?;
            if read == 0 {
                return None;
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    /// Wait (bounded) for the server to close the connection; true if it did.
    pub async fn closed_by_server(&mut self, within: Duration) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match tokio::time::timeout(within, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// Every whole answer in `raw`, in order (pipelined requests on one connection).
pub fn parse_replies(mut raw: &[u8]) -> Vec<Reply> {
    let mut replies = Vec::new();
    while let Some((reply, used)) = complete_reply(raw) {
        replies.push(reply);
        raw = &raw[used..];
    }
    replies
}

/// A whole answer at the start of `raw` (by Content-Length), and how many bytes it took.
fn complete_reply(raw: &[u8]) -> Option<(Reply, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head_len) = response.parse(raw).ok()? else {
        return None;
    };
    let length: usize = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
        .unwrap_or(0);
    if raw.len() < head_len + length {
        return None;
    }
    let reply = parse_reply(&raw[..head_len + length])?;
    Some((reply, head_len + length))
}

/// Wait for `condition` to hold, checking as it may change; fails the test after 10 s.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The `upstream_list_fetches_total` series of the test account for one `kind`.
pub fn list_fetches(kind: &str) -> String {
    format!("miralix_gateway_upstream_list_fetches_total{{account=\"{ACCOUNT}\",kind=\"{kind}\"}}")
}

/// The `QueueCallId`s of a recordings list, in its order.
pub fn ids(body: &[u8]) -> Vec<u64> {
    let list: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
    list.iter()
        .map(|r| r["QueueCallId"].as_u64().unwrap())
        .collect()
}

/// The value of one sample line in a Prometheus exposition, e.g.
/// `miralix_gateway_cache_hits_total{account="greenbox"}`.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// A child process whose stderr (or stdout) lines are collected as they arrive; killed when
/// dropped, so a failing test leaves no process behind.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Running {
    pub fn spawn(command: &mut Command, read_stdout: bool) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (sender, lines) = mpsc::channel();
        let readers: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stderr.take().unwrap()),
            Box::new(child.stdout.take().unwrap()),
        ];
        for (n, reader) in readers.into_iter().enumerate() {
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    // stdout is drained either way, so the child never blocks on a full pipe.
                    if n == 0 || read_stdout {
                        let _ = sender.send(line);
                    }
                }
            });
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Lines until one contains `needle`; that line is returned.
    pub fn wait_for(&mut self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| {
                    panic!("no line with {needle:?}; saw:\n{}", self.seen.join("\n"))
                });
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// The first line, seen already or still to come, that contains `needle`: for a line
    /// that may come before or after the ones a start waited for.
    pub fn find_or_wait_for(&mut self, needle: &str) -> String {
        match self.seen.iter().find(|line| line.contains(needle)) {
            Some(line) => line.clone(),
            None => self.wait_for(needle),
        }
    }

    /// Stop the process and return everything it wrote.
    pub fn finish(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }
}

pub fn addr_after(line: &str, key: &str) -> SocketAddr {
    let start = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tmpfs of `size` mounted on `dir` for as long as it lives; `None` (with the reason
/// printed) where this process may not mount one, i.e. when not root.
pub struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    pub fn mount(dir: &std::path::Path, size: &str) -> Option<Self> {
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned));
        if uid.as_deref() != Some("0") {
            eprintln!(
                "skipped: a full disk is a small tmpfs, and mounting one needs root (CI runs as root)"
            );
            return None;
        }
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount -t tmpfs failed");
        Some(Self(dir.to_owned()))
    }

    pub fn grow(&self, size: &str) {
        let remounted = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(remounted.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
