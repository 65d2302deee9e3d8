//! Load probe for the benchmark harness (`bench/run.sh`): timed HTTP/1.1 requests over plain
//! TCP or TLS, for the scenarios `wrk` cannot express. Prints one JSON object of latency
//! statistics in milliseconds.
//!
//! - `probe storm URL N [--spread URL]...`: N connections opened first (round-robin over URL
//!   and every `--spread` URL: a storm over a fleet), then one request each, all at once (a
//!   cold-miss storm).
//! - `probe sequence BASE TEMPLATE FROM COUNT`: COUNT requests for distinct keys (`{n}` in
//!   TEMPLATE runs from FROM), over `--parallel` keep-alive connections (misses, or filling the
//!   cache).
//! - `probe soak BASE TEMPLATE FROM KEYS SECONDS`: the KEYS keys from FROM, round and round on
//!   one keep-alive connection for SECONDS (reads during an outage).
//! - `probe rate URL RATE SECONDS [--connections C]`: open loop at a fixed offered load: RATE
//!   requests per second on C keep-alive connections (default 64) for SECONDS, request `i`
//!   due at `i / RATE`; a request sent late because its connection was still busy counts
//!   from when it was due (a server that falls behind is charged for the queue, not excused
//!   by it), others from when they were sent. Reports p50, p99 and p99.9,
//!   the rate achieved, and how busy the probe's own CPU was (`probe_cpu`, 1.0 = one core).
//! - `probe replay BASE TEMPLATE CLIENTS SECONDS --id N...`: CLIENTS keep-alive connections,
//!   each asking for the given ids round and round (each client from its own starting point)
//!   for SECONDS, as fast as answers come (recordings replayed; `--header "Range: ..."` for
//!   ranges).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use reqwest::Url;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Cli {
    /// CA certificate (PEM) to trust for https:// URLs.
    #[arg(long, global = true)]
    ca: Option<std::path::PathBuf>,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(long = "header", global = true)]
    headers: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Storm {
        url: Url,
        concurrency: usize,
        /// More servers to spread the connections over (the same path on each).
        #[arg(long)]
        spread: Vec<Url>,
    },
    Sequence {
        base: Url,
        template: String,
        from: u64,
        count: u64,
        #[arg(long, default_value_t = 1)]
        parallel: u64,
    },
    Soak {
        base: Url,
        template: String,
        from: u64,
        keys: u64,
        seconds: u64,
    },
    Rate {
        url: Url,
        rate: f64,
        seconds: f64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
    },
    Replay {
        base: Url,
        template: String,
        clients: u64,
        seconds: f64,
        /// The keys replayed (`{n}` in TEMPLATE).
        #[arg(long = "id", required = true)]
        ids: Vec<u64>,
    },
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

struct Client {
    tls: Option<tokio_rustls::TlsConnector>,
    /// Extra header lines, each ending in CRLF.
    headers: String,
}

impl Client {
    fn new(ca: Option<&std::path::Path>, headers: &[String]) -> Self {
        let tls = ca.map(|path| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).expect("readable CA file") {
                roots
                    .add(cert.expect("PEM certificate"))
                    .expect("usable CA");
            }
            let config =
                rustls::ClientConfig::builder_with_provider(miralix_gateway::crypto::provider())
                    .with_safe_default_protocol_versions()
                    .expect("TLS versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        });
        let headers = headers.iter().map(|h| format!("{h}\r\n")).collect();
        Self { tls, headers }
    }

    async fn connect(&self, url: &Url) -> Box<dyn Stream> {
        let host = url.host_str().expect("URL with a host");
        let port = url.port_or_known_default().expect("URL with a port");
        let tcp = TcpStream::connect((host, port)).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        if url.scheme() == "https" {
            let connector = self.tls.as_ref().expect("--ca for https");
            let name = ServerName::try_from(host.to_owned()).expect("server name");
            Box::new(connector.connect(name, tcp).await.expect("TLS handshake"))
        } else {
            Box::new(tcp)
        }
    }
}

/// Send one GET and read the whole answer; returns its status.
async fn get(
    client: &Client,
    stream: &mut Box<dyn Stream>,
    url: &Url,
    buffer: &mut Vec<u8>,
) -> u16 {
    let target = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let head = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: miralix-bench-probe\r\n{}\r\n",
        url.host_str().unwrap_or("localhost"),
        client.headers
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    buffer.clear();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head_len)) = response.parse(buffer) {
            let length: usize = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap_or(0);
            let status = response.code.unwrap_or(0);
            while buffer.len() < head_len + length {
                assert!(
                    read_more(stream, buffer).await > 0,
                    "connection closed mid-answer"
                );
            }
            return status;
        }
        assert!(
            read_more(stream, buffer).await > 0,
            "connection closed before an answer"
        );
    }
}

