//! Pulling from a real registry on loopback (Debian's docker-registry),
//! filled with skopeo from a layout built here: anonymous, with basic
//! auth (htpasswd), and with bearer tokens from a token server run here
//! (JWTs signed with openssl, checked by the registry against our cert).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsa_image_store::registry::{Progress, PullOptions};
use capsa_image_store::{ImageStore, StoreError};

struct Registry {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    // Bind, read, release.
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A registry on loopback; `auth` is the config's `auth:` section, which
/// may refer to files in `dir`.
fn start_registry_in(dir: tempfile::TempDir, auth: &str) -> Registry {
    let address = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n{auth}",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry (scripts/setup.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&address).is_err() {
        assert!(Instant::now() < deadline, "the registry did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    Registry {
        child,
        address,
        _dir: dir,
    }
}

fn start_registry() -> Registry {
    start_registry_in(tempfile::tempdir().unwrap(), "")
}

fn push(layout: &std::path::Path, tag: &str, destination: &str) {
    push_as(layout, tag, destination, None);
}

fn push_as(layout: &std::path::Path, tag: &str, destination: &str, creds: Option<&str>) {
    let mut command = Command::new("skopeo");
    command.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    if let Some(creds) = creds {
        command.arg(format!("--dest-creds={creds}"));
    }
    let status = command
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{destination}"))
        .status()
        .expect("skopeo (scripts/setup.sh installs it)");
    assert!(status.success(), "skopeo copy to {destination}");
}

fn with_credentials(user: &str, password: &str) -> PullOptions {
    PullOptions {
        credentials: Some((user.into(), password.into())),
        ..PullOptions::default()
    }
}

/// Pushes a one-layer image as `creds` and checks that a pull without
/// credentials or with a wrong password is refused and one with
/// `user`/`password` stores the image.
fn check_auth(registry: &Registry, creds: &str, expect_without: &str) {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    common::oci_layout(&layout, "latest", b"behind auth");
    let reference = format!("{}/team/app:v1", registry.address);
    push_as(&layout, "latest", &reference, Some(creds));
    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    let (user, password) = creds.split_once(':').unwrap();
    // docker login's check, before any pull.
    let registry_name = registry.address.as_str();
    assert!(ImageStore::check_login(registry_name, &with_credentials(user, "wrong")).is_err());
    ImageStore::check_login(registry_name, &with_credentials(user, password)).unwrap();

    let anonymous = store
        .pull(&reference, None, &PullOptions::default(), &mut |_| {})
        .unwrap_err();
    assert!(
        anonymous.to_string().contains(expect_without),
        "without credentials: {anonymous}"
    );
    let wrong = store
        .pull(
            &reference,
            None,
            &with_credentials(user, "wrong"),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        !wrong.to_string().is_empty() && store.list().unwrap().is_empty(),
        "{wrong}"
    );
    let summary = store
        .pull(
            &reference,
            None,
            &with_credentials(user, password),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(
        (summary.name.as_str(), summary.layers),
        (reference.as_str(), 1)
    );
}

/// Pushes the store's image to `registry` and pulls it back into another
/// store: the same manifest digest.
fn check_push(registry: &Registry, options: &PullOptions) {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    common::oci_layout(&layout, "latest", b"pushed by capsa");
    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    let imported = store
        .import_layout(&layout, Some("latest"), "app:v1", &mut |_| {})
        .unwrap();
    let target = format!("{}/team/pushed:v1", registry.address);
    let mut said = Vec::new();
    let digest = store
        .push("app:v1", &target, options, &mut |p| {
            said.push(p.to_string())
        })
        .unwrap();
    assert_eq!(digest, imported.manifest_digest);
    assert_eq!(said.len(), 3, "{said:?}");
    // Again: every blob is there already.
    let mut again = Vec::new();
    store
        .push("app:v1", &target, options, &mut |p| again.push(p))
        .unwrap();
    let fresh = ImageStore::open(&dir.path().join("fresh")).unwrap();
    let pulled = fresh.pull(&target, None, options, &mut |_| {}).unwrap();
    assert_eq!(pulled.manifest_digest, imported.manifest_digest);
}

#[test]
fn pushes_an_image_that_pulls_back_the_same() {
    let registry = start_registry();
    check_push(&registry, &PullOptions::default());
}

#[test]
fn pulls_with_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    std::fs::write(&htpasswd, format!("tenant:{hash}\n")).unwrap();
    let auth = format!(
        "auth:\n  htpasswd:\n    realm: capsa-test\n    path: {}\n",
        htpasswd.display()
    );
    let registry = start_registry_in(dir, &auth);
    check_auth(&registry, "tenant:s3cret", "needs credentials (basic auth)");
    check_push(&registry, &with_credentials("tenant", "s3cret"));
}

#[test]
fn pulls_with_bearer_tokens_from_a_token_server() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let cert = dir.path().join("cert.pem");
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=capsa-test-tokens", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl req");
    let tokens = TokenServer::start(&key, &cert, "tenant", "t0ken-pass");
    let auth = format!(
        "auth:\n  token:\n    realm: http://{}/token\n    service: capsa-test-registry\n    issuer: capsa-test-issuer\n    rootcertbundle: {}\n",
        tokens.address,
        cert.display()
    );
    let registry = start_registry_in(dir, &auth);
    check_auth(&registry, "tenant:t0ken-pass", "token from");
    assert!(
        tokens.issued.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "skopeo's push and our pull got tokens"
    );
}

