//! Pulling from an OCI distribution registry (`/v2/` API): the manifest
//! for a tag (an index picks linux/amd64), then the config and layers, each
//! verified against its digest as it is written into the store. Anonymous,
//! basic and bearer-token auth; plain HTTP for loopback registries or when
//! asked.

use std::io::Read;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

pub use crate::Progress;
use crate::{invalid, ImageName, ImageStore, ImageSummary, StoreError};

const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// user and password, for basic auth or to get a bearer token.
    pub credentials: Option<(String, String)>,
    /// Plain HTTP (always for localhost and 127.0.0.1).
    pub insecure: bool,
    /// Docker Hub mirrors (`http://host:port` or `https://host`), asked in
    /// order before Docker Hub itself, as docker's `registry-mirrors`.
    pub mirrors: Vec<String>,
}

/// A request's body and its length, made afresh for each try.
type Body = (Box<dyn Read>, u64);

struct Session<'a> {
    agent: ureq::Agent,
    base: String,
    name: &'a ImageName,
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
                        "{} ({}{path})",
                        self.name.familiar(),
                        self.base
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

    /// A request other than a GET (a push's), with auth as `get` has it:
    /// a 401 is answered once, `body` made again for the retry.
    fn send(
        &mut self,
        method: &str,
        url: &str,
        content_type: Option<&str>,
        body: &dyn Fn() -> Result<Option<Body>, StoreError>,
    ) -> Result<ureq::Response, StoreError> {
        for attempt in 0..2 {
            let mut request = self.agent.request(method, url);
            if let Some(token) = &self.token {
                request = request.set("Authorization", token);
            }
            if let Some(content_type) = content_type {
                request = request.set("Content-Type", content_type);
            }
            let answer = match body()? {
                Some((reader, length)) => request
                    .set("Content-Length", &length.to_string())
                    .send(reader),
                None => request.call(),
            };
            match answer {
                Ok(response) => return Ok(response),
                Err(ureq::Error::Status(401, response)) if attempt == 0 => {
                    let challenge = response
                        .header("www-authenticate")
                        .unwrap_or("")
                        .to_string();
                    self.token = Some(self.authenticate(&challenge)?);
                }
                Err(ureq::Error::Status(code, response)) => {
                    let body = response.into_string().unwrap_or_default();
                    return Err(failed(
                        format!("registry: {method} {url}"),
                        format!(
                            "HTTP {code}: {}",
                            body.chars().take(500).collect::<String>()
                        ),
                    ));
                }
                Err(e) => return Err(failed(format!("registry: {method} {url}"), e)),
            }
        }
        Err(failed(format!("registry {url}"), "refused the credentials"))
    }

    /// An absolute URL for a Location header the registry gave.
    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{location}", self.base)
        }
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
                format!("repository:{}:pull", self.name.repository()),
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
        let path = format!("/v2/{}/manifests/{reference}", self.name.repository());
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
    /// The first endpoint that has `name`'s manifest: the mirrors in order
    /// for Docker Hub names, then the name's own registry. Every endpoint's
    /// refusal is in the error when none has it.
    fn find_manifest<'a>(
        &self,
        name: &'a ImageName,
        options: &'a PullOptions,
    ) -> Result<(Session<'a>, (Vec<u8>, String)), StoreError> {
        let scheme = if options.insecure || name.is_loopback() {
            "http"
        } else {
            "https"
        };
        let mut endpoints: Vec<String> = Vec::new();
        if name.is_docker_hub() {
            endpoints.extend(
                options
                    .mirrors
                    .iter()
                    .map(|m| m.trim_end_matches('/').to_string()),
            );
        }
        endpoints.push(format!("{scheme}://{}", name.registry_host()));
        let mut refusals = Vec::new();
        let last = endpoints.len() - 1;
        for (i, base) in endpoints.into_iter().enumerate() {
            let mut session = Session {
                agent: ureq::AgentBuilder::new()
                    .timeout_connect(std::time::Duration::from_secs(30))
                    .build(),
                base,
                name,
                options,
                token: None,
            };
            match session.manifest(name.remote_reference()) {
                Ok(found) => return Ok((session, found)),
                Err(e) if i == last && refusals.is_empty() => return Err(e),
                Err(e) => refusals.push(format!("{}: {e}", session.base)),
            }
        }
        Err(failed(
            format!("pulling {}", name.familiar()),
            refusals.join("; "),
        ))
    }

    /// Whether `registry` (host[:port], `docker.io` for Docker Hub) takes
    /// `options`' credentials: docker login's check, `GET /v2/` answered
    /// once they are given (as basic auth, or for a bearer token).
    pub fn check_login(registry: &str, options: &PullOptions) -> Result<(), StoreError> {
        if options.credentials.is_none() {
            return Err(failed(registry, "give a user name and a password"));
        }
        let name = ImageName::parse(&format!("{registry}/library/login-check"))?;
        if name.registry() != registry {
            return Err(failed(
                registry,
                "not a registry host (host, host:port or docker.io)",
            ));
        }
        let scheme = if options.insecure || name.is_loopback() {
            "http"
        } else {
            "https"
        };
        let mut session = Session {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(std::time::Duration::from_secs(30))
                .timeout(std::time::Duration::from_secs(60))
                .build(),
            base: format!("{scheme}://{}", name.registry_host()),
            name: &name,
            options,
            // Credentials from the start: a registry open to anyone must
            // still be told them, as docker's check does.
            token: None,
        };
        let challenge = session.agent.get(&format!("{}/v2/", session.base)).call();
        match challenge {
            Ok(_) => Ok(()),
            Err(ureq::Error::Status(401, response)) => {
                let challenge = response
                    .header("www-authenticate")
                    .unwrap_or("")
                    .to_string();
                session.token = Some(session.authenticate(&challenge)?);
                session.get("/v2/", None).map(|_| ()).map_err(|e| match e {
                    StoreError::NotFound(_) => failed(registry, "has no /v2/ API"),
                    other => other,
                })
            }
            Err(e) => Err(failed(format!("registry {}", session.base), e)),
        }
    }

    /// Pushes the image `name` of the store to `target` (a reference with
    /// its registry): each blob the registry lacks, then the manifest.
    pub fn push(
        &self,
        name: &str,
        target: &str,
        options: &PullOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<String, StoreError> {
        let summary = self.summary(name)?;
        let destination = ImageName::parse(target)?;
        let scheme = if options.insecure || destination.is_loopback() {
            "http"
        } else {
            "https"
        };
        let mut session = Session {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(std::time::Duration::from_secs(30))
                .build(),
            base: format!("{scheme}://{}", destination.registry_host()),
            name: &destination,
            options,
            token: None,
        };
        let repository = destination.repository();
        let manifest_bytes = self.read_blob(&summary.manifest_digest)?;
        let manifest = self.manifest(&summary.manifest_digest)?;
        let mut blobs = vec![(
            manifest.config().digest().to_string(),
            manifest.config().size(),
        )];
        blobs.extend(
            manifest
                .layers()
                .iter()
                .map(|layer| (layer.digest().to_string(), layer.size())),
        );
        for (digest, size) in blobs {
            let blob_url = format!("{}/v2/{repository}/blobs/{digest}", session.base);
            let mut head = session.agent.head(&blob_url);
            if let Some(token) = &session.token {
                head = head.set("Authorization", token);
            }
            // Not there, or not to be known without credentials: sent.
            let present = head.call().is_ok();
            if present {
                progress(Progress::Blob {
                    digest,
                    size,
                    already_present: true,
                });
                continue;
            }
            let uploads = format!("{}/v2/{repository}/blobs/uploads/", session.base);
            let started = session.send("POST", &uploads, None, &|| {
                Ok(Some((Box::new(std::io::empty()) as Box<dyn Read>, 0)))
            })?;
            let location = started
                .header("location")
                .ok_or_else(|| failed(&uploads, "no Location for the upload"))?
                .to_string();
            let location = session.absolute(&location);
            let separator = if location.contains('?') { '&' } else { '?' };
            let put_url = format!("{location}{separator}digest={digest}");
            let path = self.blob_path(&digest)?;
            session.send("PUT", &put_url, Some("application/octet-stream"), &|| {
                let file = std::fs::File::open(&path).map_err(crate::io_error("reading", &path))?;
                let length = file.metadata().map_or(size, |m| m.len());
                Ok(Some((Box::new(file) as Box<dyn Read>, length)))
            })?;
            progress(Progress::Blob {
                digest,
                size,
                already_present: false,
            });
        }
        let media_type = serde_json::from_slice::<serde_json::Value>(&manifest_bytes)
            .ok()
            .and_then(|m| m["mediaType"].as_str().map(str::to_string))
            .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_string());
        let manifest_url = format!(
            "{}/v2/{repository}/manifests/{}",
            session.base,
            destination.remote_reference()
        );
        session.send("PUT", &manifest_url, Some(&media_type), &|| {
            Ok(Some((
                Box::new(std::io::Cursor::new(manifest_bytes.clone())) as Box<dyn Read>,
                manifest_bytes.len() as u64,
            )))
        })?;
        progress(Progress::Manifest {
            digest: summary.manifest_digest.clone(),
        });
        Ok(summary.manifest_digest)
    }

    /// Pulls `reference` from its registry and tags it `name` (the
    /// reference itself by default).
    pub fn pull(
        &self,
        reference: &str,
        name: Option<&str>,
        options: &PullOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ImageSummary, StoreError> {
        let parsed = ImageName::parse(reference)?;
        let (mut session, (mut bytes, media_type)) = self.find_manifest(&parsed, options)?;
        if media_type.contains("index") || media_type.contains("manifest.list") {
            if let Some(pinned) = parsed.digest() {
                let actual = capsa_layers::Digest::of(&bytes);
                if actual.to_string() != pinned {
                    return Err(StoreError::DigestMismatch {
                        expected: pinned.to_string(),
                        actual,
                    });
                }
            }
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
            let expected = parsed.digest();
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
                session.get(&format!("/v2/{}/blobs/{digest}", parsed.repository()), None)?;
            let counted =
                crate::Counting::new(response.into_reader(), digest, size, &mut *progress);
            self.put_blob(counted, Some(digest))?;
            progress(Progress::Blob {
                digest: digest.to_string(),
                size,
                already_present: false,
            });
        }
        let manifest_digest = capsa_layers::Digest::of(&bytes).to_string();
        let name = match name {
            Some(name) => crate::normalize_name(name)?,
            None => parsed.key(),
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
    fn challenges_split_outside_quotes() {
        let parts = split_params(
            r#"realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(parts.len(), 3);
        assert!(parts[2].ends_with(r#"pull,push""#));
    }
}
