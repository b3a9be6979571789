//! capsad's TLS listener, end to end over TCP: a tenant's token names it,
//! a request without one is refused with 401, a client that does not trust
//! the certificate gets no answer, and the Unix socket stays the admin's.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use capsa_api::{ApiError, ErrorCode, VersionView};
use capsa_cli::client::{Client, Endpoint};
use hyper::Method;
use sha2::{Digest, Sha256};

/// A CA, and a certificate for localhost that it signed: (CA PEM, cert
/// PEM, key PEM).
fn certificates() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(dir: &Path, port: u16) -> common::Daemon {
    let (ca, cert, key) = certificates();
    std::fs::write(dir.join("ca.pem"), ca).unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    let digest = |token: &str| hex::encode(Sha256::digest(token.as_bytes()));
    std::fs::write(
        dir.join("tenants.toml"),
        format!(
            "[[tenant]]\nname = \"alice\"\ntoken-sha256 = \"{}\"\n",
            digest("alice-token")
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{port}");
    let daemon = common::start(
        dir,
        &[
            "--tls-listen",
            &listen,
            "--tls-cert",
            "cert.pem",
            "--tls-key",
            "key.pem",
            "--tenants",
            "tenants.toml",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "capsad never listened on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon
}

fn api_error(e: anyhow::Error) -> ApiError {
    e.downcast::<ApiError>()
        .unwrap_or_else(|e| panic!("not an API error: {e:#}"))
}

#[test]
fn tenants_reach_capsad_over_tls_with_their_token() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _daemon = start(dir.path(), port);
    let host = format!("https://localhost:{port}");
    let ca = dir.path().join("ca.pem");
    let tenant = |token: Option<&str>| {
        Client::to(Endpoint::parse(&host, Some(&ca), token.map(str::to_string)).unwrap()).unwrap()
    };

    let version: VersionView = tenant(Some("alice-token"))
        .call(Method::GET, "/v1/version", None)
        .unwrap();
    assert_eq!(version.tenant.as_deref(), Some("alice"));
    let groups: Vec<serde_json::Value> = tenant(Some("alice-token"))
        .call(Method::GET, "/v1/groups", None)
        .unwrap();
    assert!(groups.is_empty());

    for token in [None, Some("mallory")] {
        let refused = tenant(token)
            .call::<VersionView>(Method::GET, "/v1/version", None)
            .unwrap_err();
        assert_eq!(
            api_error(refused).code,
            ErrorCode::Unauthorized,
            "{token:?}"
        );
    }
    let import = serde_json::json!({"path": "/", "name": "host"}).to_string();
    let refused = tenant(Some("alice-token"))
        .call::<serde_json::Value>(Method::POST, "/v1/images/import", Some(import))
        .unwrap_err();
    assert_eq!(api_error(refused).code, ErrorCode::Forbidden);

    // A client that trusts another CA stops at the handshake.
    let (other_ca, _, _) = certificates();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, other_ca).unwrap();
    let stranger =
        Client::to(Endpoint::parse(&host, Some(&other), Some("alice-token".to_string())).unwrap())
            .unwrap();
    let failed = stranger
        .call::<VersionView>(Method::GET, "/v1/version", None)
        .unwrap_err();
    assert!(failed.downcast_ref::<ApiError>().is_none(), "{failed:#}");
    assert!(format!("{failed:#}").contains("TLS"), "{failed:#}");

    // The Unix socket is the admin's.
    let admin = Client::new(&dir.path().join("capsad.sock")).unwrap();
    let version: VersionView = admin.call(Method::GET, "/v1/version", None).unwrap();
    assert_eq!(version.tenant, None);
}
