//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// The hint appended to errors about missing or unusable certificate files.
const CREATE_HINT: &str = "create one with `shrinker certs --out DIR NAME`";

/// Errors from certificate generation and TLS configuration.
///
/// The messages are meant for operators: they name the file involved and, where
/// there is one, what to do about it. Each message already contains the text
/// of the underlying error (I/O, rustls, rcgen), so the underlying error is not
/// repeated through [`std::error::Error::source`]; it is available in the
/// variant's fields instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An edge name passed to [`generate_certs`](crate::generate_certs) is not
    /// acceptable.
    #[error(
        "invalid edge name {name:?}: {reason} (allowed: 1-64 characters from A-Z a-z 0-9 . _ -, \
         starting and ending with a letter or digit, other than `ca`)"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A file could not be read.
    #[error("cannot read {what} {}: {error} ({CREATE_HINT})", path.display())]
    Read {
        /// What the file was supposed to contain, e.g. "TLS certificate".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: io::Error,
    },

    /// A file is not valid PEM.
    #[error("cannot parse {what} {} as PEM: {error}", path.display())]
    Pem {
        /// What the file was supposed to contain, e.g. "TLS certificate".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The parse error.
        error: io::Error,
    },

    /// A certificate file contains no certificate.
    #[error(
        "no certificate found in {} (expected a PEM `BEGIN CERTIFICATE` block; {CREATE_HINT})",
        path.display()
    )]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },

    /// A key file contains no private key.
    #[error(
        "no private key found in {} (expected a PEM `BEGIN PRIVATE KEY` block; {CREATE_HINT})",
        path.display()
    )]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },

    /// The CA file contains a certificate that cannot be a trust anchor.
    #[error("CA certificate in {} cannot be used as a trust anchor: {error}", path.display())]
    InvalidCa {
        /// The CA file.
        path: PathBuf,
        /// Why.
        error: rustls::Error,
    },

    /// A certificate and private key do not fit together (or are unusable).
    #[error(
        "cannot use certificate {} with private key {}: {error} (the key must be the one \
         generated together with the certificate)",
        cert.display(),
        key.display()
    )]
    CertKey {
        /// The certificate file.
        cert: PathBuf,
        /// The private key file.
        key: PathBuf,
        /// Why.
        error: rustls::Error,
    },

    /// A certificate verifier could not be built from the CA file.
    #[error("cannot verify peers against CA {}: {error}", path.display())]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// Why.
        error: rustls::server::VerifierBuilderError,
    },

    /// Building a rustls configuration failed.
    #[error("TLS configuration error: {0}")]
    Tls(rustls::Error),

    /// The output directory could not be created.
    #[error("cannot create certificate directory {}: {error}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        error: io::Error,
    },

    /// A generated file could not be written.
    #[error("cannot write {}: {error}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: io::Error,
    },

    /// An edge certificate or key would overwrite an existing file.
    #[error(
        "{} already exists; refusing to overwrite it (delete it first to re-issue that edge, \
         or pick another name)",
        path.display()
    )]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },

    /// Only one of `ca.crt` and `ca.key` exists in the output directory.
    #[error(
        "found {} but not {}: issuing edge certificates needs both; restore the missing file, \
         or remove {} to start a new CA (edges issued by the old CA will then no longer be \
         trusted)",
        present.display(),
        missing.display(),
        present.display()
    )]
    IncompleteCa {
        /// The CA file that exists.
        present: PathBuf,
        /// The CA file that is missing.
        missing: PathBuf,
    },

    /// The existing CA certificate or key could not be loaded for reuse.
    #[error("cannot load the existing CA from {}: {error}", path.display())]
    LoadCa {
        /// The file that could not be loaded.
        path: PathBuf,
        /// Why.
        error: rcgen::Error,
    },

    /// A certificate issued with the existing CA key does not verify against
    /// the existing CA certificate.
    #[error(
        "a certificate signed with {} does not verify against {}: {error} (does the key belong \
         to the certificate, and is the CA still valid?)",
        ca_key.display(),
        ca_cert.display()
    )]
    CaMismatch {
        /// The CA certificate file.
        ca_cert: PathBuf,
        /// The CA key file.
        ca_key: PathBuf,
        /// The verification error.
        error: rustls::Error,
    },

    /// Certificate or key generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(rcgen::Error),
}
