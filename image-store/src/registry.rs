//! Pulling from an OCI distribution registry (`/v2/` API): the manifest
//! for a tag (an index picks linux/amd64), then the config and layers, each
//! verified against its digest as it is written into the store. Anonymous,
//! basic and bearer-token auth; plain HTTP for loopback registries or when
//! asked.

use std::io::Read;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

pub use crate::Progress;
use crate::{invalid, ImageStore, ImageSummary, StoreError};

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// `[registry/]repository[:tag|@digest]`, Docker's way: no registry means
/// Docker Hub, and a one-part name there is under `library/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub reference: String,
}

impl Reference {
    pub fn parse(text: &str) -> Result<Self, StoreError> {
        let bad = || StoreError::InvalidName(text.to_string());
        if text.is_empty() || text.starts_with(['/', ':', '@']) {
            return Err(bad());
        }
        let (rest, reference) = match text.split_once('@') {
            Some((rest, digest)) => (rest, digest.to_string()),
            None => {
                let last = text.rsplit('/').next().unwrap_or(text);
                match last.split_once(':') {
                    Some((_, tag)) => (&text[..text.len() - tag.len() - 1], tag.to_string()),
                    None => (text, "latest".to_string()),
                }
            }
        };
        let (registry, repository) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ => ("registry-1.docker.io".to_string(), rest.to_string()),
        };
        let repository = if registry == "registry-1.docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let valid = !repository.is_empty()
            && repository
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b))
            && !reference.is_empty()
            && reference
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
        if !valid {
            return Err(bad());
        }
        Ok(Reference {
            registry,
            repository,
            reference,
        })
    }

    fn is_loopback(&self) -> bool {
        let host = self
            .registry
            .rsplit_once(':')
            .map_or(self.registry.as_str(), |(h, _)| h);
        matches!(host, "localhost" | "127.0.0.1" | "[::1]")
    }
}

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// user and password, for basic auth or to get a bearer token.
    pub credentials: Option<(String, String)>,
    /// Plain HTTP (always for localhost and 127.0.0.1).
    pub insecure: bool,
}

struct Session<'a> {
    agent: ureq::Agent,
    base: String,
    reference: &'a Reference,
    options: &'a PullOptions,
    token: Option<String>,
}

fn failed(what: impl Into<String>, e: impl std::fmt::Display) -> StoreError {
    invalid(what, e.to_string())
}

impl Session<'_> {
    /// GET with auth, answering a 401 challenge once.
    fn get(&mut self, path: &str, accept: Option<&str>) -> Result<ureq::Response, StoreError> {
        let url = format!("{}{path}", self.base);
        for attempt in 0..2 {
            let mut request = self.agent.get(&url);
            if let Some(accept) = accept {
                request = request.set("Accept", accept);
            }
            if let Some(token) = &self.token {
                request = request.set("Authorization", token);
            }
            match request.call() {
                Ok(response) => return Ok(response),
                Err(ureq::Error::Status(401, response)) if attempt == 0 => {
                    let challenge = response
                        .header("www-authenticate")
                        .unwrap_or("")
                        .to_string();
                    self.token = Some(self.authenticate(&challenge)?);
                }
                Err(ureq::Error::Status(404, _)) => {
                    return Err(StoreError::NotFound(format!(
                        "{}/{}:{} ({path})",
                        self.reference.registry,
                        self.reference.repository,
                        self.reference.reference
                    )))
                }
                Err(ureq::Error::Status(code, response)) => {
                    let body = response.into_string().unwrap_or_default();
                    return Err(failed(
                        format!("registry {url}"),
                        format!("HTTP {code}: {body}"),
                    ));
                }
                Err(e) => return Err(failed(format!("registry {url}"), e)),
            }
        }
        Err(failed(format!("registry {url}"), "refused the credentials"))
    }

    /// The Authorization header a challenge asks for.
    fn authenticate(&self, challenge: &str) -> Result<String, StoreError> {
        let basic = || {
            self.options.credentials.as_ref().map(|(user, password)| {
                let raw = format!("{user}:{password}");
                format!("Basic {}", BASE64.encode(raw.as_bytes()))
            })
        };
        if challenge.to_ascii_lowercase().starts_with("basic") {
            return basic().ok_or_else(|| failed("registry", "needs credentials (basic auth)"));
        }
        let Some(params) = challenge
            .strip_prefix("Bearer ")
            .or_else(|| challenge.strip_prefix("bearer "))
        else {
            return Err(failed(
                "registry",
                format!("unsupported auth challenge {challenge:?}"),
            ));
        };
        let mut realm = None;
        let mut query = Vec::new();
        for part in split_params(params) {
            let Some((key, value)) = part.split_once('=') else {
                continue;
            };
            let value = value.trim_matches('"');
            match key.trim() {
                "realm" => realm = Some(value.to_string()),
                key @ ("service" | "scope") => query.push((key.to_string(), value.to_string())),
                _ => {}
            }
        }
        if !query.iter().any(|(k, _)| k == "scope") {
            query.push((
                "scope".into(),
                format!("repository:{}:pull", self.reference.repository),
            ));
        }
        let realm =
            realm.ok_or_else(|| failed("registry", "a bearer challenge without a realm"))?;
        let mut request = self.agent.get(&realm);
        for (key, value) in &query {
            request = request.query(key, value);
        }
        if let Some(header) = basic() {
            request = request.set("Authorization", &header);
        }
        let body: serde_json::Value = request
            .call()
            .map_err(|e| failed(format!("token from {realm}"), e))?
            .into_json()
            .map_err(|e| failed(format!("token from {realm}"), e))?;
        let token = body["token"]
            .as_str()
            .or_else(|| body["access_token"].as_str())
            .ok_or_else(|| failed(format!("token from {realm}"), "no token in the answer"))?;
        Ok(format!("Bearer {token}"))
    }

    fn manifest(&mut self, reference: &str) -> Result<(Vec<u8>, String), StoreError> {
        let path = format!("/v2/{}/manifests/{reference}", self.reference.repository);
        let response = self.get(&path, Some(MANIFEST_TYPES))?;
        let media_type = response.content_type().to_string();
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(4 << 20)
            .read_to_end(&mut bytes)
            .map_err(|e| failed("manifest", e))?;
        Ok((bytes, media_type))
    }
}

