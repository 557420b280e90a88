//! Private-CA and edge certificate generation.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, DnsName, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::config::{load_certs, provider, AnyNameServerVerifier};
use crate::{Error, TlsFiles};

/// File name of the deployment CA certificate inside the certificate directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the deployment CA private key inside the certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// Maximum edge name length (the X.509 upper bound for a common name).
const MAX_NAME_LEN: usize = 64;
/// Organization put into every generated certificate's subject.
const ORGANIZATION: &str = "Shrinker";
/// Validity of a new CA certificate, in days (about 20 years).
const CA_VALIDITY_DAYS: i64 = 7305;
/// Validity of an edge certificate, in days (about 10 years).
const EDGE_VALIDITY_DAYS: i64 = 3653;
/// Certificates start being valid this many days before today, so that peers
/// whose clocks lag behind accept freshly issued certificates.
const BACKDATE_DAYS: i64 = 1;

/// One edge certificate written by [`generate_certs`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EdgeCert {
    /// The edge name (certificate common name).
    pub name: String,
    /// The certificate, `DIR/NAME.crt`.
    pub cert: PathBuf,
    /// The private key, `DIR/NAME.key` (mode `0600`).
    pub key: PathBuf,
}

/// What [`generate_certs`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GeneratedCerts {
    /// The CA certificate, `DIR/ca.crt`.
    pub ca_cert: PathBuf,
    /// The CA private key, `DIR/ca.key` (mode `0600`).
    pub ca_key: PathBuf,
    /// `true` if an existing CA was reused (then `ca_cert` and `ca_key` were
    /// left untouched), `false` if a new CA was created and written.
    pub ca_reused: bool,
    /// The edge certificates, in the order the names were given.
    pub edges: Vec<EdgeCert>,
}

impl GeneratedCerts {
    /// The [`TlsFiles`] for the edge called `name`, if it was generated.
    pub fn tls_files(&self, name: &str) -> Option<TlsFiles> {
        self.edges
            .iter()
            .find(|edge| edge.name == name)
            .map(|edge| TlsFiles {
                ca: self.ca_cert.clone(),
                cert: edge.cert.clone(),
                key: edge.key.clone(),
            })
    }
}

