//! Signal proxying for attached runs, as docker's `--sig-proxy`: SIGINT
//! and SIGTERM sent to this command go to the container's main process
//! instead of ending the command; a third SIGINT ends it (the container
//! goes on, and capsad still removes an `--rm` group when it exits).

use hyper::Method;
use nix::sys::signal::{SigSet, Signal};

use capsa_cli::client::{Client, Endpoint};

/// From now on SIGINT and SIGTERM are forwarded to `container` of
/// `group`. Call it before any thread starts: the signals are blocked in
/// this thread and in every thread it starts, and taken by one of ours.
pub fn proxy(endpoint: Endpoint, group: String, container: String) {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if signals.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        let mut interrupts = 0;
        while let Ok(signal) = signals.wait() {
            if signal == Signal::SIGINT {
                interrupts += 1;
                if interrupts >= 3 {
                    eprintln!("capsa: interrupted three times: leaving {group} running");
                    std::process::exit(130);
                }
            }
            let path = format!(
                "/v1/groups/{group}/containers/{container}/kill?signal={}",
                signal as i32
            );
            let sent = Client::to(endpoint.clone())
                .and_then(|client| client.call::<serde_json::Value>(Method::POST, &path, None));
            if let Err(e) = sent {
                eprintln!("capsa: passing {signal} on to {group}/{container}: {e:#}");
            }
        }
    });
}
