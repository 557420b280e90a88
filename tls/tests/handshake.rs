//! End-to-end tests: generated certificates, real TLS handshakes over loopback.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use tls::{
    client_config, generate_certs, peer_identity, server_config, server_name_for, Error, TlsFiles,
    ALPN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// What one side saw of a successful exchange.
#[derive(Debug)]
struct Seen {
    peer: Option<String>,
    alpn: Option<Vec<u8>>,
}

/// Runs one connection: the client writes a byte, the server echoes it back.
/// Returns what the server and the client observed. Both sides always finish
/// (errors included), and the whole exchange has a timeout.
async fn exchange(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> (io::Result<Seen>, io::Result<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    let server_side = async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        tls.write_all(&byte).await?;
        tls.flush().await?;
        let (_, conn) = tls.get_ref();
        let seen = Seen {
            peer: conn.peer_certificates().and_then(peer_identity),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        };
        tls.shutdown().await?;
        Ok(seen)
    };
    let client_side = async move {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
        // With TLS 1.3 the client finishes its handshake before the server has
        // checked the client certificate: a rejection only shows up when
        // reading, so always do a round trip.
        tls.write_all(b"x").await?;
        tls.flush().await?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        assert_eq!(&byte, b"x");
        let (_, conn) = tls.get_ref();
        Ok(Seen {
            peer: conn.peer_certificates().and_then(peer_identity),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        })
    };
    let both = async { tokio::join!(server_side, client_side) };
    tokio::time::timeout(Duration::from_secs(20), both)
        .await
        .expect("exchange timed out")
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
fn tls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

fn assert_ok_pair(
    result: (io::Result<Seen>, io::Result<Seen>),
    server_peer: &str,
    client_peer: &str,
) {
    let (server, client) = result;
    let server = server.expect("server side failed");
    let client = client.expect("client side failed");
    assert_eq!(server.peer.as_deref(), Some(server_peer));
    assert_eq!(client.peer.as_deref(), Some(client_peer));
    assert_eq!(server.alpn.as_deref(), Some(ALPN));
    assert_eq!(client.alpn.as_deref(), Some(ALPN));
}

fn localhost() -> ServerName<'static> {
    server_name_for("127.0.0.1")
}

#[tokio::test]
async fn mutual_auth_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let generated = generate_certs(dir.path(), &names(&["a", "b"])).unwrap();
    assert!(!generated.ca_reused);
    let a = generated.tls_files("a").unwrap();
    let b = generated.tls_files("b").unwrap();
    assert_eq!(a, TlsFiles::in_dir(dir.path(), "a"));

    // b accepts, a connects; then the other way round. The server names used
    // ("127.0.0.1", a DNS name in neither certificate) are deliberately not
    // the certificate names.
    for name in [localhost(), server_name_for("somewhere.example")] {
        let result = exchange(server_config(&b).unwrap(), client_config(&a).unwrap(), name).await;
        assert_ok_pair(result, "a", "b");
    }
    let result = exchange(
        server_config(&a).unwrap(),
        client_config(&b).unwrap(),
        server_name_for("b"),
    )
    .await;
    assert_ok_pair(result, "b", "a");
}

#[tokio::test]
async fn ip_and_underscore_names() {
    let dir = tempfile::tempdir().unwrap();
    let generated = generate_certs(dir.path(), &names(&["127.0.0.1", "edge_2"])).unwrap();
    let ip = generated.tls_files("127.0.0.1").unwrap();
    let underscore = generated.tls_files("edge_2").unwrap();
    let result = exchange(
        server_config(&ip).unwrap(),
        client_config(&underscore).unwrap(),
        localhost(),
    )
    .await;
    assert_ok_pair(result, "edge_2", "127.0.0.1");
    let result = exchange(
        server_config(&underscore).unwrap(),
        client_config(&ip).unwrap(),
        server_name_for("edge_2"),
    )
    .await;
    assert_ok_pair(result, "127.0.0.1", "edge_2");
}

#[tokio::test]
async fn client_from_other_ca_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let ours = generate_certs(dir.path(), &names(&["a", "b"])).unwrap();
    let theirs = generate_certs(other.path(), &names(&["a"])).unwrap();

    // The intruder trusts our CA (so it would accept our server) but its own
    // certificate comes from another CA.
    let intruder = TlsFiles {
        ca: ours.ca_cert.clone(),
        ..theirs.tls_files("a").unwrap()
    };
    let (server, client) = exchange(
        server_config(&ours.tls_files("b").unwrap()).unwrap(),
        client_config(&intruder).unwrap(),
        localhost(),
    )
    .await;
    let server = server.expect_err("server accepted a client from another CA");
    assert_eq!(
        tls_error(&server),
        Some(&rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        )),
        "{server:?}"
    );
    client.expect_err("client did not notice the rejection");
}

