//! The serial console's output side: a sink (stdout or a file) plus a tail
//! of the most recent output, kept so a crash can be reported with context.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// How much recent console output is kept for crash reports.
pub const TAIL_BYTES: usize = 16 * 1024;
/// How much of the guest's console reaches the sink: a guest prints as
/// much as it likes, the host's disk is not its to fill. Past this the
/// sink gets one line saying so; the tail still follows the guest.
pub const CONSOLE_LIMIT_BYTES: u64 = 64 << 20;

/// The last `TAIL_BYTES` the guest wrote to its console.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    fn push(&self, bytes: &[u8]) {
        let mut tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        tail.extend(bytes);
        let excess = tail.len().saturating_sub(TAIL_BYTES);
        tail.drain(..excess);
    }

    pub fn text(&self) -> String {
        let tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = tail.as_slices();
        let mut bytes = Vec::with_capacity(tail.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The last `lines` lines of the tail.
    pub fn last_lines(&self, lines: usize) -> String {
        let text = self.text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// The writer the 8250 emulation sends guest output to.
pub struct ConsoleWriter {
    sink: Box<dyn Write + Send>,
    tail: ConsoleTail,
    sink_failed: bool,
    /// What the sink may still take.
    room: u64,
}

impl ConsoleWriter {
    pub fn new(sink: Box<dyn Write + Send>, tail: ConsoleTail) -> Self {
        Self::bounded(sink, tail, CONSOLE_LIMIT_BYTES)
    }

    fn bounded(sink: Box<dyn Write + Send>, tail: ConsoleTail, limit: u64) -> Self {
        Self {
            sink,
            tail,
            sink_failed: false,
            room: limit,
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tail.push(buf);
        // A closed stdout or a full disk must not stop the guest: keep the
        // tail, report the failure once, and drop further output.
        if !self.sink_failed {
            let fits = buf
                .len()
                .min(usize::try_from(self.room).unwrap_or(usize::MAX));
            self.room -= fits as u64;
            let written = self.sink.write_all(&buf[..fits]).and_then(|()| {
                if fits < buf.len() {
                    self.sink.write_all(
                        b"\n[capsa-vmm: the console reached its limit; further output is dropped]\n",
                    )?;
                    self.sink.flush()?;
                    return Err(io::Error::other("the console reached its limit"));
                }
                Ok(())
            });
            if let Err(e) = written {
                self.sink_failed = true;
                eprintln!("capsa-vmm: console output lost from here on: {e}");
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.sink_failed && self.sink.flush().is_err() {
            self.sink_failed = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("gone"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::other("gone"))
        }
    }

    #[test]
    fn tail_keeps_only_the_most_recent_bytes() {
        let tail = ConsoleTail::default();
        let mut writer = ConsoleWriter::new(Box::new(io::sink()), tail.clone());
        for _ in 0..TAIL_BYTES {
            writer.write_all(b"x").unwrap();
        }
        writer.write_all(b"\nlast line\n").unwrap();
        assert_eq!(tail.text().len(), TAIL_BYTES);
        assert_eq!(tail.last_lines(1), "last line");
    }

    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<u8>>>);
    impl Write for Kept {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_sink_gets_at_most_its_limit_and_a_line_saying_so() {
        let tail = ConsoleTail::default();
        let kept = Kept::default();
        let mut writer = ConsoleWriter::bounded(Box::new(kept.clone()), tail.clone(), 10);
        writer.write_all(b"0123456").unwrap();
        writer.write_all(b"789abcdef").unwrap();
        writer.write_all(b"more\n").unwrap();
        let sunk = String::from_utf8(kept.0.lock().unwrap().clone()).unwrap();
        assert!(
            sunk.starts_with("0123456789\n[capsa-vmm: the console reached its limit"),
            "{sunk}"
        );
        assert!(!sunk.contains("abc") && !sunk.contains("more"), "{sunk}");
        assert!(tail.text().ends_with("abcdefmore\n"));
    }

    #[test]
    fn a_failing_sink_never_fails_the_guest() {
        let tail = ConsoleTail::default();
        let mut writer = ConsoleWriter::new(Box::new(Broken), tail.clone());
        writer.write_all(b"still recorded\n").unwrap();
        writer.flush().unwrap();
        assert_eq!(tail.text(), "still recorded\n");
    }
}
