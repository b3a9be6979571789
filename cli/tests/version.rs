//! `capsa --version` names the build.

#[test]
fn the_cli_prints_its_version() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capsa"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("capsa {}", env!("CARGO_PKG_VERSION"))
    );
}
