//! `capsa cp`: a file or directory into a running container, or out of
//! one, by docker cp's rules. One side is `GROUP[/CONTAINER]:PATH`; `-`
//! for the other is a tar on stdin or stdout. What comes out of a guest is
//! unpacked here, by this command's user, and checked entry by entry
//! (capsa-copy): nothing lands outside the destination, and nothing but
//! files, directories and symbolic links is made.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use hyper::Method;

use capsa_cli::client::Client;

/// `GROUP[/CONTAINER]:PATH`, where the part before the colon is a name
/// (a host path with a colon is written `./a:b`).
struct InContainer<'a> {
    target: &'a str,
    path: &'a str,
}

fn in_container(text: &str) -> Option<InContainer<'_>> {
    let (target, path) = text.split_once(':')?;
    let name = |part: &str| capsa_api::spec::valid_name(part);
    let valid = match target.split_once('/') {
        Some((group, container)) => name(group) && name(container),
        None => name(target),
    };
    (valid && !path.is_empty()).then_some(InContainer { target, path })
}

fn archive_path(group: &str, container: &str, path: &str) -> String {
    let path = percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC);
    format!("/v1/groups/{group}/containers/{container}/archive?path={path}")
}

pub fn run(
    client: &Client,
    source: &str,
    destination: &str,
    target: impl Fn(&Client, &str) -> Result<(String, String)>,
) -> Result<u8> {
    match (in_container(source), in_container(destination)) {
        (Some(_), Some(_)) => {
            bail!("copy between a container and this host; not between two containers")
        }
        (None, None) => {
            bail!("one side must be GROUP[/CONTAINER]:PATH (a host path with a colon: ./{source})")
        }
        (Some(from), None) => {
            let (group, container) = target(client, from.target)?;
            let mut archive = Vec::new();
            client.stream(&archive_path(&group, &container, from.path), |chunk| {
                archive.extend_from_slice(chunk);
                Ok(())
            })?;
            if destination == "-" {
                std::io::stdout().lock().write_all(&archive)?;
                return Ok(0);
            }
            capsa_copy::unpack(&archive[..], Path::new(destination)).with_context(|| {
                format!("copying {}:{} to {destination}", from.target, from.path)
            })?;
            Ok(0)
        }
        (None, Some(to)) => {
            let (group, container) = target(client, to.target)?;
            let archive = if source == "-" {
                let mut archive = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut archive)?;
                archive
            } else {
                let mut archive = Vec::new();
                capsa_copy::pack(Path::new(source), &mut archive)
                    .with_context(|| format!("packing {source}"))?;
                archive
            };
            let _: serde_json::Value = client.call_bytes(
                Method::PUT,
                &archive_path(&group, &container, to.path),
                archive,
                "application/x-tar",
            )?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_side_is_a_name_a_colon_and_a_path() {
        let side = in_container("web:/etc/hosts").unwrap();
        assert_eq!((side.target, side.path), ("web", "/etc/hosts"));
        let side = in_container("web/sidecar:data").unwrap();
        assert_eq!((side.target, side.path), ("web/sidecar", "data"));
        for host in ["./a:b", "/tmp/x:y", "file", "web:", "Web:/x", "-"] {
            assert!(in_container(host).is_none(), "{host}");
        }
        assert_eq!(
            archive_path("web", "main", "/a b&c"),
            "/v1/groups/web/containers/main/archive?path=%2Fa%20b%26c"
        );
    }
}
