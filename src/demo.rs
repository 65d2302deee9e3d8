//! `miralix-gateway demo`: a simulated box and a gateway in front of it, on loopback.
//!
//! The box gets a fresh self-signed certificate and the gateway is pinned to it, exactly as an
//! operator would configure a real on-prem box addressed by IP.

use std::net::SocketAddr;

use crate::config::{self, Config, format_pin};
use crate::crypto::sha256;
use crate::simulator::{Dataset, Simulator, SimulatorError, SimulatorTls};

/// The account the demo box serves.
pub const ACCOUNT: &str = "greenbox";

/// The demo box's shared secret; it exists only inside this process.
pub const SHARED_SECRET: &str = "demo-secret-4f1c9a";

/// The demo's admin token, for the `/cache` endpoints.
pub const ADMIN_TOKEN: &str = "demo-admin-token-8d2e";

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Simulator(#[from] SimulatorError),
    #[error("the embedded demo configuration is invalid:\n{0}")]
    Config(#[from] config::ConfigError),
}

/// A running simulated box and the configuration of a gateway pinned to it.
#[derive(Debug)]
pub struct Demo {
    pub simulator: Simulator,
    pub config: Config,
}

/// Start the simulated box on a free loopback port and build the gateway's configuration.
pub async fn start(listen: SocketAddr, admin_listen: SocketAddr) -> Result<Demo, DemoError> {
    let simulator = Simulator::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimulatorTls::SelfSigned,
        Dataset::demo(ACCOUNT, SHARED_SECRET),
    )
    .await?;
    let certificate = simulator
        .certificate()
        .expect("the demo box always has a certificate");
    let pin = format_pin(&sha256(&certificate.leaf_der));
    let text = format!(
        r#"
[server]
listen = "{listen}"

[admin]
listen = "{admin_listen}"
token = "{ADMIN_TOKEN}"

[cache]
ttl = "60s"
negative_ttl = "5s"
max_bytes = "64MiB"

[accounts.{ACCOUNT}]
base_url = "{base_url}"
shared_secret = "{SHARED_SECRET}"
pin_sha256 = "{pin}"
"#,
        base_url = simulator.base_url(),
    );
    let config = config::from_toml_str(&text, "<embedded demo config>")?;
    Ok(Demo { simulator, config })
}

/// What to paste into a shell to try the running demo.
pub fn instructions(demo: &Demo, public: SocketAddr, admin: SocketAddr) -> String {
    let base = format!("http://{public}/mot/{ACCOUNT}/agents");
    let pin = demo
        .config
        .accounts
        .get(ACCOUNT)
        .and_then(|a| a.trust.pin_sha256)
        .map(|p| format_pin(&p))
        .unwrap_or_default();
    format!(
        "\
miralix-gateway demo

  simulated Miralix box  {box_url}  (self-signed certificate, pinned)
                         pin_sha256 = \"{pin}\"
  gateway                http://{public}
  admin                  http://{admin}  (status page at /, /metrics, /readyz, /cache)
  cache                  ttl {ttl} for lists, {negative_ttl} for unknown agents (this demo's settings)

Try it. Each command prints headers or a one-line summary, never a body:

  curl -s -o /dev/null -D - {base}/email/derek.a@company.local/recordings | grep -i -e '^HTTP' -e '^x-cache' -e '^cache-status' -e '^age'  # MISS: the box was asked
  curl -s -o /dev/null -D - {base}/email/derek.a@company.local/recordings | grep -i -e '^x-cache' -e '^cache-status' -e '^age'  # HIT, and its Age
  curl -s -o /dev/null -D - {base}/email/Derek.A@Company.Local/recordings | grep -i '^x-cache'  # same agent, other spelling: HIT
  curl -s -o /dev/null -D - '{base}/email/derek.a@company.local/recordings?fromQueueCallId=150100' | grep -i '^x-cache'  # from the stored list: HIT
  curl -s --compressed -o /dev/null -w '%{{size_download}} bytes gzip\\n' {base}/email/derek.a@company.local/recordings  # one line: the compressed size
  curl -s -o /dev/null -w '%{{http_code}} %{{size_download}} bytes of audio\\n' -H 'Range: bytes=0-999' http://{public}/mot/{ACCOUNT}/queues/calls/recordings/150000  # one line: 206 and the range's size
  curl -s -X POST -H 'Authorization: Bearer {ADMIN_TOKEN}' http://{admin}/cache/{ACCOUNT}/agents/email/derek.a@company.local/refresh; echo  # one line of JSON: what the box sent
  curl -s -X DELETE -H 'Authorization: Bearer {ADMIN_TOKEN}' http://{admin}/cache/{ACCOUNT}; echo  # one line of JSON: how many entries went
  curl -s -o /dev/null -w '%{{http_code}}\\n' {base}/id/999/recordings  # unknown agent: 404
  curl -s {base}/phone/123/recordings; echo  # bad type: 400, one line of JSON saying what is accepted
  curl -s -o /dev/null -D - http://{public}/mot/{ACCOUNT}/queues/2/calls/recordings | grep -i '^x-cache'  # a queue's recordings, cached like an agent's: MISS
  curl -s -o /dev/null -w '%{{http_code}} %{{size_download}} bytes\\n' 'http://{public}/mot/{ACCOUNT}/agents?state=any'  # one line: the agent directory
  curl -s http://{admin}/metrics | grep -e '^miralix_gateway_cache_hits_total' -e '^miralix_gateway_upstream_requests_total'  # counter lines

Or open http://{admin}/ in a browser: the status page.

Agents on the box: id 1, 103, 104, 105 (no recordings); e.g. derek.a@company.local,
sip:lp1@company.local, syncId f4fd9e5f-017d-4350-adf8-8dd811bc1a2e all name agent 103.
Press Ctrl-C to stop.
",
        box_url = demo.simulator.base_url(),
        ttl = humantime::format_duration(demo.config.cache.ttl),
        negative_ttl = humantime::format_duration(demo.config.cache.negative_ttl),
    )
}