/// Creates (or reuses) the deployment CA in `out_dir` and issues one
/// certificate per edge name.
///
/// * `out_dir` is created if needed.
/// * If `out_dir/ca.crt` and `out_dir/ca.key` both exist, that CA is reused,
///   so edges issued earlier keep working with the new ones. Otherwise a new
///   CA (ECDSA P-256, valid for about 20 years) is written to them.
/// * For each `NAME`, `out_dir/NAME.crt` and `out_dir/NAME.key` are written:
///   an ECDSA P-256 key and a certificate valid for about 10 years with
///   subject CN = `NAME`, a subject alternative name (IP address if `NAME`
///   parses as one, otherwise DNS name if `NAME` is a valid DNS name), and
///   extended key usages server auth + client auth, so the same files serve
///   both ends of the tunnel.
/// * Private keys are created with mode `0600` (on Unix).
/// * `names` may be empty, which only creates the CA, or checks that the
///   existing one can still issue valid certificates.
///
/// The call is all-or-nothing: every name is validated, every file checked,
/// and every certificate issued and verified against the CA before anything
/// is written; if writing fails, files written by this call are removed again.
///
/// # Errors
///
/// * [`Error::InvalidName`] if a name is empty, longer than 64 characters,
///   contains characters other than `A-Z a-z 0-9 . _ -`, does not start and
///   end with a letter or digit, is `ca` (reserved for the CA files), or is
///   given twice;
/// * [`Error::AlreadyExists`] if `NAME.crt` or `NAME.key` already exists
///   (existing edges are never overwritten);
/// * [`Error::IncompleteCa`] if only one of `ca.crt` and `ca.key` exists;
/// * [`Error::Read`], [`Error::NoCertificate`], [`Error::LoadCa`] or
///   [`Error::CaMismatch`] if the existing CA cannot be read, parsed, or does
///   not verify the certificates it issues (wrong key, expired CA);
/// * [`Error::CreateDir`] or [`Error::Write`] on I/O failures;
/// * [`Error::Generate`] if key or certificate generation fails.
pub fn generate_certs(out_dir: &Path, names: &[String]) -> Result<GeneratedCerts, Error> {
    for (i, name) in names.iter().enumerate() {
        validate_name(name)?;
        if names[..i].iter().any(|n| n.eq_ignore_ascii_case(name)) {
            return Err(Error::InvalidName {
                name: name.clone(),
                reason: "is given more than once",
            });
        }
    }

    fs::create_dir_all(out_dir).map_err(|error| Error::CreateDir {
        path: out_dir.to_owned(),
        error,
    })?;

    let edges: Vec<EdgeCert> = names
        .iter()
        .map(|name| {
            let files = TlsFiles::in_dir(out_dir, name);
            EdgeCert {
                name: name.clone(),
                cert: files.cert,
                key: files.key,
            }
        })
        .collect();
    for edge in &edges {
        for path in [&edge.cert, &edge.key] {
            if exists(path) {
                return Err(Error::AlreadyExists { path: path.clone() });
            }
        }
    }

    let ca_cert = out_dir.join(CA_CERT_FILE);
    let ca_key = out_dir.join(CA_KEY_FILE);
    let (ca, ca_reused) = match (exists(&ca_cert), exists(&ca_key)) {
        (true, true) => (Ca::load(&ca_cert, &ca_key)?, true),
        (false, false) => (Ca::create()?, false),
        (true, false) => {
            return Err(Error::IncompleteCa {
                present: ca_cert,
                missing: ca_key,
            })
        }
        (false, true) => {
            return Err(Error::IncompleteCa {
                present: ca_key,
                missing: ca_cert,
            })
        }
    };

    // Issue everything in memory and check it against the CA before writing.
    let check = CaCheck::new(&ca.cert_der, &ca_cert)?;
    let mismatch = |error| Error::CaMismatch {
        ca_cert: ca_cert.clone(),
        ca_key: ca_key.clone(),
        error,
    };
    let mut issued = Vec::with_capacity(names.len());
    for name in names {
        let edge = issue_edge(&ca.issuer, name)?;
        check.verify(&edge.cert_der).map_err(mismatch)?;
        issued.push(edge);
    }
    if names.is_empty() {
        // Nothing to issue: still prove that the CA is usable.
        let probe = issue_edge(&ca.issuer, "probe")?;
        check.verify(&probe.cert_der).map_err(mismatch)?;
    }

    let mut writer = Writer::default();
    let result = (|| {
        if !ca_reused {
            writer.write(&ca_key, ca.issuer.key().serialize_pem().as_bytes(), true)?;
            writer.write(&ca_cert, ca.cert_pem.as_bytes(), false)?;
        }
        for (files, edge) in edges.iter().zip(&issued) {
            writer.write(&files.key, edge.key_pem.as_bytes(), true)?;
            writer.write(&files.cert, edge.cert_pem.as_bytes(), false)?;
        }
        Ok(())
    })();
    if let Err(error) = result {
        writer.roll_back();
        return Err(error);
    }

    Ok(GeneratedCerts {
        ca_cert,
        ca_key,
        ca_reused,
        edges,
    })
}

/// Checks an edge name; see [`generate_certs`] for the rules.
fn validate_name(name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("is longer than 64 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("contains a character other than A-Z a-z 0-9 . _ -")
    } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        Some("must start and end with a letter or digit")
    } else if name.eq_ignore_ascii_case("ca") {
        Some("is reserved for the CA files (ca.crt, ca.key)")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Whether anything (including a dangling symlink) is at `path`.
fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// The deployment CA, ready to sign.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl Ca {
    /// A fresh CA with a new key.
    fn create() -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(Error::Generate)?;
        let mut params = CertificateParams::default();
        // A per-CA suffix (derived from the key) tells deployments apart.
        let id: String = params
            .key_identifier(&key)
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect();
        params.distinguished_name = distinguished_name(&format!("Shrinker deployment CA {id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key).map_err(Error::Generate)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The existing CA in `cert_path` (first certificate) and `key_path`.
    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, Error> {
        let cert_der = load_certs(cert_path, "CA certificate")?.swap_remove(0);
        let key_pem = fs::read_to_string(key_path).map_err(|error| Error::Read {
            what: "CA private key",
            path: key_path.to_owned(),
            error,
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|error| Error::LoadCa {
            path: key_path.to_owned(),
            error,
        })?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|error| Error::LoadCa {
            path: cert_path.to_owned(),
            error,
        })?;
        Ok(Self {
            issuer,
            cert_der,
            // Not written back when reusing.
            cert_pem: String::new(),
        })
    }
}

/// Verifies issued certificates the way peers will: as a client certificate
/// and as a server certificate, against the CA alone.
struct CaCheck {
    client: Arc<dyn ClientCertVerifier>,
    server: AnyNameServerVerifier,
}

impl CaCheck {
    fn new(ca: &CertificateDer<'static>, ca_path: &Path) -> Result<Self, Error> {
        let roots = || {
            let mut roots = RootCertStore::empty();
            roots.add(ca.clone()).map(|()| roots)
        };
        let invalid_ca = |error| Error::InvalidCa {
            path: ca_path.to_owned(),
            error,
        };
        let verifier_error = |error| Error::Verifier {
            path: ca_path.to_owned(),
            error,
        };
        let client = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots().map_err(invalid_ca)?),
            provider(),
        )
        .build()
        .map_err(verifier_error)?;
        let server = AnyNameServerVerifier::new(roots().map_err(invalid_ca)?, provider())
            .map_err(verifier_error)?;
        Ok(Self { client, server })
    }

    fn verify(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let now = UnixTime::now();
        self.client.verify_client_cert(cert, &[], now)?;
        let name = ServerName::try_from(crate::FALLBACK_SERVER_NAME)
            .expect("fallback server name is a valid DNS name");
        self.server.verify_server_cert(cert, &[], &name, &[], now)?;
        Ok(())
    }
}

