//! Mutual TLS 1.3 for the tunnel between two Shrinker edge proxies.
//!
//! # Trust policy
//!
//! Every deployment has its own **private certificate authority** (CA). It is
//! created by [`generate_certs`] (`ca.crt` + `ca.key`), which also issues one
//! certificate per edge (`NAME.crt` + `NAME.key`). Running [`generate_certs`]
//! again on the same directory reuses the existing CA, so edges can be added
//! later without re-issuing the old ones.
//!
//! The tunnel is always **mutually authenticated TLS 1.3** with ALPN
//! [`ALPN`] (`shrinker/1`):
//!
//! * the accepting edge ([`server_config`]) requires a client certificate and
//!   verifies that it chains to the deployment CA;
//! * the connecting edge ([`client_config`]) presents its own certificate and
//!   verifies that the accepting edge's certificate chains to the same CA.
//!
//! **The server name is deliberately not checked.** Edges are usually
//! addressed by IP address, by addresses that change (NAT, DHCP, failover), or
//! by names that nobody put into the certificate. Under this policy the
//! deployment CA is the *only* trust root and it issues certificates to edges
//! and to nothing else, so "signed by our CA" already means "is one of our
//! edges". Everything else is still enforced: the chain must lead to the
//! deployment CA, certificates must be within their validity period and carry
//! the right extended key usage, and the handshake signature must verify.
//! If you need to know *which* edge is on the other side, use
//! [`peer_identity`] on the peer certificates after the handshake.
//!
//! Consequences of this policy:
//!
//! * protect `ca.key`: whoever holds it can mint edges. It is written with
//!   mode `0600`; it is only needed to issue new edge certificates, not at run
//!   time, so it should not be copied to the edges;
//! * never use a CA that also signs other things (for example a company-wide
//!   CA or a public CA) as the deployment CA;
//! * one edge's key allows impersonating any edge of the same deployment.
//!
//! The crypto provider (`ring`) is passed explicitly to every rustls builder,
//! so no process-wide default provider has to be installed.
#![warn(missing_docs)]

mod config;
mod der;
mod error;
mod generate;

use std::path::{Path, PathBuf};

pub use config::{client_config, server_config, server_name_for, ALPN, FALLBACK_SERVER_NAME};
pub use error::Error;
pub use generate::{generate_certs, EdgeCert, GeneratedCerts, CA_CERT_FILE, CA_KEY_FILE};

/// The files one edge needs to take part in the tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsFiles {
    /// PEM file with the deployment CA certificate(s) that peers must chain to
    /// (`ca.crt`). Several certificates may be concatenated, e.g. while
    /// rotating the CA.
    pub ca: PathBuf,
    /// PEM file with this edge's certificate chain, leaf first (`NAME.crt`).
    pub cert: PathBuf,
    /// PEM file with this edge's private key (`NAME.key`).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files [`generate_certs`] writes for edge `name` into `dir`:
    /// `dir/ca.crt`, `dir/NAME.crt` and `dir/NAME.key`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

/// The identity of a peer edge: the common name (CN) of its leaf certificate,
/// which [`generate_certs`] sets to the edge name.
///
/// Pass the peer certificates of an established connection
/// (`peer_certificates()` of a rustls connection); the first one is the leaf.
/// Returns `None` if there is no certificate, or its subject has no common
/// name in a supported string encoding.
///
/// This only *reads* the name; it does not verify anything. Use it on
/// certificates that rustls has already verified during the handshake.
pub fn peer_identity(certs: &[rustls::pki_types::CertificateDer<'_>]) -> Option<String> {
    der::common_name(certs.first()?.as_ref())
}
