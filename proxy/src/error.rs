//! Errors of the edge as a whole (per-connection failures are logged and counted, not
//! returned: one connection's error never stops the edge).

use std::net::SocketAddr;

/// Why an edge cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// A listener cannot be bound.
    // The io error is the source, printed after the message by `{:#}` (not in it twice).
    #[error("cannot listen on {addr} ({what}; is another process using it?)")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A transparent listener cannot be set up (IP_TRANSPARENT needs CAP_NET_ADMIN).
    #[error("cannot make {addr} a transparent listener (intercepting with TPROXY needs CAP_NET_ADMIN: run the edge as root, grant it with `setcap cap_net_admin+ep`, or start its container with --cap-add NET_ADMIN)")]
    Transparent {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TLS material is missing or invalid.
    #[error(transparent)]
    Tls(#[from] tls::Error),
    /// Other I/O.
    #[error("{0}")]
    Io(std::io::Error),
}