/// An issued edge certificate and its key, not yet written.
struct IssuedEdge {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

fn issue_edge(issuer: &Issuer<'_, KeyPair>, name: &str) -> Result<IssuedEdge, Error> {
    let key = KeyPair::generate().map_err(Error::Generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(name);
    if let Ok(ip) = name.parse::<IpAddr>() {
        params.subject_alt_names.push(SanType::IpAddress(ip));
    } else if DnsName::try_from(name).is_ok() {
        let dns = name.try_into().map_err(Error::Generate)?;
        params.subject_alt_names.push(SanType::DnsName(dns));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, EDGE_VALIDITY_DAYS);
    let cert = params.signed_by(&key, issuer).map_err(Error::Generate)?;
    Ok(IssuedEdge {
        cert_der: cert.der().clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Sets validity from `BACKDATE_DAYS` before today until `days` after today.
fn set_validity(params: &mut CertificateParams, days: i64) {
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs() / 86_400).unwrap_or(0));
    let date = |day| {
        let (y, m, d) = civil_from_days(day);
        rcgen::date_time_ymd(y, m, d)
    };
    params.not_before = date(today - BACKDATE_DAYS);
    params.not_after = date(today + days);
}

/// The proleptic Gregorian (year, month, day) of `days` since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Day and month are in range by construction; the year fits for any
    // realistic clock.
    (
        i32::try_from(year).unwrap_or(i32::MAX),
        month as u8,
        day as u8,
    )
}

/// Writes new files and can remove them again.
#[derive(Default)]
struct Writer {
    written: Vec<PathBuf>,
}

impl Writer {
    /// Creates `path` (which must not exist) with `contents`; `private` files
    /// get mode `0600` on Unix.
    fn write(&mut self, path: &Path, contents: &[u8], private: bool) -> Result<(), Error> {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        let write_error = |error| Error::Write {
            path: path.to_owned(),
            error,
        };
        let mut file = options.open(path).map_err(|error: std::io::Error| {
            if error.kind() == std::io::ErrorKind::AlreadyExists {
                Error::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                write_error(error)
            }
        })?;
        self.written.push(path.to_owned());
        file.write_all(contents).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        Ok(())
    }

    /// Best-effort removal of everything written so far.
    fn roll_back(self) {
        for path in self.written.iter().rev() {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(19_783), (2024, 3, 1));
        assert_eq!(civil_from_days(30_000), (2052, 2, 20));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn name_rules() {
        for ok in [
            "a",
            "edge-1",
            "EDGE_2",
            "10.0.0.1",
            "edge.example.com",
            "x9",
            "cab",
        ] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "a/b",
            "a\\b",
            "../x",
            "..",
            ".",
            ".hidden",
            "-x",
            "x-",
            "a b",
            "a:b",
            "::1",
            "ä",
            "ca",
            "CA",
            long.as_str(),
        ] {
            let err = validate_name(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        validate_name(&"a".repeat(64)).unwrap();
    }
}
