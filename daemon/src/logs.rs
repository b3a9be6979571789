//! Container logs on the host: JSON lines (time, stream, line) appended as
//! output arrives from the guest, rotated by size (`NAME.log` becomes
//! `NAME.log.1`), read back and followed for `logs`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use capsa_api::LogLine;
use capsa_protocol::stdio::ack;

use crate::state::now_ms;

/// A log is rotated when it grows past this.
pub const ROTATE_BYTES: u64 = 16 << 20;

/// Appends lines to one container's log; shared by its stdout and stderr
/// copiers.
pub struct LogWriter {
    path: PathBuf,
    file: Mutex<File>,
}

impl LogWriter {
    pub fn open(path: &Path) -> io::Result<Arc<Self>> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Arc::new(LogWriter {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, stream: &str, line: &str) -> io::Result<()> {
        let record = LogLine {
            time: now_ms(),
            stream: stream.to_string(),
            line: line.to_string(),
        };
        let mut text = serde_json::to_string(&record).map_err(io::Error::other)?;
        text.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(text.as_bytes())?;
        if file.metadata()?.len() > ROTATE_BYTES {
            let rotated = self.path.with_extension("log.1");
            fs::rename(&self.path, &rotated)?;
            *file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        Ok(())
    }

    /// Copies an acked stdio stream into the log line by line until it
    /// ends, a last line without a newline too. Bytes are acknowledged
    /// once their lines are written, so the agent resends, after a restart
    /// of the daemon, what never reached the log.
    pub fn copy(&self, stream: &str, source: impl Read + Write) -> io::Result<()> {
        let mut reader = BufReader::new(source);
        let mut buffer = Vec::new();
        let mut kept = 0u64;
        loop {
            buffer.clear();
            if reader.read_until(b'\n', &mut buffer)? == 0 {
                return ack(reader.get_mut(), kept);
            }
            let text = String::from_utf8_lossy(&buffer);
            self.append(stream, text.strip_suffix('\n').unwrap_or(&text))?;
            kept += buffer.len() as u64;
            // One acknowledgement per batch the guest sent, not per line.
            if reader.buffer().is_empty() {
                ack(reader.get_mut(), kept)?;
            }
        }
    }
}

/// The log's lines, oldest first (the rotated file's, then the current
/// one's), keeping the last `tail` when given and those at or after
/// `since` (unix ms).
pub fn read(
    path: &Path,
    tail: Option<usize>,
    since: Option<u64>,
) -> io::Result<(Vec<LogLine>, u64)> {
    let mut lines = Vec::new();
    let rotated = path.with_extension("log.1");
    if rotated.exists() {
        read_lines(&rotated, 0, &mut lines)?;
    }
    let offset = if path.exists() {
        read_lines(path, 0, &mut lines)?
    } else {
        0
    };
    if let Some(since) = since {
        lines.retain(|l| l.time >= since);
    }
    if let Some(tail) = tail {
        let skip = lines.len().saturating_sub(tail);
        lines.drain(..skip);
    }
    Ok((lines, offset))
}

/// Reads whole lines of `path` from `offset`; returns the offset after the
/// last whole line.
pub fn read_lines(path: &Path, offset: u64, out: &mut Vec<LogLine>) -> io::Result<u64> {
    let mut file = File::open(path)?;
    if file.metadata()?.len() < offset {
        // Rotated meanwhile: start over on the new file.
        return read_lines(path, 0, out);
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::new(file);
    let mut position = offset;
    let mut buffer = String::new();
    loop {
        buffer.clear();
        let n = reader.read_line(&mut buffer)?;
        if n == 0 || !buffer.ends_with('\n') {
            return Ok(position);
        }
        position += n as u64;
        if let Ok(line) = serde_json::from_str(&buffer) {
            out.push(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_with_tail_and_partial_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let writer = LogWriter::open(&path).unwrap();
        for (stream, output) in [("stdout", &b"one\ntwo\nthree"[..]), ("stderr", b"oops\n")] {
            let (mut guest, host) = std::os::unix::net::UnixStream::pair().unwrap();
            guest.write_all(output).unwrap();
            guest.shutdown(std::net::Shutdown::Write).unwrap();
            writer.copy(stream, host).unwrap();
            let mut acks = Vec::new();
            guest.read_to_end(&mut acks).unwrap();
            let last = acks.rchunks(8).next().unwrap();
            let kept = u64::from_le_bytes(last.try_into().unwrap());
            assert_eq!(kept, output.len() as u64, "all of {stream} acknowledged");
        }
        let (all, offset) = read(&path, None, None).unwrap();
        let text: Vec<(&str, &str)> = all
            .iter()
            .map(|l| (l.stream.as_str(), l.line.as_str()))
            .collect();
        assert_eq!(
            text,
            [
                ("stdout", "one"),
                ("stdout", "two"),
                ("stdout", "three"),
                ("stderr", "oops")
            ]
        );
        assert_eq!(offset, fs::metadata(&path).unwrap().len());
        let (last, _) = read(&path, Some(1), None).unwrap();
        assert_eq!(last[0].line, "oops");
    }
}