#[tokio::test]
async fn server_from_other_ca_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let ours = generate_certs(dir.path(), &names(&["a", "b"])).unwrap();
    let theirs = generate_certs(other.path(), &names(&["b"])).unwrap();

    // The impostor server trusts our CA (so it would accept our client) but
    // its own certificate comes from another CA, even with the right name.
    let impostor = TlsFiles {
        ca: ours.ca_cert.clone(),
        ..theirs.tls_files("b").unwrap()
    };
    let (server, client) = exchange(
        server_config(&impostor).unwrap(),
        client_config(&ours.tls_files("a").unwrap()).unwrap(),
        server_name_for("b"),
    )
    .await;
    let client = client.expect_err("client accepted a server from another CA");
    assert_eq!(
        tls_error(&client),
        Some(&rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        )),
        "{client:?}"
    );
    server.expect_err("server did not notice the rejection");
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let ours = generate_certs(dir.path(), &names(&["a", "b"])).unwrap();

    let mut roots = RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&ours.ca_cert).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut anonymous =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    anonymous.alpn_protocols = vec![ALPN.to_vec()];

    let (server, client) = exchange(
        server_config(&ours.tls_files("b").unwrap()).unwrap(),
        Arc::new(anonymous),
        server_name_for("b"),
    )
    .await;
    let server = server.expect_err("server accepted a client without certificate");
    assert_eq!(
        tls_error(&server),
        Some(&rustls::Error::NoCertificatesPresented),
        "{server:?}"
    );
    let client = client.expect_err("client did not notice the rejection");
    assert!(
        matches!(tls_error(&client), Some(rustls::Error::AlertReceived(_))),
        "{client:?}"
    );
}

#[tokio::test]
async fn tls12_client_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let ours = generate_certs(dir.path(), &names(&["a", "b"])).unwrap();
    let a = ours.tls_files("a").unwrap();

    let mut roots = RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&a.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(&a.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&a.key).unwrap();
    let tls12 =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();

    let (server, client) = exchange(
        server_config(&ours.tls_files("b").unwrap()).unwrap(),
        Arc::new(tls12),
        server_name_for("b"),
    )
    .await;
    let server = server.expect_err("server accepted TLS 1.2");
    assert!(
        matches!(tls_error(&server), Some(rustls::Error::PeerIncompatible(_))),
        "{server:?}"
    );
    client.expect_err("TLS 1.2 client connected");
}

#[tokio::test]
async fn rerun_reuses_ca() {
    let dir = tempfile::tempdir().unwrap();
    let first = generate_certs(dir.path(), &names(&["a"])).unwrap();
    assert!(!first.ca_reused);
    let ca_before = std::fs::read(&first.ca_cert).unwrap();
    let ca_key_before = std::fs::read(&first.ca_key).unwrap();

    let second = generate_certs(dir.path(), &names(&["b", "c"])).unwrap();
    assert!(second.ca_reused);
    assert_eq!(second.ca_cert, first.ca_cert);
    assert_eq!(std::fs::read(&second.ca_cert).unwrap(), ca_before);
    assert_eq!(std::fs::read(&second.ca_key).unwrap(), ca_key_before);
    assert_eq!(
        second
            .edges
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["b", "c"]
    );

    // The old edge and a new one accept each other, both ways.
    let a = first.tls_files("a").unwrap();
    let b = second.tls_files("b").unwrap();
    let result = exchange(
        server_config(&a).unwrap(),
        client_config(&b).unwrap(),
        localhost(),
    )
    .await;
    assert_ok_pair(result, "b", "a");
    let result = exchange(
        server_config(&b).unwrap(),
        client_config(&a).unwrap(),
        localhost(),
    )
    .await;
    assert_ok_pair(result, "a", "b");

    // Only the CA is needed: an empty name list issues nothing.
    let third = generate_certs(dir.path(), &[]).unwrap();
    assert!(third.ca_reused);
    assert!(third.edges.is_empty());
}

#[test]
fn existing_edges_are_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let first = generate_certs(dir.path(), &names(&["a"])).unwrap();
    let a_cert = std::fs::read(&first.edges[0].cert).unwrap();

    let err = generate_certs(dir.path(), &names(&["b", "a"])).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&first.edges[0].cert.display().to_string()),
        "{err}"
    );
    // Nothing was written: neither b nor a new a.
    assert!(!dir.path().join("b.crt").exists());
    assert!(!dir.path().join("b.key").exists());
    assert_eq!(std::fs::read(&first.edges[0].cert).unwrap(), a_cert);
}

