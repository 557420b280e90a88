//! The `shrinker` command: CLI parsing, logging, then the library. Nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use proxy::allocator::Prefault;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "shrinker",
    version,
    about = "WAN optimizer for live migration of virtual clusters: an edge proxy pair that sends repeated pages and blocks as hash references"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an edge: accept peer edges and/or forward local connections through a peer.
    Edge(Box<proxy::config::EdgeArgs>),
    /// Create a private CA (or reuse DIR/ca.crt + ca.key) and a certificate per edge.
    Certs {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Edge names (one certificate each).
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Demo: a migration-like cluster through two local edges, savings printed.
    Demo(proxy::demo::DemoArgs),
    /// Analyse captured migration streams: what they hold, what the pair would send.
    Inspect(proxy::inspect::InspectArgs),
}

fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Edges (the demo runs two) copy every chunk they keep: see `proxy::allocator`.
    // An edge's configuration is resolved first: how much heap it touches before
    // serving sets a tunable.
    let mut edge = None;
    match &cli.cmd {
        Cmd::Edge(args) => match args.resolve() {
            Ok(config) => {
                proxy::allocator::reexec_with_edge_tunables(config.prefault_bytes);
                edge = Some(config);
            }
            Err(e) => {
                eprintln!("shrinker: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        Cmd::Demo(_) => proxy::allocator::reexec_with_edge_tunables(0),
        _ => {}
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shrinker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = match cli.cmd {
        Cmd::Edge(_) => {
            init_logging("info");
            let config = edge.expect("an edge's configuration is resolved above");
            let prefault_bytes = config.prefault_bytes;
            rt.block_on(async move {
                // Certificates and listeners first: a mistake there is reported at once.
                let edge = proxy::Edge::bind(config).await?;
                // On this (the main) thread, in the heap the stores are carved from;
                // connections wait in the listeners' backlog meanwhile.
                match proxy::allocator::prefault_heap(prefault_bytes) {
                    p @ (Prefault::Touched(..) | Prefault::Off) => tracing::info!("{p}"),
                    p => tracing::warn!("{p}"),
                }
                edge.run(shutdown_signal()).await?;
                Ok(())
            })
        }
        Cmd::Certs { out, names } => match tls::generate_certs(&out, &names) {
            Ok(g) => {
                println!(
                    "{} {}",
                    if g.ca_reused {
                        "reused CA"
                    } else {
                        "created CA"
                    },
                    g.ca_cert.display()
                );
                for e in &g.edges {
                    println!(
                        "edge {}: --tls-ca {} --tls-cert {} --tls-key {}",
                        e.name,
                        g.ca_cert.display(),
                        e.cert.display(),
                        e.key.display()
                    );
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        Cmd::Inspect(args) => {
            init_logging("warn");
            proxy::inspect::run(args)
        }
        Cmd::Demo(args) => {
            init_logging("warn");
            rt.block_on(proxy::demo::run(args))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shrinker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT: graceful shutdown.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
