//! The Shrinker edge: accepts hypervisor connections on forward rules and peer edges
//! on the tunnel listener, and relays each connection byte-exact while sending
//! repeated content as references.
//!
//! # Layout
//! - [`config`]: flags + TOML file → validated [`config::EdgeConfig`].
//! - [`edge`]: listeners, handshakes, shared store and peer registry ([`Edge`]).
//! - `conn`: the per-connection driver (uplink, downlink, writer).
//! - [`stats`]: counters and the JSON snapshot.
//! - [`io`]: the WAN byte-counting socket wrapper.
#![warn(missing_docs, unreachable_pub)]

pub mod allocator;
pub mod allow;
mod budget;
pub mod config;
mod conn;
mod cpu_clock;
mod delivery;
pub mod demo;
pub mod edge;
pub mod error;
mod governor;
pub mod inspect;
pub mod io;
pub mod metrics;
mod order;
mod read_ahead;
mod send_buffer;
pub mod size;
mod spare;
pub mod stats;

pub use edge::Edge;
pub use error::EdgeError;
