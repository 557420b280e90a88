//! rustls client and server configurations for the tunnel.

use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::{Error, TlsFiles};

/// The ALPN protocol identifier of the Shrinker tunnel, offered by clients and
/// selected by servers built with this crate.
pub const ALPN: &[u8] = b"shrinker/1";

/// The server name [`server_name_for`] falls back to when a host string is
/// neither an IP address nor a valid DNS name.
pub const FALLBACK_SERVER_NAME: &str = "shrinker-edge";

/// The crypto provider used everywhere in this crate: rustls' `ring` provider,
/// passed explicitly so no process-wide default is needed.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the configuration for the accepting side of the tunnel.
///
/// The server speaks TLS 1.3 only, presents `files.cert` / `files.key`,
/// **requires** a client certificate that chains to the CA in `files.ca`, and
/// selects the ALPN protocol [`ALPN`] (a client offering only other protocols
/// is refused; a client offering none is accepted).
///
/// # Errors
///
/// Returns an error naming the offending file if any of the three files cannot
/// be read or contains no usable certificate / key, if the CA certificate
/// cannot be a trust anchor, or if the key does not belong to the certificate.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let roots = load_roots(&files.ca)?;
    let chain = load_certs(&files.cert, "TLS certificate")?;
    let key = load_key(&files.key)?;

    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|error| Error::Verifier {
            path: files.ca.clone(),
            error,
        })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|error| Error::CertKey {
            cert: files.cert.clone(),
            key: files.key.clone(),
            error,
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Builds the configuration for the connecting side of the tunnel.
///
/// The client speaks TLS 1.3 only, offers ALPN [`ALPN`], presents
/// `files.cert` / `files.key` as its client certificate, and accepts a server
/// certificate if it chains to the CA in `files.ca` **whatever names it
/// carries** (see the [crate documentation](crate) for why). Every other check
/// (issuer, validity period, key usage, signatures) is done by rustls' WebPKI
/// verifier as usual.
///
/// # Errors
///
/// Returns an error naming the offending file if any of the three files cannot
/// be read or contains no usable certificate / key, if the CA certificate
/// cannot be a trust anchor, or if the key does not belong to the certificate.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let roots = load_roots(&files.ca)?;
    let chain = load_certs(&files.cert, "TLS certificate")?;
    let key = load_key(&files.key)?;

    let verifier =
        AnyNameServerVerifier::new(roots, provider.clone()).map_err(|error| Error::Verifier {
            path: files.ca.clone(),
            error,
        })?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .map_err(|error| Error::CertKey {
            cert: files.cert.clone(),
            key: files.key.clone(),
            error,
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// A [`ServerName`] to connect to `host` with.
///
/// `host` may be an IP address (IPv6 optionally in brackets, as in URLs) or a
/// DNS name; anything else yields the DNS name [`FALLBACK_SERVER_NAME`]. With
/// [`client_config`] the name is not checked against the certificate, so it
/// only matters for SNI, which rustls sends for DNS names only.
pub fn server_name_for(addr_host: &str) -> ServerName<'static> {
    let host = addr_host.trim();
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return ServerName::IpAddress(ip.into());
    }
    ServerName::try_from(host.to_owned()).unwrap_or_else(|_| {
        ServerName::try_from(FALLBACK_SERVER_NAME)
            .expect("fallback server name is a valid DNS name")
    })
}

/// Verifies server certificates against the deployment CA like rustls'
/// [`WebPkiServerVerifier`], except that a certificate which is valid in every
/// respect but not issued for the server name is accepted.
///
/// This relies on `WebPkiServerVerifier::verify_server_cert` checking the name
/// *last*, after the chain, validity period, key usage and revocation: a
/// `NotValidForName` error therefore means everything else passed.
#[derive(Debug)]
pub(crate) struct AnyNameServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl AnyNameServerVerifier {
    pub(crate) fn new(
        roots: RootCertStore,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
        Ok(Self { inner })
    }
}

impl ServerCertVerifier for AnyNameServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(verified) => Ok(verified),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(other) => Err(other),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// Reads a file, mapping errors to [`Error::Read`].
fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|error| Error::Read {
        what,
        path: path.to_owned(),
        error,
    })
}

/// Loads all PEM certificates from `path`; at least one must be present.
pub(crate) fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(path, what)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| Error::Pem {
            what,
            path: path.to_owned(),
            error,
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Loads the CA certificate(s) from `path` into a root store.
pub(crate) fn load_roots(path: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, "CA certificate")? {
        roots.add(cert).map_err(|error| Error::InvalidCa {
            path: path.to_owned(),
            error,
        })?;
    }
    Ok(roots)
}

