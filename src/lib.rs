//! miralix-gateway: a caching reverse proxy for the Miralix OfficeTeam recordings API.
//!
//! Internal apps call the gateway with the box's own routes (an agent's recordings,
//! `GET /mot/{account}/agents/{identificationType}/{identification}/recordings`, a queue's, the
//! agent directory, a recording's audio, and the reads an account's passthrough table allows)
//! and get the box's answer from a cache. The gateway normalizes the agent identifier so every
//! spelling of one agent shares one cache entry, coalesces concurrent misses into one upstream
//! request, and adds the account's shared secret and the box's TLS trust on the way upstream.
//!
//! # Layout
//!
//! - [`config`]: raw TOML + environment, validated once into typed [`config::Config`].
//! - [`auth`] and [`limit`]: API keys, client certificates and the admin token per account; the
//!   per-client-address rate limit.
//! - [`route`] and [`identity`]: parse the request target (an agent, a queue, the directory,
//!   audio; [`route::passthrough`] for the allowlisted reads) and normalize the identification.
//! - [`cache`] (+ [`cache::policy`], [`cache::conditional`], [`cache::encoding`]): stored
//!   answers, coalescing, stale serving, error backoff; pure freshness rules; entity tags;
//!   gzip made once at store time. [`cache::tier`]: the second tier behind memory, shared
//!   ([`cache::shared`], Redis or Valkey: one box request per key for a fleet) or on disk
//!   (redb: restarts start warm).
//! - [`audio`]: recordings' audio on local disk (`[cache.audio]`): one download per recording
//!   shared by its waiting clients, whole files only, `Range` and conditionals from the file
//!   ([`audio::range`]), LRU eviction by bytes.
//! - [`recordings`]: a list parsed into its elements (id + exact bytes) for `fromQueueCallId`
//!   selection and delta merges.
//! - [`clock`]: the injectable time source every freshness decision reads.
//! - [`upstream`] (+ [`upstream::trust`], [`upstream::protect`]): one rustls reqwest client per
//!   account; certificate trust; concurrency cap and circuit breaker.
//! - [`gateway`]: the request path, one phase per file (`admit`, `list`, `fetch`, `audio`,
//!   `respond`, `admin`, `status` for the status page and cache listing, `trace` for request
//!   ids) around [`gateway::handle`], and [`gateway::AppState`] with the
//!   reloadable [`gateway::Generation`]; [`error`]: errors to statuses.
//! - [`server`]: accept loops, timeouts, graceful shutdown; [`tls`]: TLS termination.
//! - [`systemd`]: `sd_notify` readiness, reload and stop messages, and the watchdog.
//! - [`metrics`], [`telemetry`]: Prometheus exposition; the tracing subscriber (with the audit
//!   log's own file) and the access and audit log targets.
//! - [`control`]: the `cache list|purge|refresh` subcommand, a client of the admin API.
//! - [`simulator`] and [`demo`]: a simulated box for the demo and the tests.
//! - [`crypto`]: SHA-256, hex, constant-time digest comparison and the rustls provider; it
//!   imports nothing from the crate.
//!
//! The modules form a graph without cycles, and the typed configuration is a leaf that names
//! only [`crypto`] and [`identity`] (`tests/integration/structure.rs` fails otherwise, and on a
//! source file over about 700 lines of code): the access rule is configuration data that
//! [`auth`] applies, TLS configurations are built from the configuration by [`tls`] and
//! [`upstream::trust`], never by it, the log targets belong to [`telemetry`] and the list-fetch
//! kinds to [`upstream`].
//!
//! # Public surface
//!
//! `main.rs` and the integration tests need only what is `pub` here: [`config`] (load and
//! check), [`AppState`] and [`run`] with [`server::Listeners`], [`clock`], [`telemetry`],
//! [`systemd`], [`crypto`], [`control`], and the [`simulator`] and [`demo`] the tests and the demo run
//! against. Everything else is `pub(crate)`: the cache, the upstream client, routing and
//! authorization can change shape without breaking a caller outside the crate.
//!
//! # Request flow
//!
//! ```text
//! TcpListener ─► server::run ─► gateway::handle ─► admit: limit (429), Host and target (400)
//!   (TLS, client certificate)       │  ─► route::parse ─► identity::normalize ─► auth::check
//!                                   │
//!                                   ├─► cache::ResponseCache::get_or_fetch ─► hit: stored Bytes
//!                                   │        │  (fromQueueCallId: selected from the full list;
//!                                   │        │  a memory miss looks in the second tier first)
//!                                   │        └─ miss: one spawned fetch per key (a delta when a
//!                                   │           stored list can be extended), shared by every
//!                                   │           concurrent waiter (and, through a lease in
//!                                   │           Redis, by the fleet); its waiters answered with
//!                                   │           the checked bytes first, then gzipped and
//!                                   │           parsed once, stored by policy, written through
//!                                   │           to the second tier
//!                                   ├─► audio: audio::AudioStore (one download, served from
//!                                   │   disk), or UpstreamClient::audio streamed, never stored
//!                                   └─► response headers (X-Cache, Cache-Status, Age,
//!                                       Cache-Control) + one access-log event + metrics
//! ```

#![forbid(unsafe_code)]
// These docs are for the people changing the crate (`cargo doc --document-private-items`), so
// they link to the `pub(crate)` modules they describe.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod audio;
pub(crate) mod auth;
pub(crate) mod cache;
pub mod clock;
pub mod config;
pub mod control;
pub mod crypto;
pub mod demo;
pub(crate) mod error;
pub mod gateway;
pub(crate) mod identity;
pub(crate) mod limit;
pub(crate) mod metrics;
pub(crate) mod recordings;
pub(crate) mod route;
pub mod server;
pub mod simulator;
pub mod systemd;
pub mod telemetry;
pub(crate) mod tls;
pub(crate) mod upstream;

pub use gateway::AppState;
pub use server::run;

/// The parsers `fuzz/` drives, reachable from outside the crate without making their modules
/// public: not an interface for anything else.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::identity::{IdType, MAX_IDENTIFICATION_BYTES, forbidden};
    pub use crate::route::{MAX_PATH_BYTES, Route, Subject, parse, parse_cache_target};
}
