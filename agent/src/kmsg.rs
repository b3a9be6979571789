//! Messages into the kernel log. PID 1's stderr is a tty whose output the
//! UART sends asynchronously and loses if the kernel panics first (which it
//! does the moment PID 1 exits), while kernel log lines reach the console
//! synchronously. Fatal errors therefore go to both.

use std::io::Write;

/// Kernel log level "err".
const LEVEL_ERR: u8 = 3;

pub fn error(message: &str) {
    // Not eprintln!: it panics when stderr is gone, and this runs in the
    // panic hook.
    let _ = writeln!(std::io::stderr(), "capsa-agent: {message}");
    if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        // One write per record: the kernel takes each write as one line.
        let _ = kmsg.write_all(format!("<{LEVEL_ERR}>capsa-agent: {message}\n").as_bytes());
    }
}

/// Routes panics through `error` so they are seen even as PID 1.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| error(&format!("panic: {info}"))));
}
