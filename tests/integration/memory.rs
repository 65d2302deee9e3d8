//! The memory bound, measured on the real binary: after any sequence of requests its resident
//! set stays within 1.5 x `cache.max_bytes` + 40 MiB, for recordings lists and for `404`s
//! alike, whether the box writes an answer in one piece or in many small ones.
//!
//! The gateway runs as its own process (so the figure is not mixed with the test's), in front
//! of the simulated box in this process, and its RSS is read from `/proc/<pid>/smaps`.
//!
//! The promise is for the binary that ships, a release build; the tests run a debug build, whose
//! own code and debug sections are about 2.5 times as large in memory (24 against 10 MiB resident
//! when idle). So the pages mapped from the executable file are left out here: what remains
//! (the heap, the stacks, the libraries) is what requests can grow. In this very flood the release
//! build's whole RSS, executable included, came to 61 to 63 MiB, and the debug build's RSS less
//! its executable to about the same; `bench/run.sh` checks the release build's whole RSS against
//! the promise.

use std::net::SocketAddr;
use std::process::Command;

use miralix_gateway::simulator::{Dataset, Simulator, SimulatorTls, SyntheticAgents};
use tokio::net::TcpStream;

use crate::support::{ACCOUNT, KeepAlive, Running, SECRET, addr_after, path, request, sample};

const BIN: &str = env!("CARGO_BIN_EXE_miralix-gateway");
const MIB: u64 = 1024 * 1024;
/// The cache bound both floods go through.
const MAX_BYTES: u64 = 32 * MIB;
const FIRST_AGENT: u64 = 1_000_000;
const LISTS: u64 = 8_000;
const UNKNOWN_AGENTS: u64 = 20_000;
/// Recordings per agent: about 13.6 KB a list, as in the adversarial run.
const CALLS: u64 = 39;
/// Client connections the floods are spread over.
const CLIENTS: u64 = 8;

/// Resident set size of a running process less the pages mapped from its executable file, from
/// the kernel's own accounting (see the module's comment for why the executable is left out).
fn rss_bytes(process: &Running) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", process.child.id())).unwrap();
    let executable = std::fs::canonicalize(BIN).unwrap();
    let executable = executable.to_str().unwrap();
    let (mut total_kib, mut executable_kib) = (0, 0);
    let mut in_executable = false;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            let kib: u64 = kib.trim().trim_end_matches("kB").trim().parse().unwrap();
            total_kib += kib;
            if in_executable {
                executable_kib += kib;
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|first| first.contains('-'))
        {
            // A mapping's header: `start-end perms offset dev inode [path]`.
            in_executable = line.split_whitespace().nth(5) == Some(executable);
        }
    }
    assert!(
        executable_kib > 0,
        "no resident page of {executable} in smaps"
    );
    (total_kib - executable_kib) * 1024
}

/// Start the binary in front of `simulator`; returns it with its public and admin addresses.
fn spawn_gateway(
    dir: &std::path::Path,
    simulator: &Simulator,
) -> (Running, SocketAddr, SocketAddr) {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[cache]
max_bytes = {MAX_BYTES}
ttl = "10m"
negative_ttl = "10m"
[accounts.{ACCOUNT}]
base_url = "{}"
shared_secret = "{SECRET}"
"#,
            simulator.base_url()
        ),
    )
    .unwrap();
    let mut gateway = Running::spawn(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env(
                "RUST_LOG",
                "warn,miralix_gateway=info,miralix_gateway::access=off",
            ),
        false,
    );
    let serving = gateway.wait_for("miralix-gateway serving");
    let (public, admin) = (
        addr_after(&serving, "public="),
        addr_after(&serving, "admin="),
    );
    (gateway, public, admin)
}

/// GET every agent id in `ids` over [`CLIENTS`] keep-alive connections; every answer must have
/// `status`.
async fn flood(addr: SocketAddr, ids: std::ops::Range<u64>, status: u16) {
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut connection = KeepAlive::new(TcpStream::connect(addr).await.unwrap());
                for id in ids.skip(client as usize).step_by(CLIENTS as usize) {
                    let target = path("id", &id.to_string());
                    let reply = connection
                        .get(&target)
                        .await
                        .unwrap_or_else(|| panic!("no answer to {target}"));
                    assert_eq!(reply.status, status, "{target}: {}", reply.text());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

async fn holds_the_bound(split_writes: bool) {
    let mut dataset = Dataset::demo(ACCOUNT, SECRET);
    dataset.synthetic = Some(SyntheticAgents {
        first_id: FIRST_AGENT,
        count: LISTS,
        calls: CALLS,
    });
    let simulator = Simulator::start("127.0.0.1:0".parse().unwrap(), SimulatorTls::Plain, dataset)
        .await
        .unwrap();
    simulator.set_split_writes(split_writes);
    let dir = tempfile::tempdir().unwrap();
    let (gateway, public, admin) = spawn_gateway(dir.path(), &simulator);
    let bound = MAX_BYTES * 3 / 2 + 40 * MIB;
    let mode = if split_writes { "split" } else { "one-write" };

    let idle = rss_bytes(&gateway);
    let unknown = 90_000_000..90_000_000 + UNKNOWN_AGENTS;
    flood(public, unknown, 404).await;
    let after_404s = rss_bytes(&gateway);
    let lists = FIRST_AGENT..FIRST_AGENT + LISTS;
    flood(public, lists, 200).await;
    let after_lists = rss_bytes(&gateway);
    let metrics = request(admin, "GET", "/metrics", &[]).await.text();
    let weighed = sample(&metrics, "miralix_gateway_cache_bytes");
    let requests = simulator.request_count() as u64;
    println!(
        "{mode} box: RSS less the executable {:.1} MiB idle, {:.1} MiB after {UNKNOWN_AGENTS} 404s, {:.1} MiB after {LISTS} lists \
         (bound {:.1} MiB); cache weighs {:.1} MiB; {requests} box requests",
        idle as f64 / MIB as f64,
        after_404s as f64 / MIB as f64,
        after_lists as f64 / MIB as f64,
        bound as f64 / MIB as f64,
        weighed / MIB as f64,
    );
    assert_eq!(requests, UNKNOWN_AGENTS + LISTS, "every request was a miss");
    assert!(weighed <= MAX_BYTES as f64, "the cache weighs {weighed}");
    assert!(
        after_404s <= bound,
        "{mode} box: RSS less the executable {after_404s} after {UNKNOWN_AGENTS} cached 404s, over the bound {bound}"
    );
    assert!(
        after_lists <= bound,
        "{mode} box: RSS less the executable {after_lists} after {LISTS} lists, over the bound {bound}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_stays_within_the_bound_when_the_box_writes_in_pieces() {
    holds_the_bound(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_stays_within_the_bound_when_the_box_writes_answers_whole() {
    holds_the_bound(false).await;
}
