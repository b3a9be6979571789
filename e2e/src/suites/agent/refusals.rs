//! The agent's refusals: bad requests, oversized messages, corrupt layers.

use std::io::{Read, Write};

use anyhow::{bail, ensure, Context, Result};
use capsa_guest_client::{Guest, GuestError, Streams};
use capsa_protocol::stdio::StreamKind;
use ttrpc::Code;

use super::scenarios::Check;

pub(super) fn expect_code<T: std::fmt::Debug>(
    result: std::result::Result<T, GuestError>,
    code: Code,
    what: &str,
) -> Result<()> {
    match result {
        Err(e) if e.code() == Some(code) => Ok(()),
        other => bail!("{what}: expected {code:?}, got {other:?}"),
    }
}

pub(super) fn bad_requests(check: &Check) -> Result<String> {
    let guest = &check.guest;
    expect_code(
        guest.create_raw(
            "bad",
            &check.chain,
            b"{not json".to_vec(),
            Streams::default(),
        ),
        Code::INVALID_ARGUMENT,
        "a spec that is not JSON",
    )?;
    expect_code(
        guest.create("bad", &check.chain, &check.spec(&[])?, Streams::default()),
        Code::INVALID_ARGUMENT,
        "a spec without args",
    )?;
    expect_code(
        guest.create(
            "../bad",
            &check.chain,
            &check.spec(&["true"])?,
            Streams::default(),
        ),
        Code::INVALID_ARGUMENT,
        "an id with a slash",
    )?;
    let unknown_chain = format!("sha256:{}", "0".repeat(64));
    expect_code(
        guest.create(
            "bad",
            &unknown_chain,
            &check.spec(&["true"])?,
            Streams::default(),
        ),
        Code::FAILED_PRECONDITION,
        "an image that was never sent",
    )?;
    expect_code(
        guest.start("nobody"),
        Code::NOT_FOUND,
        "starting an unknown container",
    )?;
    expect_code(
        guest.wait("nobody", ""),
        Code::NOT_FOUND,
        "waiting for an unknown container",
    )?;
    expect_code(
        guest.signal("nobody", "", 9),
        Code::NOT_FOUND,
        "signalling an unknown container",
    )?;
    let attached = guest.attach("nobody", "", StreamKind::Stdout);
    ensure!(
        attached.is_err(),
        "attached to an unknown container's stdout"
    );
    oversized_message(guest)?;
    guest.ping().context("the agent stopped answering")?;
    Ok("each refused with the right code; the agent still answers".into())
}

/// A ttrpc frame longer than the protocol allows, written by hand (the
/// client library refuses to send one): the agent must answer with an
/// error and keep serving.
fn oversized_message(guest: &Guest) -> Result<()> {
    let mut stream =
        capsa_protocol::vmm_socket::connect(guest.socket(), capsa_protocol::AGENT_VSOCK_PORT)?;
    let length = ttrpc::proto::MESSAGE_LENGTH_MAX + 1;
    let mut header = Vec::new();
    header.extend_from_slice(&(length as u32).to_be_bytes());
    header.extend_from_slice(&1u32.to_be_bytes());
    header.push(ttrpc::proto::MESSAGE_TYPE_REQUEST);
    header.push(0);
    stream.write_all(&header)?;
    let zeros = vec![0u8; 64 * 1024];
    let mut left = length;
    while left > 0 {
        let n = left.min(zeros.len());
        stream.write_all(&zeros[..n])?;
        left -= n;
    }
    let mut reply_header = [0u8; ttrpc::proto::MESSAGE_HEADER_LENGTH];
    stream.read_exact(&mut reply_header)?;
    let reply_length = u32::from_be_bytes(reply_header[..4].try_into()?) as usize;
    ensure!(
        reply_header[8] == ttrpc::proto::MESSAGE_TYPE_RESPONSE && reply_length < 4096,
        "unexpected reply header {reply_header:?}"
    );
    let mut payload = vec![0u8; reply_length];
    stream.read_exact(&mut payload)?;
    let response: ttrpc::Response = protobuf::Message::parse_from_bytes(&payload)?;
    ensure!(
        response.status.code() == Code::INVALID_ARGUMENT,
        "oversized message answered with {:?}",
        response.status
    );
    Ok(())
}

pub(super) fn corrupt_layer(check: &Check) -> Result<String> {
    let guest = &check.guest;
    let layer = &check.image.layers[0];
    let blob = std::fs::read(&layer.path)?;
    let mut corrupt = blob.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0xff;
    // A parent that is not there: a fresh chain, so the agent must unpack.
    let started = guest.agent().start_layer(
        ttrpc::context::with_timeout(30_000_000_000),
        &capsa_protocol::agent::StartLayerRequest {
            digest: layer.digest.clone(),
            diff_id: format!("sha256:{}", "1".repeat(64)),
            media_type: layer.media_type.clone(),
            size: layer.size,
            parent_chain_id: String::new(),
            ..Default::default()
        },
    )?;
    ensure!(
        !started.already_present,
        "a made-up diff id was already present"
    );
    let sent = guest.send_blob(started.upload_id, corrupt.as_slice());
    let committed = sent.and_then(|()| {
        guest
            .agent()
            .commit_layer(
                ttrpc::context::with_timeout(30_000_000_000),
                &capsa_protocol::agent::CommitLayerRequest {
                    upload_id: started.upload_id,
                    ..Default::default()
                },
            )
            .map_err(|source| GuestError::Call {
                call: "CommitLayer",
                source,
            })
    });
    let message = match committed {
        Err(e) if e.code() == Some(Code::DATA_LOSS) => e.to_string(),
        other => bail!("a corrupt blob: expected DATA_LOSS, got {other:?}"),
    };
    ensure!(message.contains(&layer.digest), "{message}");
    guest.ping().context("the agent stopped answering")?;
    Ok("refused with DATA_LOSS naming the digest".into())
}
