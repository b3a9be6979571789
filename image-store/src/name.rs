//! Image names as docker users type them, parsed by oci-spec's
//! distribution reference: `busybox` is `docker.io/library/busybox:latest`,
//! `reg:5000/team/app:v2` keeps its registry, and `name:tag@digest` or
//! `name@digest` pin the manifest.

use oci_spec::distribution::Reference;

use crate::StoreError;

/// Docker Hub as a reference names it, and where its API is served.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    reference: Reference,
}

impl ImageName {
    pub fn parse(text: &str) -> Result<Self, StoreError> {
        let invalid = |reason: String| StoreError::InvalidName {
            name: text.to_string(),
            reason,
        };
        let reference = text
            .parse::<Reference>()
            .map_err(|e| invalid(e.to_string()))?;
        // The grammar lets a first component without a dot pass as a
        // registry; docker then refuses its capitals in the repository.
        if reference
            .repository()
            .bytes()
            .any(|b| b.is_ascii_uppercase())
        {
            return Err(invalid("repository name must be lowercase".into()));
        }
        Ok(ImageName { reference })
    }

    /// The name the store tags the image with: `registry/repository:tag`,
    /// or `registry/repository@digest` when only a digest was given.
    pub fn key(&self) -> String {
        let r = &self.reference;
        match (r.tag(), r.digest()) {
            (Some(tag), _) => format!("{}/{}:{tag}", r.registry(), r.repository()),
            (None, Some(digest)) => format!("{}/{}@{digest}", r.registry(), r.repository()),
            (None, None) => format!("{}/{}:latest", r.registry(), r.repository()),
        }
    }

    /// `registry/repository`, what every tag of the image shares.
    pub fn repository_key(&self) -> String {
        format!(
            "{}/{}",
            self.reference.registry(),
            self.reference.repository()
        )
    }

    /// The manifest digest the name pins, if it does.
    pub fn digest(&self) -> Option<&str> {
        self.reference.digest()
    }

    /// The registry as the name gives it (`docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        self.reference.registry()
    }

    /// Where the registry's `/v2/` API is served.
    pub fn registry_host(&self) -> &str {
        match self.reference.registry() {
            DOCKER_HUB => DOCKER_HUB_API,
            other => other,
        }
    }

    pub fn is_docker_hub(&self) -> bool {
        self.reference.registry() == DOCKER_HUB
    }

    pub fn repository(&self) -> &str {
        self.reference.repository()
    }

    /// What a pull asks the registry for: the digest when pinned, else the
    /// tag.
    pub fn remote_reference(&self) -> &str {
        self.reference
            .digest()
            .or(self.reference.tag())
            .unwrap_or("latest")
    }

    /// The key as docker shows it: Docker Hub's `docker.io/` and
    /// `library/` left out.
    pub fn familiar(&self) -> String {
        familiar(&self.key())
    }

    /// A registry on this host, reached over plain HTTP.
    pub fn is_loopback(&self) -> bool {
        let registry = self.reference.registry();
        let host = match registry.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => registry,
        };
        matches!(host, "localhost" | "127.0.0.1" | "[::1]")
    }
}

/// `key` without Docker Hub's prefixes.
pub fn familiar(key: &str) -> String {
    let short = key.strip_prefix("docker.io/").unwrap_or(key);
    short.strip_prefix("library/").unwrap_or(short).to_string()
}

/// The store's key for `name` (see `ImageName::key`).
pub fn normalize_name(name: &str) -> Result<String, StoreError> {
    Ok(ImageName::parse(name)?.key())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dockers_rules() {
        let cases = [
            (
                "busybox",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "busybox:1.36",
                "docker.io/library/busybox:1.36",
                "busybox:1.36",
            ),
            ("team/app", "docker.io/team/app:latest", "team/app:latest"),
            (
                "127.0.0.1:5000/team/app:v2",
                "127.0.0.1:5000/team/app:v2",
                "127.0.0.1:5000/team/app:v2",
            ),
            (
                "localhost/app",
                "localhost/app:latest",
                "localhost/app:latest",
            ),
        ];
        for (typed, key, shown) in cases {
            let name = ImageName::parse(typed).unwrap();
            assert_eq!(name.key(), key, "{typed}");
            assert_eq!(name.familiar(), shown, "{typed}");
        }
        let name = ImageName::parse("busybox").unwrap();
        assert_eq!(name.registry_host(), "registry-1.docker.io");
        assert_eq!(name.repository(), "library/busybox");
        assert_eq!(name.remote_reference(), "latest");
        assert!(ImageName::parse("127.0.0.1:5000/a").unwrap().is_loopback());
        assert!(!ImageName::parse("ghcr.io/a").unwrap().is_loopback());
    }

    #[test]
    fn digests_pin_the_manifest() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let both = ImageName::parse(&format!("busybox:1.36@{digest}")).unwrap();
        assert_eq!(both.key(), "docker.io/library/busybox:1.36");
        assert_eq!(both.digest(), Some(digest.as_str()));
        assert_eq!(both.remote_reference(), digest);
        let only = ImageName::parse(&format!("ghcr.io/o/i@{digest}")).unwrap();
        assert_eq!(only.key(), format!("ghcr.io/o/i@{digest}"));
        assert_eq!(only.repository_key(), "ghcr.io/o/i");
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        for bad in [
            "",
            "UPPER/case",
            "a b",
            "x:",
            "../x",
            "-x",
            "a/../b",
            "busybox@sha256:12",
        ] {
            let e = ImageName::parse(bad).unwrap_err();
            assert!(matches!(e, StoreError::InvalidName { .. }), "{bad:?}");
            assert!(!e.to_string().contains("ParseError"), "{e}");
        }
    }
}
