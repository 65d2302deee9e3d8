//! The tracing subscriber: the only process-wide state the gateway sets.
//!
//! Logs go to stderr as text (colours only on a terminal) or as one JSON object per line.
//! `RUST_LOG` selects levels and targets; the default is `info`. The access log is the target
//! `miralix_gateway::access`, so `RUST_LOG=info,miralix_gateway::access=off` silences it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub use crate::config::LogFormat;

/// Install the global subscriber. Fails only if one is already installed.
pub fn init(format: LogFormat) -> Result<(), tracing_subscriber::util::TryInitError> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    }
}
