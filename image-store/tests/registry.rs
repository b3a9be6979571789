//! Pulling from a real registry on loopback (Debian's docker-registry),
//! filled with skopeo from a layout built here.

mod common;

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

fn start_registry() -> Registry {
    let dir = tempfile::tempdir().unwrap();
    // A free loopback port: bind, read, release.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let config = dir.path().join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n",
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

fn push(layout: &std::path::Path, tag: &str, destination: &str) {
    let status = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{destination}"))
        .status()
        .expect("skopeo (scripts/setup.sh installs it)");
    assert!(status.success(), "skopeo copy to {destination}");
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
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
