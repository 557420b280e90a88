//! `shrinker-bench`: whole-process benchmarks of the edge pair against the baseline a
//! user would otherwise run, with a userspace WAN shaper between the hops.
//!
//! - `pair`: migration-like streams through a plain relay pair and the edge pair.
//! - `relay`, `shaper`: the helper processes `pair` starts (usable on their own).

use clap::{Parser, Subcommand};

mod pair;
mod relay;
mod shaper;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Pair(a) => pair::run(a).await,
            Cmd::Relay(a) => relay::run(a).await,
            Cmd::Shaper(a) => shaper::run(a).await,
        }
    })
}