#[test]
fn incomplete_ca_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let first = generate_certs(dir.path(), &[]).unwrap();
    std::fs::remove_file(&first.ca_key).unwrap();
    let err = generate_certs(dir.path(), &names(&["a"])).unwrap_err();
    assert!(matches!(err, Error::IncompleteCa { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&first.ca_key.display().to_string()), "{msg}");
    assert!(!dir.path().join("a.crt").exists());
}

#[test]
fn mismatched_ca_key_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let ours = generate_certs(dir.path(), &[]).unwrap();
    let theirs = generate_certs(other.path(), &[]).unwrap();
    std::fs::remove_file(&ours.ca_key).unwrap();
    std::fs::copy(&theirs.ca_key, &ours.ca_key).unwrap();

    let err = generate_certs(dir.path(), &names(&["a"])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::CaMismatch {
                error: rustls::Error::InvalidCertificate(CertificateError::BadSignature),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!dir.path().join("a.crt").exists());
    assert!(!dir.path().join("a.key").exists());
    // Also without any name to issue.
    let err = generate_certs(dir.path(), &[]).unwrap_err();
    assert!(matches!(err, Error::CaMismatch { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&ours.ca_key.display().to_string()),
        "{err}"
    );
}

#[test]
fn invalid_names_are_rejected_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    for bad in [
        vec!["good", ""],
        vec!["good", "../evil"],
        vec!["a/b"],
        vec!["ca"],
        vec!["x", "X"],
    ] {
        let err = generate_certs(&out, &names(&bad)).unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");
        assert!(err.to_string().starts_with("invalid edge name"), "{err}");
        assert!(!out.exists(), "{bad:?} created the output directory");
    }
}

#[cfg(unix)]
#[test]
fn private_keys_are_private() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("nested/certs");
    let generated = generate_certs(&nested, &names(&["a"])).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&generated.ca_key), 0o600);
    assert_eq!(mode(&generated.edges[0].key), 0o600);
    assert_eq!(generated.ca_cert, nested.join("ca.crt"));
    assert_eq!(generated.edges[0].cert, nested.join("a.crt"));
    assert_eq!(generated.edges[0].key, nested.join("a.key"));
}

#[test]
fn missing_or_bad_files_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let generated = generate_certs(dir.path(), &names(&["a", "b"])).unwrap();
    let good = generated.tls_files("a").unwrap();
    let missing = dir.path().join("nope.crt");

    type Build = fn(&TlsFiles) -> Result<(), Error>;
    let builders: [(&str, Build); 2] = [
        ("server", |f| server_config(f).map(drop)),
        ("client", |f| client_config(f).map(drop)),
    ];
    for (side, build) in builders {
        // Missing files.
        for files in [
            TlsFiles {
                ca: missing.clone(),
                ..good.clone()
            },
            TlsFiles {
                cert: missing.clone(),
                ..good.clone()
            },
            TlsFiles {
                key: missing.clone(),
                ..good.clone()
            },
        ] {
            let err = build(&files).unwrap_err();
            assert!(matches!(err, Error::Read { .. }), "{side}: {err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains(&missing.display().to_string()),
                "{side}: {msg}"
            );
            assert!(msg.contains("shrinker certs"), "{side}: {msg}");
        }

        // A key where a certificate is expected, and the other way round.
        let err = build(&TlsFiles {
            cert: good.key.clone(),
            ..good.clone()
        })
        .unwrap_err();
        assert!(
            matches!(err, Error::NoCertificate { .. }),
            "{side}: {err:?}"
        );
        assert!(err.to_string().contains(&good.key.display().to_string()));
        let err = build(&TlsFiles {
            ca: good.key.clone(),
            ..good.clone()
        })
        .unwrap_err();
        assert!(
            matches!(err, Error::NoCertificate { .. }),
            "{side}: {err:?}"
        );
        let err = build(&TlsFiles {
            key: good.cert.clone(),
            ..good.clone()
        })
        .unwrap_err();
        assert!(matches!(err, Error::NoPrivateKey { .. }), "{side}: {err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("no private key found in {}", good.cert.display())),
            "{err}"
        );

        // A key that belongs to another certificate.
        let b_key = generated.tls_files("b").unwrap().key;
        let err = build(&TlsFiles {
            key: b_key.clone(),
            ..good.clone()
        })
        .unwrap_err();
        assert!(matches!(err, Error::CertKey { .. }), "{side}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&b_key.display().to_string()), "{msg}");
        assert!(msg.contains(&good.cert.display().to_string()), "{msg}");
    }
}