/// Parameters of a challenge, split on commas outside quotes.
fn split_params(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            ',' if !quoted => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    parts
}

impl ImageStore {
    /// Pulls `reference` from its registry and tags it `name` (the
    /// reference itself by default).
    pub fn pull(
        &self,
        reference: &str,
        name: Option<&str>,
        options: &PullOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ImageSummary, StoreError> {
        let parsed = Reference::parse(reference)?;
        let scheme = if options.insecure || parsed.is_loopback() {
            "http"
        } else {
            "https"
        };
        let mut session = Session {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(std::time::Duration::from_secs(30))
                .build(),
            base: format!("{scheme}://{}", parsed.registry),
            reference: &parsed,
            options,
            token: None,
        };
        let (mut bytes, media_type) = session.manifest(&parsed.reference)?;
        if media_type.contains("index") || media_type.contains("manifest.list") {
            let index: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| failed("image index", e))?;
            let chosen = index["manifests"]
                .as_array()
                .and_then(|manifests| {
                    manifests.iter().find(|m| {
                        m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64"
                    })
                })
                .and_then(|m| m["digest"].as_str())
                .ok_or_else(|| failed(reference, "the index has no linux/amd64 image"))?
                .to_string();
            bytes = session.manifest(&chosen)?.0;
            let (digest, _) = self.put_blob(bytes.as_slice(), Some(&chosen))?;
            progress(Progress::Manifest { digest });
        } else {
            let expected = parsed
                .reference
                .starts_with("sha256:")
                .then_some(parsed.reference.as_str());
            let (digest, _) = self.put_blob(bytes.as_slice(), expected)?;
            progress(Progress::Manifest { digest });
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| failed("manifest", e))?;
        let mut blobs = vec![manifest["config"].clone()];
        blobs.extend(manifest["layers"].as_array().cloned().unwrap_or_default());
        for blob in &blobs {
            let digest = blob["digest"]
                .as_str()
                .ok_or_else(|| failed("manifest", "a blob without a digest"))?;
            let size = blob["size"].as_u64().unwrap_or(0);
            if self.has_blob(digest) {
                progress(Progress::Blob {
                    digest: digest.to_string(),
                    size,
                    already_present: true,
                });
                continue;
            }
            let response =
                session.get(&format!("/v2/{}/blobs/{digest}", parsed.repository), None)?;
            self.put_blob(response.into_reader(), Some(digest))?;
            progress(Progress::Blob {
                digest: digest.to_string(),
                size,
                already_present: false,
            });
        }
        let manifest_digest = capsa_layers::Digest::of(&bytes).to_string();
        let name = match name {
            Some(name) => crate::normalize_name(name)?,
            None => {
                let full = format!(
                    "{}/{}:{}",
                    parsed.registry, parsed.repository, parsed.reference
                );
                crate::normalize_name(&full.replace('@', ":"))?
            }
        };
        let digest_value = manifest_digest
            .parse::<oci_spec::image::Digest>()
            .map_err(|e| failed("manifest digest", e))?;
        let descriptor = oci_spec::image::Descriptor::new(
            oci_spec::image::MediaType::ImageManifest,
            bytes.len() as u64,
            digest_value,
        );
        self.tag(&name, &descriptor)?;
        self.summary(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_follow_dockers_rules() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("registry-1.docker.io", "library/busybox", "latest")
        );
        let r = Reference::parse("127.0.0.1:5000/team/app:v2").unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("127.0.0.1:5000", "team/app", "v2")
        );
        assert!(r.is_loopback());
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("ghcr.io/o/i@{digest}")).unwrap();
        assert_eq!(r.reference, digest);
        for bad in ["", "UPPER/case", "a b", "x:"] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn challenges_split_outside_quotes() {
        let parts = split_params(
            r#"realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(parts.len(), 3);
        assert!(parts[2].ends_with(r#"pull,push""#));
    }
}