/// Loads the first private key (PKCS#8, PKCS#1 or SEC1) from `path`.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    const WHAT: &str = "TLS private key";
    let pem = read(path, WHAT)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|error| Error::Pem {
            what: WHAT,
            path: path.to_owned(),
            error,
        })?
        .ok_or_else(|| Error::NoPrivateKey {
            path: path.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A CA, a leaf it issued for `name`, and the verifier trusting that CA.
    struct Fixture {
        verifier: AnyNameServerVerifier,
        leaf: CertificateDer<'static>,
    }

    fn ca(
        cn: &str,
    ) -> (
        rcgen::CertificateParams,
        rcgen::KeyPair,
        CertificateDer<'static>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        (params, key, cert.der().clone())
    }

    fn leaf(
        ca_params: &rcgen::CertificateParams,
        ca_key: &rcgen::KeyPair,
        name: &str,
    ) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let issuer = rcgen::Issuer::from_params(ca_params, ca_key);
        params.signed_by(&key, &issuer).unwrap().der().clone()
    }

    fn fixture(name: &str) -> Fixture {
        let (params, key, ca_der) = ca("test CA");
        let mut roots = RootCertStore::empty();
        roots.add(ca_der).unwrap();
        Fixture {
            verifier: AnyNameServerVerifier::new(roots, provider()).unwrap(),
            leaf: leaf(&params, &key, name),
        }
    }

    fn at(year_offset_secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(year_offset_secs))
    }

    /// 2030-01-01, inside the fixture leaf's validity.
    const IN_VALIDITY: u64 = 1_893_456_000;
    /// 2050-01-01, after the fixture leaf expired.
    const AFTER_VALIDITY: u64 = 2_524_608_000;

    fn verify(
        f: &Fixture,
        cert: &CertificateDer<'_>,
        name: &str,
        now: u64,
    ) -> Result<ServerCertVerified, rustls::Error> {
        f.verifier
            .verify_server_cert(cert, &[], &server_name_for(name), &[], at(now))
    }

    #[test]
    fn accepts_matching_and_mismatching_names() {
        let f = fixture("edge-a.example");
        verify(&f, &f.leaf, "edge-a.example", IN_VALIDITY).unwrap();
        verify(&f, &f.leaf, "other.example", IN_VALIDITY).unwrap();
        verify(&f, &f.leaf, "192.0.2.7", IN_VALIDITY).unwrap();
        verify(&f, &f.leaf, "[2001:db8::1]", IN_VALIDITY).unwrap();
    }

    #[test]
    fn rejects_unknown_issuer_even_with_matching_name() {
        let f = fixture("edge-a.example");
        let (other_params, other_key, _) = ca("other CA");
        let foreign = leaf(&other_params, &other_key, "edge-a.example");
        let err = verify(&f, &foreign, "edge-a.example", IN_VALIDITY).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );

        // A foreign CA that copies our CA's subject name is caught by the
        // signature check instead.
        let (clone_params, clone_key, _) = ca("test CA");
        let foreign = leaf(&clone_params, &clone_key, "edge-a.example");
        let err = verify(&f, &foreign, "edge-a.example", IN_VALIDITY).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        );
    }

    #[test]
    fn rejects_expired_and_not_yet_valid() {
        let f = fixture("edge-a.example");
        for (now, name) in [
            (AFTER_VALIDITY, "edge-a.example"),
            (AFTER_VALIDITY, "x.example"),
        ] {
            let err = verify(&f, &f.leaf, name, now).unwrap_err();
            assert!(
                matches!(
                    err,
                    rustls::Error::InvalidCertificate(
                        CertificateError::Expired | CertificateError::ExpiredContext { .. }
                    )
                ),
                "{err:?}"
            );
        }
        // 2000-01-01: before not_before.
        let err = verify(&f, &f.leaf, "x.example", 946_684_800).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_bad_signature() {
        let f = fixture("edge-a.example");
        let mut tampered = f.leaf.to_vec();
        // The certificate ends with the ECDSA signature's `s` integer; changing
        // its last byte keeps the DER valid but breaks the signature.
        *tampered.last_mut().unwrap() ^= 0x01;
        let tampered = CertificateDer::from(tampered);
        for name in ["edge-a.example", "x.example"] {
            let err = verify(&f, &tampered, name, IN_VALIDITY).unwrap_err();
            assert_eq!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::BadSignature),
                "{name}"
            );
        }
    }

    #[test]
    fn rejects_garbage() {
        let f = fixture("edge-a.example");
        let err = verify(
            &f,
            &CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]),
            "x",
            IN_VALIDITY,
        )
        .unwrap_err();
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );
    }

    #[test]
    fn server_names() {
        assert_eq!(
            server_name_for("10.1.2.3"),
            ServerName::IpAddress("10.1.2.3".parse::<IpAddr>().unwrap().into())
        );
        assert_eq!(
            server_name_for("[::1]"),
            ServerName::IpAddress("::1".parse::<IpAddr>().unwrap().into())
        );
        assert_eq!(
            server_name_for("::1"),
            ServerName::IpAddress("::1".parse::<IpAddr>().unwrap().into())
        );
        assert_eq!(
            server_name_for("edge-b.example.com"),
            ServerName::try_from("edge-b.example.com").unwrap()
        );
        for bad in ["", "not a name", "a/b", "[::1"] {
            assert_eq!(
                server_name_for(bad),
                ServerName::try_from(FALLBACK_SERVER_NAME).unwrap(),
                "{bad:?}"
            );
        }
    }
}
