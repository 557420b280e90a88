//! `shrinker-bench`: whole-process benchmarks of the edge pair against the baseline a
//! user would otherwise run, with a userspace WAN shaper between the hops.
//!
//! - `pair`: migration-like streams through a plain relay pair and the edge pair.
//! - `cluster`: real QEMU migrations of a VM cluster: direct, edge pair, zstd tunnels.
//! - `encode`: guest RAM images through the encoder offline (WAN bytes by kind).
//! - `hash`: page hashing, one page at a time vs side by side.
//! - `relay`, `shaper`, `ztunnel`: the helper processes those start.

use clap::{Parser, Subcommand};

mod analyse;
mod chart;
mod cluster;
mod encode;
mod hash;
mod pair;
mod relay;
mod shaper;
mod ztunnel;

#[derive(Parser)]
#[command(
    name = "shrinker-bench",
    about = "Benchmarks for the Shrinker edge pair"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Streams through a relay pair and the edge pair, side by side.
    Pair(pair::PairArgs),
    /// A plain TCP relay hop.
    Relay(relay::RelayArgs),
    /// A userspace WAN emulator hop (rate limit + one-way delay).
    Shaper(shaper::ShaperArgs),
    /// Real QEMU cluster migrations: direct vs edge pair vs zstd tunnels, same link.
    Cluster(cluster::ClusterArgs),
    /// A zstd tunnel hop (compress or decompress side).
    Ztunnel(ztunnel::ZtunnelArgs),
    /// Offline: guest RAM images encoded as the sending edge would (WAN bytes by kind).
    Encode(encode::EncodeArgs),
    /// Page hashing speed: one page at a time vs side by side (as the edges hash).
    Hash(hash::HashArgs),
    /// What every new chunk costs before compression (delta sketch, word price), ns/B.
    Analyse(analyse::AnalyseArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shrinker-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // The blocking drivers run outside the async runtime.
    match cli.cmd {
        Cmd::Cluster(a) => return cluster::run(a),
        Cmd::Ztunnel(a) => return ztunnel::run(a),
        Cmd::Encode(a) => return encode::run(a),
        Cmd::Hash(a) => return hash::run(a),
        Cmd::Analyse(a) => return analyse::run(a),
        _ => {}
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Pair(a) => pair::run(a).await,
            Cmd::Relay(a) => relay::run(a).await,
            Cmd::Shaper(a) => shaper::run(a).await,
            Cmd::Cluster(_) | Cmd::Ztunnel(_) | Cmd::Encode(_) | Cmd::Hash(_) | Cmd::Analyse(_) => {
                unreachable!("handled above")
            }
        }
    })
}