/// Read what has arrived into `buffer`'s spare room. The buffer is kept from one request to
/// the next on a connection, so a request costs the probe no allocation and no zeroing: a
/// zeroed 64 KiB buffer per request made the probe's own latency part of the servers' p99.
async fn read_more(stream: &mut Box<dyn Stream>, buffer: &mut Vec<u8>) -> usize {
    buffer.reserve(64 * 1024);
    stream.read_buf(buffer).await.expect("read")
}

fn report(mut samples: Vec<(u16, Duration)>) -> serde_json::Value {
    samples.sort_by_key(|(_, d)| *d);
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    let at = |q: f64| {
        let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        ms(samples[index].1)
    };
    let mut statuses = std::collections::BTreeMap::<String, u64>::new();
    for (status, _) in &samples {
        *statuses.entry(status.to_string()).or_default() += 1;
    }
    serde_json::json!({
        "n": samples.len(),
        "statuses": statuses,
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
        "p999_ms": at(0.999),
        "max_ms": ms(samples.last().map_or(Duration::ZERO, |s| s.1)),
    })
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let client = Arc::new(Client::new(cli.ca.as_deref(), &cli.headers));
    let samples = match cli.command {
        Command::Storm {
            url,
            concurrency,
            spread,
        } => {
            let start = Arc::new(tokio::sync::Barrier::new(concurrency));
            let targets: Vec<Url> = std::iter::once(url).chain(spread).collect();
            let mut tasks = Vec::new();
            for n in 0..concurrency {
                let url = targets[n % targets.len()].clone();
                let (client, start) = (client.clone(), start.clone());
                tasks.push(tokio::spawn(async move {
                    let mut stream = client.connect(&url).await;
                    start.wait().await;
                    let began = Instant::now();
                    let status = get(&client, &mut stream, &url, &mut Vec::new()).await;
                    vec![(status, began.elapsed())]
                }));
            }
            gather(tasks).await
        }
        Command::Sequence {
            base,
            template,
            from,
            count,
            parallel,
        } => {
            let mut tasks = Vec::new();
            for worker in 0..parallel {
                let (client, base, template) = (client.clone(), base.clone(), template.clone());
                tasks.push(tokio::spawn(async move {
                    let mut stream = client.connect(&base).await;
                    let mut buffer = Vec::new();
                    let mut samples = Vec::new();
                    let mut n = worker;
                    while n < count {
                        let key = from + n;
                        samples.push(
                            timed_get(&client, &mut stream, &base, &template, key, &mut buffer)
                                .await,
                        );
                        n += parallel;
                    }
                    samples
                }));
            }
            gather(tasks).await
        }
        Command::Soak {
            base,
            template,
            from,
            keys,
            seconds,
        } => soak(&client, &base, &template, from, keys, seconds).await,
        Command::Rate {
            url,
            rate,
            seconds,
            connections,
        } => {
            let (samples, extra) = open_loop(client, url, rate, seconds, connections).await;
            let mut report = report(samples);
            for (key, value) in extra {
                report[key] = value;
            }
            println!("{report}");
            return;
        }
        Command::Replay {
            base,
            template,
            clients,
            seconds,
            ids,
        } => {
            let until = Instant::now() + Duration::from_secs_f64(seconds);
            let ids = Arc::new(ids);
            let mut tasks = Vec::new();
            for worker in 0..clients {
                let (client, base, template, ids) =
                    (client.clone(), base.clone(), template.clone(), ids.clone());
                tasks.push(tokio::spawn(async move {
                    let mut stream = client.connect(&base).await;
                    let (mut buffer, mut samples) = (Vec::new(), Vec::new());
                    let mut n = worker as usize;
                    while Instant::now() < until {
                        let key = ids[n % ids.len()];
                        samples.push(
                            timed_get(&client, &mut stream, &base, &template, key, &mut buffer)
                                .await,
                        );
                        n += 1;
                    }
                    samples
                }));
            }
            gather(tasks).await
        }
    };
    println!("{}", report(samples));
}

