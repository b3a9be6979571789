//! `capsad --version` names the build.

#[test]
fn the_daemon_prints_its_version() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capsad"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("capsad {}", env!("CARGO_PKG_VERSION"))
    );
}