/// A bearer token server: checks basic credentials and answers a JWT
/// (RS256, signed with openssl, its cert in the x5c header) granting the
/// requested scope.
struct TokenServer {
    address: String,
    issued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TokenServer {
    fn start(key: &std::path::Path, cert: &std::path::Path, user: &str, password: &str) -> Self {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        use base64::Engine;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(cert)
            .output()
            .unwrap()
            .stdout;
        let header =
            serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [STANDARD.encode(der)]});
        let expected = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
        let key = key.to_path_buf();
        let issued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = issued.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let request = read_request(&mut stream);
                let authorized = request.lines().any(|l| {
                    l.to_ascii_lowercase().starts_with("authorization:")
                        && l[14..].trim() == expected
                });
                if !authorized {
                    let _ = stream.write_all(
                        b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                    continue;
                }
                let access: Vec<serde_json::Value> = query_values(&request, "scope")
                    .iter()
                    .filter_map(|scope| {
                        let mut parts = scope.splitn(3, ':');
                        let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                        Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
                    })
                    .collect();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let claims = serde_json::json!({
                    "iss": "capsa-test-issuer", "sub": "tenant", "aud": "capsa-test-registry",
                    "iat": now, "nbf": now - 60, "exp": now + 300,
                    "jti": format!("token-{now}-{}", counter.load(std::sync::atomic::Ordering::Relaxed)),
                    "access": access,
                });
                let signing_input = format!(
                    "{}.{}",
                    URL_SAFE_NO_PAD.encode(header.to_string()),
                    URL_SAFE_NO_PAD.encode(claims.to_string())
                );
                let mut openssl = Command::new("openssl")
                    .args(["dgst", "-sha256", "-sign"])
                    .arg(&key)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                openssl
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(signing_input.as_bytes())
                    .unwrap();
                let signature = openssl.wait_with_output().unwrap().stdout;
                let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature));
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let body = serde_json::json!({"token": token, "access_token": token}).to_string();
                let _ = stream.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        TokenServer { address, issued }
    }
}

/// The request line and headers (token requests are GETs: no body).
fn read_request(stream: &mut std::net::TcpStream) -> String {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") && request.len() < 16 << 10 {
        match stream.read(&mut byte) {
            Ok(1) => request.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&request).into_owned()
}