/// This process's CPU time so far (user and system), from `/proc/self/stat`.
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |n: usize| {
        fields
            .get(n)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, in clock ticks (100 per second on Linux).
    (ticks(11) + ticks(12)) / 100.0
}

/// `rate` requests per second for `seconds`, request `i` due at `i / rate`, on `connections`
/// keep-alive connections opened first; the latencies count from when each was due.
async fn open_loop(
    client: Arc<Client>,
    url: Url,
    rate: f64,
    seconds: f64,
    connections: usize,
) -> (Vec<(u16, Duration)>, Vec<(&'static str, serde_json::Value)>) {
    let total = (rate * seconds) as u64;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut streams = Vec::new();
    for _ in 0..connections {
        streams.push(client.connect(&url).await);
    }
    let cpu_before = own_cpu_seconds();
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::new();
    for mut stream in streams {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let (mut buffer, mut samples) = (Vec::new(), Vec::new());
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return samples;
                }
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                // Behind schedule (the server kept this connection past `due`): the wait
                // counts. Otherwise from when it is sent: the timer wakes within a
                // millisecond, and that lateness is the probe's, not the server's.
                let began = match tokio::time::Instant::now() > due {
                    true => due,
                    false => {
                        tokio::time::sleep_until(due).await;
                        tokio::time::Instant::now()
                    }
                };
                let status = get(&client, &mut stream, &url, &mut buffer).await;
                samples.push((status, began.elapsed()));
            }
        }));
    }
    let samples = gather(tasks).await;
    let wall = start.elapsed().as_secs_f64();
    let extra = vec![
        ("offered_rps", serde_json::json!(rate)),
        (
            "achieved_rps",
            serde_json::json!((samples.len() as f64 / wall).round()),
        ),
        ("seconds", serde_json::json!(wall)),
        (
            "probe_cpu",
            serde_json::json!(((own_cpu_seconds() - cpu_before) / wall * 100.0).round() / 100.0),
        ),
    ];
    (samples, extra)
}

/// Every sample of every task, once all have finished.
async fn gather(tasks: Vec<tokio::task::JoinHandle<Vec<(u16, Duration)>>>) -> Vec<(u16, Duration)> {
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("probe task"));
    }
    samples
}

/// One GET for key `n` (`{n}` in `template`), with its status and how long it took.
async fn timed_get(
    client: &Client,
    stream: &mut Box<dyn Stream>,
    base: &Url,
    template: &str,
    n: u64,
    buffer: &mut Vec<u8>,
) -> (u16, Duration) {
    let url = base
        .join(&template.replace("{n}", &n.to_string()))
        .expect("URL");
    let began = Instant::now();
    let status = get(client, stream, &url, buffer).await;
    (status, began.elapsed())
}

/// Requests over the keys, round and round, for `seconds`, on one keep-alive connection.
async fn soak(
    client: &Client,
    base: &Url,
    template: &str,
    from: u64,
    keys: u64,
    seconds: u64,
) -> Vec<(u16, Duration)> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut stream = client.connect(base).await;
    let mut buffer = Vec::new();
    let mut samples = Vec::new();
    let mut n = 0;
    while Instant::now() < until {
        let key = from + n % keys;
        samples.push(timed_get(client, &mut stream, base, template, key, &mut buffer).await);
        n += 1;
        // A short pause keeps this a steady reader, not a load test.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    samples
}
