//! Registry credentials as docker keeps them: `config.json` under
//! `$DOCKER_CONFIG` (`~/.docker` unless set), its `auths` (base64 of
//! `user:password`), and the credential helpers it names (`credHelpers`
//! for one registry, `credsStore` for all): `docker-credential-NAME` with
//! `get`, `store` and `erase`. The file's other settings are kept as they
//! are. capsad never keeps them: each pull carries its own.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{json, Map, Value};

/// Docker Hub's key in config.json, as docker writes it.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// The registry a reference pulls from (`docker.io` for Docker Hub).
pub fn registry_of(reference: &str) -> Result<String> {
    let parsed: oci_spec::distribution::Reference = reference
        .parse()
        .map_err(|e| anyhow!("{reference:?} is not an image reference: {e}"))?;
    Ok(parsed.registry().to_string())
}

/// How config.json names a registry: Docker Hub by its old index URL,
/// any other by host[:port].
pub fn server_key(registry: &str) -> String {
    let host = bare(registry);
    if matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    ) {
        DOCKER_HUB_KEY.to_string()
    } else {
        host.to_string()
    }
}

/// host[:port] of a registry given with or without a scheme and path.
fn bare(registry: &str) -> &str {
    let rest = registry
        .strip_prefix("https://")
        .or_else(|| registry.strip_prefix("http://"))
        .unwrap_or(registry);
    rest.split('/').next().unwrap_or(rest)
}

/// The credentials `docker login` or `capsa login` kept for the registry
/// `reference` pulls from; none (with a warning) when the file cannot be
/// read, so that public images still pull.
pub fn for_reference(reference: &str) -> Option<(String, String)> {
    let found = registry_of(reference)
        .and_then(|registry| Credentials::open(&Credentials::default_path()?)?.get(&registry));
    match found {
        Ok(found) => found,
        Err(e) => {
            eprintln!("capsa: pulling without credentials: {e:#}");
            None
        }
    }
}

pub struct Credentials {
    path: PathBuf,
    config: Map<String, Value>,
    /// Where the helpers are; PATH unless set (tests).
    helpers: Option<PathBuf>,
}

