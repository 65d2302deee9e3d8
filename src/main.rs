//! The `miralix-gateway` binary: command line, telemetry, config, listeners, exit code.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use miralix_gateway::clock::SystemClock;
use miralix_gateway::config::{self, Config};
use miralix_gateway::telemetry::{self, LogFormat};
use miralix_gateway::{AppState, demo, server};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(
    name = "miralix-gateway",
    version,
    about = "Caching reverse proxy for the Miralix OfficeTeam recordings API"
)]
struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway with a configuration file.
    Serve {
        /// TOML configuration file (see config/example.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit: 0 when it is usable, 1 with every problem.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a simulated Miralix box and a gateway in front of it, on loopback.
    Demo {
        /// Address of the gateway's public listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Address of the admin listener (/metrics, /healthz, /readyz).
        #[arg(long, default_value = "127.0.0.1:9091")]
        admin_listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::CheckConfig { config } = &cli.command {
        return check_config(config);
    }
    if let Err(error) = telemetry::init(cli.log_format) {
        eprintln!("miralix-gateway: cannot set up logging: {error}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("miralix-gateway: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => serve(&config).await,
            Command::Demo {
                listen,
                admin_listen,
            } => run_demo(listen, admin_listen).await,
            Command::CheckConfig { .. } => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("miralix-gateway: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(config) => config,
        Err(error) => {
            for problem in error.problems() {
                eprintln!("{problem}");
            }
            eprintln!("{}: configuration is invalid", path.display());
            return ExitCode::FAILURE;
        }
    };
    // Building the upstream clients checks what loading cannot, such as usable trust anchors.
    if let Err(error) = AppState::new(&config, Arc::new(SystemClock)) {
        eprintln!("{}: {error}", path.display());
        eprintln!("{}: configuration is invalid", path.display());
        return ExitCode::FAILURE;
    }
    let names: Vec<&str> = config.accounts.keys().map(String::as_str).collect();
    println!(
        "{}: ok: {} account(s) ({}), listen {}, admin {}, ttl {}, negative_ttl {}, max_bytes {}",
        path.display(),
        names.len(),
        names.join(", "),
        config.server.listen,
        config.admin.listen,
        humantime::format_duration(config.cache.ttl),
        humantime::format_duration(config.cache.negative_ttl),
        config.cache.max_bytes,
    );
    ExitCode::SUCCESS
}

async fn serve(path: &std::path::Path) -> Result<()> {
    let config = config::load(path)?;
    run_gateway(&config, |_, _| {}).await
}

async fn run_demo(listen: SocketAddr, admin_listen: SocketAddr) -> Result<()> {
    let demo = demo::start(listen, admin_listen).await?;
    run_gateway(&demo.config, |public, admin| {
        println!("{}", demo::instructions(&demo, public, admin));
    })
    .await
}

/// Bind both listeners, tell `on_bound` where they are, and serve until a stop signal.
async fn run_gateway(config: &Config, on_bound: impl FnOnce(SocketAddr, SocketAddr)) -> Result<()> {
    let state = Arc::new(AppState::new(config, Arc::new(SystemClock))?);
    let public = bind(config.server.listen, "server.listen").await?;
    let admin = bind(config.admin.listen, "admin.listen").await?;
    on_bound(public.local_addr()?, admin.local_addr()?);
    server::run(public, admin, state, stop_signal()).await;
    Ok(())
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({key})"))
}

/// Completes on Ctrl-C or SIGTERM.
async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the gateway");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
