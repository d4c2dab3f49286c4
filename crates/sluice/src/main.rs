//! The `sluice` command: CLI definition and glue. Reusable logic lives in the library crates.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A streaming server for LLM agent applications"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the server (embedded store; the demo model when no provider is configured).
    Serve(sluice::config::ServeArgs),
    /// Stream one run to the terminal: reasoning dimmed, then the answer.
    Chat(sluice::chat::ChatArgs),
    /// Open many concurrent demo runs against a server and report latency, throughput and memory.
    Bench(sluice::bench::BenchArgs),
    /// Serve the upstream simulator: the four providers' streaming protocols with scripted output
    /// and faults, for tests and benchmarks (knobs in the model name; see sluice-providers' simulator.rs).
    Simulate {
        /// Address to listen on; port 0 picks a free port (printed).
        #[arg(long, default_value = "127.0.0.1:7421")]
        listen: std::net::SocketAddr,
    },
    /// For `sluice bench --providers`: an HTTP relay that only passes requests on to `--to`, the
    /// floor under what Sluice adds.
    #[command(hide = true)]
    BenchRelay {
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The upstream's base URL (the simulator's).
        #[arg(long)]
        to: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("sluice: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Chat(args) => sluice::chat::run(args).await,
            Command::Bench(args) => sluice::bench::run(args).await,
            Command::Simulate { listen } => simulate(listen).await,
            Command::BenchRelay { listen, to } => sluice::bench::relay(listen, &to).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sluice: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: sluice::config::ServeArgs) -> anyhow::Result<()> {
    let config = sluice::config::load(&args)?;
    let running = sluice::start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down: interrupting runs in flight, flushing the store");
    running.shutdown().await
}

async fn simulate(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "sluice simulator listening on http://{addr}");
    tokio::select! {
        res = sluice_providers::simulator::serve(listener) => res?,
        _ = shutdown_signal() => {}
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