impl Credentials {
    /// `$DOCKER_CONFIG/config.json`, or `~/.docker/config.json`.
    pub fn default_path() -> Result<PathBuf> {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            return Ok(PathBuf::from(dir).join("config.json"));
        }
        let home = std::env::var_os("HOME").context("neither DOCKER_CONFIG nor HOME is set")?;
        Ok(PathBuf::from(home).join(".docker/config.json"))
    }

    pub fn open(path: &Path) -> Result<Credentials> {
        let config = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?
            {
                Value::Object(map) => map,
                _ => bail!("{}: not a JSON object", path.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Map::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Credentials {
            path: path.to_path_buf(),
            config,
            helpers: None,
        })
    }

    /// Runs `docker-credential-NAME VERB` with `input`: its stdout, or its
    /// complaint when it fails.
    fn run_helper(
        &self,
        name: &str,
        verb: &str,
        input: &[u8],
    ) -> Result<std::result::Result<Vec<u8>, String>> {
        let program = format!("docker-credential-{name}");
        let path = match &self.helpers {
            Some(dir) => dir.join(&program),
            None => PathBuf::from(&program),
        };
        let mut child = Command::new(path)
            .arg(verb)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!("running {program} (the credential helper config.json names)")
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            // A helper that does not read its input has still answered.
            match stdin.write_all(input) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
                _ => {}
            }
        }
        let out = child.wait_with_output()?;
        if out.status.success() {
            Ok(Ok(out.stdout))
        } else {
            let said = format!(
                "{} {}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(Err(said.trim().to_string()))
        }
    }

    /// The helper that keeps `key`'s credentials, if one does.
    fn helper(&self, key: &str) -> Option<String> {
        let per_registry = self
            .config
            .get("credHelpers")
            .and_then(Value::as_object)
            .and_then(|helpers| {
                helpers
                    .iter()
                    .find(|(server, _)| server_key(server) == key)
                    .and_then(|(_, name)| name.as_str())
            });
        per_registry
            .or_else(|| self.config.get("credsStore").and_then(Value::as_str))
            .filter(|name| !name.is_empty())
            .map(str::to_string)
    }

    /// The user and password kept for `registry`, if any.
    pub fn get(&self, registry: &str) -> Result<Option<(String, String)>> {
        let key = server_key(registry);
        if let Some(helper) = self.helper(&key) {
            let out = self.run_helper(&helper, "get", key.as_bytes())?;
            return match out {
                Ok(stdout) => {
                    let answer: Value = serde_json::from_slice(&stdout)
                        .with_context(|| format!("docker-credential-{helper} get: its answer"))?;
                    let field = |name: &str| answer[name].as_str().unwrap_or_default().to_string();
                    Ok(Some((field("Username"), field("Secret"))))
                }
                // Helpers say "credentials not found" with a failure.
                Err(_) => Ok(None),
            };
        }
        let Some(entry) = self.auths().and_then(|auths| {
            auths
                .iter()
                .find(|(server, _)| server_key(server) == key)
                .map(|(_, entry)| entry)
        }) else {
            return Ok(None);
        };
        let Some(encoded) = entry["auth"].as_str() else {
            return Ok(None);
        };
        let decoded = BASE64
            .decode(encoded)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .with_context(|| format!("{}: the auth of {key} is not base64", self.path.display()))?;
        let (user, password) = decoded.split_once(':').with_context(|| {
            format!(
                "{}: the auth of {key} is not user:password",
                self.path.display()
            )
        })?;
        Ok(Some((user.to_string(), password.to_string())))
    }

    fn auths(&self) -> Option<&Map<String, Value>> {
        self.config.get("auths").and_then(Value::as_object)
    }

    /// Keeps `user` and `password` for `registry`: with its helper where
    /// one is named, else in config.json's auths.
    pub fn store(&mut self, registry: &str, user: &str, password: &str) -> Result<()> {
        let key = server_key(registry);
        let entry = match self.helper(&key) {
            Some(helper) => {
                let request = json!({"ServerURL": key, "Username": user, "Secret": password});
                self.run_helper(&helper, "store", request.to_string().as_bytes())?
                    .map_err(|e| anyhow!("docker-credential-{helper} store: {e}"))?;
                // docker leaves an empty entry beside a helper's.
                json!({})
            }
            None => json!({ "auth": BASE64.encode(format!("{user}:{password}")) }),
        };
        let path = self.path.display().to_string();
        self.config
            .entry("auths")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .with_context(|| format!("{path}: auths is not an object"))?
            .insert(key, entry);
        self.save()
    }

    /// Forgets `registry`'s credentials; whether there were any.
    pub fn erase(&mut self, registry: &str) -> Result<bool> {
        let key = server_key(registry);
        let mut had = false;
        if let Some(helper) = self.helper(&key) {
            had |= self.run_helper(&helper, "erase", key.as_bytes())?.is_ok();
        }
        if let Some(auths) = self.config.get_mut("auths").and_then(Value::as_object_mut) {
            let keys: Vec<String> = auths
                .keys()
                .filter(|server| server_key(server) == key)
                .cloned()
                .collect();
            for server in keys {
                had |= auths.remove(&server).is_some();
            }
        }
        self.save()?;
        Ok(had)
    }

    /// Written whole to a new file (0600), then renamed over the old.
    fn save(&self) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let temporary = self.path.with_extension("json.new");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .with_context(|| format!("writing {}", temporary.display()))?;
        file.write_all(&serde_json::to_vec_pretty(&self.config)?)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_their_registry_as_docker_keys_it() {
        assert_eq!(server_key(&registry_of("busybox").unwrap()), DOCKER_HUB_KEY);
        assert_eq!(
            server_key(&registry_of("127.0.0.1:5000/app:v1").unwrap()),
            "127.0.0.1:5000"
        );
        assert_eq!(server_key("https://reg.example/v2/"), "reg.example");
    }

    #[test]
    fn auths_are_kept_beside_the_other_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"psFormat": "table", "auths": {"http://old.example/v1/": {"auth": "dTpw"}}}"#,
        )
        .unwrap();
        let mut credentials = Credentials::open(&path).unwrap();
        assert_eq!(
            credentials.get("old.example").unwrap(),
            Some(("u".to_string(), "p".to_string()))
        );
        credentials
            .store("127.0.0.1:5000", "tenant", "s3:cret")
            .unwrap();
        let again = Credentials::open(&path).unwrap();
        assert_eq!(
            again.get("127.0.0.1:5000").unwrap(),
            Some(("tenant".to_string(), "s3:cret".to_string()))
        );
        let text: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(text["psFormat"], "table");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut again = again;
        assert!(again.erase("127.0.0.1:5000").unwrap());
        assert_eq!(again.get("127.0.0.1:5000").unwrap(), None);
        assert!(!again.erase("127.0.0.1:5000").unwrap());
    }

    #[test]
    fn a_named_helper_keeps_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let vault = dir.path().join("vault");
        // A helper of the real protocol, keeping one secret in a file.
        let helper = format!(
            "#!/bin/sh\ncase \"$1\" in\nstore) cat > {v} ;;\nget) [ -s {v} ] && cat {v} || {{ echo 'credentials not found in native keychain'; exit 1; }} ;;\nerase) [ -s {v} ] || exit 1; : > {v} ;;\nesac\n",
            v = vault.display()
        );
        let program = bin.join("docker-credential-test");
        std::fs::write(&program, helper).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"credHelpers": {"reg.example:5000": "test"}}"#).unwrap();
        let mut credentials = Credentials::open(&path).unwrap();
        credentials.helpers = Some(bin);
        credentials.store("reg.example:5000", "me", "pw").unwrap();
        let kept: Value = serde_json::from_slice(&std::fs::read(&vault).unwrap()).unwrap();
        assert_eq!(kept["Secret"], "pw");
        let file = std::fs::read_to_string(&path).unwrap();
        assert!(!file.contains("pw"), "{file}");
        assert_eq!(
            credentials.get("reg.example:5000").unwrap(),
            Some(("me".to_string(), "pw".to_string()))
        );
        assert!(credentials.erase("reg.example:5000").unwrap());
        assert_eq!(credentials.get("reg.example:5000").unwrap(), None);
        // Another registry is not the helper's.
        assert_eq!(credentials.get("other.example").unwrap(), None);
    }
}