/// Every value of `key` in the request line's query, percent-decoded.
fn query_values(request: &str, key: &str) -> Vec<String> {
    let target = request.split(' ').nth(1).unwrap_or("");
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn pulls_from_a_registry_verifies_and_shares_blobs() {
    let registry = start_registry();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    common::oci_layout(&layout, "latest", b"pulled content");
    let reference = format!("{}/team/app:v1", registry.address);
    push(&layout, "latest", &reference);

    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    let mut events = Vec::new();
    let summary = store
        .pull(&reference, None, &PullOptions::default(), &mut |p| {
            events.push(p)
        })
        .unwrap();
    assert_eq!(summary.name, reference);
    assert_eq!(summary.layers, 1);
    let fetched = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Progress::Blob {
                    already_present: false,
                    ..
                }
            )
        })
        .count();
    assert_eq!(fetched, 2, "config and layer: {events:?}");
    // The stored image opens as a layout and names its layer.
    let index = std::fs::read_to_string(store.layout().join("index.json")).unwrap();
    assert!(index.contains(&reference));

    // Again under another name: nothing is fetched twice.
    let mut again = Vec::new();
    store
        .pull(
            &reference,
            Some("app:copy"),
            &PullOptions::default(),
            &mut |p| again.push(p),
        )
        .unwrap();
    assert!(again.iter().all(|e| !matches!(
        e,
        Progress::Blob {
            already_present: false,
            ..
        }
    )));

    let missing = store.pull(
        &format!("{}/team/app:nope", registry.address),
        None,
        &PullOptions::default(),
        &mut |_| {},
    );
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
}

#[test]
fn an_unreachable_registry_is_a_clear_error() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let error = store
        .pull(
            &format!("127.0.0.1:{port}/app"),
            None,
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        error.to_string().contains(&format!("127.0.0.1:{port}")),
        "{error}"
    );
}

#[test]
fn docker_hub_names_pull_from_the_mirrors_in_order_and_digests_pin() {
    let registry = start_registry();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    common::oci_layout(&layout, "latest", b"mirrored");
    push(
        &layout,
        "latest",
        &format!("{}/library/busybox:latest", registry.address),
    );
    let store = ImageStore::open(&dir.path().join("store")).unwrap();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let options = PullOptions {
        mirrors: vec![dead.clone(), format!("http://{}/", registry.address)],
        ..PullOptions::default()
    };
    // `busybox` is docker.io/library/busybox:latest: the dead mirror is
    // passed over, the live one serves it.
    let summary = store.pull("busybox", None, &options, &mut |_| {}).unwrap();
    assert_eq!(summary.name, "busybox:latest");
    for name in [
        "busybox",
        "busybox:latest",
        "docker.io/library/busybox",
        "index.docker.io/library/busybox:latest",
    ] {
        assert_eq!(store.summary(name).unwrap(), summary, "{name}");
    }
    let digest = summary.manifest_digest.clone();
    assert_eq!(
        store
            .summary(&format!("busybox:latest@{digest}"))
            .unwrap()
            .manifest_digest,
        digest
    );
    assert_eq!(
        store
            .summary(&format!("busybox@{digest}"))
            .unwrap()
            .manifest_digest,
        digest
    );
    let other = format!("sha256:{}", "0".repeat(64));
    assert!(matches!(
        store.summary(&format!("busybox:latest@{other}")),
        Err(StoreError::NotFound(_))
    ));

    // Pinned by digest, under a name of its own.
    let pinned = store
        .pull(&format!("busybox@{digest}"), None, &options, &mut |_| {})
        .unwrap();
    assert_eq!(pinned.name, format!("busybox@{digest}"));
    let wrong = store
        .pull(&format!("busybox@{other}"), None, &options, &mut |_| {})
        .unwrap_err();
    assert!(!wrong.to_string().contains("Error {"), "{wrong}");

    // No mirror has it: every refusal is in the one error.
    let missing = store
        .pull("nothere", None, &options, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains(&dead) && missing.contains(&registry.address),
        "{missing}"
    );
}
