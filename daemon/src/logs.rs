//! Container logs on the host: JSON lines (time, stream, line, and where
//! in the guest's stream the line ends) appended as output arrives from
//! the guest, rotated by size (`NAME.log` becomes `NAME.log.1`), read back
//! and followed for `logs`.
//!
//! Each line is written once: a record carries the stream's id and the
//! offset its bytes end at, so the log itself is the durable record of how
//! far each stream got. A daemon that restarts reads it back and resumes
//! each stream there (the agent resends from that offset, and drops what
//! is before it), whether or not it had acknowledged those bytes before it
//! died; a record cut short by the death is removed.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsa_api::LogLine;
use capsa_protocol::stdio::{ack, Resume, ACK_WINDOW};
use serde::{Deserialize, Serialize};

use crate::state::now_ms;

/// How long the guest gets to take an acknowledgement: one that stops
/// reading them would otherwise hold its copier in a write for good.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// A log is rotated when it grows past this.
pub const ROTATE_BYTES: u64 = 16 << 20;
/// A longer line is kept as several records of at most this many bytes
/// (docker splits at the same size), so a guest that never prints a
/// newline cannot make the daemon hold its output.
pub const MAX_LINE_BYTES: usize = 16 << 10;

/// A log file's record.
#[derive(Debug, Serialize, Deserialize)]
struct Record<'a> {
    time: u64,
    stream: Cow<'a, str>,
    line: Cow<'a, str>,
    /// The guest's stream the line came from, and the stream offset after
    /// its bytes.
    #[serde(default)]
    stream_id: u64,
    #[serde(default)]
    end: u64,
    /// Cut at MAX_LINE_BYTES: the stream's next record continues it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    partial: bool,
}

/// Appends lines to one container's log; shared by its stdout and stderr
/// copiers.
pub struct LogWriter {
    path: PathBuf,
    /// The open log and its length (kept here, not asked of the file at
    /// each record).
    file: Mutex<(File, u64)>,
    /// Where each stream (by its tag) is kept up to.
    kept: Mutex<HashMap<String, Resume>>,
}

impl LogWriter {
    /// Opens the log, dropping a last record that a daemon's death cut
    /// short, and learns where each stream got to.
    pub fn open(path: &Path) -> io::Result<Arc<Self>> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let mut kept = HashMap::new();
        let rotated = path.with_extension("log.1");
        if rotated.exists() {
            scan(&rotated, &mut kept)?;
        }
        let whole = scan(path, &mut kept)?;
        if whole < file.metadata()?.len() {
            file.set_len(whole)?;
        }
        let file = (file, whole);
        Ok(Arc::new(LogWriter {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            kept: Mutex::new(kept),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where stream `stream` is kept up to, to attach it from there.
    pub fn resume_point(&self, stream: &str) -> Resume {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.get(stream).copied().unwrap_or_default()
    }

    /// Writes one record, whole, in one write.
    /// Appends a record; `partial` when the next one continues its line.
    fn append(&self, stream: &str, line: &[u8], at: Resume, partial: bool) -> io::Result<()> {
        let text = String::from_utf8_lossy(line);
        let record = Record {
            time: now_ms(),
            stream: Cow::Borrowed(stream),
            line: Cow::Borrowed(text.strip_suffix('\n').unwrap_or(&text)),
            stream_id: at.stream_id,
            end: at.offset,
            partial,
        };
        let text = encode(&record)?;
        let mut open = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (file, length) = &mut *open;
        file.write_all(&text)?;
        *length += text.len() as u64;
        {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            match kept.get_mut(stream) {
                Some(point) => *point = at,
                None => {
                    kept.insert(stream.to_string(), at);
                }
            }
        }
        if *length > ROTATE_BYTES {
            let rotated = self.path.with_extension("log.1");
            fs::rename(&self.path, &rotated)?;
            *file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&self.path)?;
            *length = 0;
        }
        Ok(())
    }

    /// Copies an acked stdio stream (attached from `resume_point`) into the
    /// log line by line until it ends, a last line without a newline too.
    /// Bytes are acknowledged once their lines are written; the host holds
    /// none unacknowledged beyond one read and one record. An
    /// acknowledgement the guest does not take within ACK_TIMEOUT ends the
    /// copy with an error (the stream is dropped).
    /// `terminal`: a terminal's output, kept as it comes (a prompt has no
    /// newline) rather than line by line.
    pub fn copy(&self, stream: &str, source: UnixStream, terminal: bool) -> io::Result<()> {
        self.copy_within(stream, source, ACK_TIMEOUT, terminal)
    }

    fn copy_within(
        &self,
        stream: &str,
        source: UnixStream,
        patience: Duration,
        terminal: bool,
    ) -> io::Result<()> {
        source.set_write_timeout(Some(patience))?;
        // Room for a few whole records per read: a flood then costs a
        // read and an acknowledgement per 64 KiB, not per record.
        let mut reader = BufReader::with_capacity(4 * MAX_LINE_BYTES, source);
        let start = Resume::read_from(&mut reader)?;
        let mut at = start;
        let mut acked = start.offset;
        // The agent closes its end once its last bytes are sent: an
        // acknowledgement then has no one to hear it, and what is still
        // in the socket is read to its end without more of them.
        let mut listening = true;
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            if read_bounded_line(&mut reader, &mut buffer, MAX_LINE_BYTES, terminal)? == 0 {
                if !listening {
                    return Ok(());
                }
                return match acknowledge(reader.get_mut(), at.offset, patience) {
                    Err(e) if closed_by_peer(&e) => Ok(()),
                    other => other,
                };
            }
            // The preamble is the guest's word: an offset near the top saturates.
            at.offset = at.offset.saturating_add(buffer.len() as u64);
            let partial = !buffer.ends_with(b"\n") && (terminal || buffer.len() >= MAX_LINE_BYTES);
            self.append(stream, &buffer, at, partial)?;
            // One acknowledgement per batch the guest sent, not per line,
            // and one at least every half window, so that an agent held to
            // its window never waits on how the host's reads fall.
            let ahead = at.offset.saturating_sub(acked);
            if listening && (reader.buffer().is_empty() || ahead >= (ACK_WINDOW / 2) as u64) {
                match acknowledge(reader.get_mut(), at.offset, patience) {
                    Err(e) if closed_by_peer(&e) => listening = false,
                    other => other?,
                }
                acked = at.offset;
            }
        }
    }
}

/// An error writing to a stream whose other end has closed it.
fn closed_by_peer(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// A record's line of JSON. serde_json escapes a string byte by byte; a
/// line with nothing to escape (printable ASCII without `"` or `\`, what a
/// flood of output mostly is) is checked in one pass that vectorizes and
/// put in as it is, where serde_json leaves an empty line's quotes, so the
/// copier's cost per byte is a few instructions rather than a dozen.
fn encode(record: &Record) -> io::Result<Vec<u8>> {
    const PLAIN_MIN: usize = 256;
    let line = record.line.as_bytes();
    let plain = |chunk: &[u8]| {
        chunk.iter().fold(true, |plain, &b| {
            plain & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
        })
    };
    let mut text = if line.len() >= PLAIN_MIN && line.chunks(64).all(plain) {
        let hollow = Record {
            time: record.time,
            stream: Cow::Borrowed(&record.stream),
            line: Cow::Borrowed(""),
            stream_id: record.stream_id,
            end: record.end,
            partial: record.partial,
        };
        let hollow = serde_json::to_vec(&hollow).map_err(io::Error::other)?;
        // The first `"line":""` is the field's (a string before it would
        // have its quotes escaped); the line goes between its quotes.
        const EMPTY: &[u8] = br#""line":"""#;
        let at = memchr::memmem::find(&hollow, EMPTY)
            .map(|at| at + EMPTY.len() - 1)
            .ok_or_else(|| io::Error::other("a log record without its line"))?;
        let mut text = Vec::with_capacity(hollow.len() + line.len() + 1);
        text.extend_from_slice(&hollow[..at]);
        text.extend_from_slice(line);
        text.extend_from_slice(&hollow[at..]);
        text
    } else {
        serde_json::to_vec(record).map_err(io::Error::other)?
    };
    text.push(b'\n');
    Ok(text)
}

/// Sends an acknowledgement, saying so when the guest would not take it.
fn acknowledge(connection: &mut UnixStream, kept: u64, patience: Duration) -> io::Result<()> {
    ack(connection, kept).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the agent took no acknowledgement within {:.1} s: stream dropped",
                patience.as_secs_f64()
            ),
        ),
        _ => e,
    })
}

/// Reads up to and including a newline, or `max` bytes, whichever first
/// (`eager`: or what has come so far, when it ends with a whole
/// character); returns how many bytes it read (0 at the end, a reset one
/// included).
fn read_bounded_line(
    reader: &mut BufReader<impl Read>,
    out: &mut Vec<u8>,
    max: usize,
    eager: bool,
) -> io::Result<usize> {
    while out.len() < max {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A peer that closed with acknowledgements unread: Linux says
            // so once its last bytes are read, instead of the end.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            break;
        }
        let room = max - out.len();
        let (take, done) = match memchr::memchr(b'\n', &available[..available.len().min(room)]) {
            Some(newline) => (newline + 1, true),
            None => (available.len().min(room), false),
        };
        out.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done || (eager && reader.buffer().is_empty() && ends_whole(out)) {
            break;
        }
    }
    Ok(out.len())
}

/// Whether `bytes` does not end in the middle of a UTF-8 character.
fn ends_whole(bytes: &[u8]) -> bool {
    let Some(lead) = bytes
        .iter()
        .rev()
        .take(4)
        .position(|b| b & 0xC0 != 0x80)
        .map(|back| bytes.len() - 1 - back)
    else {
        // Continuation bytes only: not text to wait for.
        return true;
    };
    let needed = match bytes[lead] {
        b if b < 0x80 => 1,
        b if b >> 5 == 0b110 => 2,
        b if b >> 4 == 0b1110 => 3,
        b if b >> 3 == 0b11110 => 4,
        _ => 1,
    };
    bytes.len() - lead >= needed
}

/// Reads `path`'s records, noting each stream's last resume point in
/// `kept`; returns the length of its whole records.
fn scan(path: &Path, kept: &mut HashMap<String, Resume>) -> io::Result<u64> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut whole = 0u64;
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        let n = reader.read_until(b'\n', &mut buffer)?;
        if n == 0 || buffer.last() != Some(&b'\n') {
            return Ok(whole);
        }
        whole += n as u64;
        if let Ok(record) = serde_json::from_slice::<Record>(&buffer) {
            kept.insert(
                record.stream.into_owned(),
                Resume {
                    stream_id: record.stream_id,
                    offset: record.end,
                },
            );
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
        if let Ok(record) = serde_json::from_str::<Record>(&buffer) {
            out.push(LogLine {
                time: record.time,
                stream: record.stream.into_owned(),
                line: record.line.into_owned(),
                partial: record.partial,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_plain_line_is_encoded_as_serde_json_would() {
        let lines = [
            "x".repeat(300),
            format!("{}\"quoted\" {}", "a".repeat(300), "b".repeat(10)),
            format!("{}\\{}", "c".repeat(200), "d".repeat(200)),
            format!("{}\t{}", "e".repeat(300), "é".repeat(100)),
            "\"line\":\"\"".repeat(40),
            "line:".repeat(100),
            "short".into(),
            String::new(),
        ];
        for (i, line) in lines.iter().enumerate() {
            let record = Record {
                time: 1_700_000_000_000 + i as u64,
                stream: Cow::Borrowed("stdout"),
                line: Cow::Borrowed(line),
                stream_id: 7,
                end: 1 << 40,
                partial: i % 2 == 0,
            };
            let mut expected = serde_json::to_vec(&record).unwrap();
            expected.push(b'\n');
            assert_eq!(
                String::from_utf8(encode(&record).unwrap()).unwrap(),
                String::from_utf8(expected).unwrap(),
                "line {i}"
            );
        }
    }

    const STREAM: u64 = 0xabc;

    /// Plays the agent: sends the preamble and `output` from `start`, and
    /// returns the last acknowledgement.
    fn deliver(writer: &LogWriter, stream: &str, start: u64, output: &[u8]) -> u64 {
        let (mut guest, host) = std::os::unix::net::UnixStream::pair().unwrap();
        let preamble = Resume {
            stream_id: STREAM,
            offset: start,
        };
        guest.write_all(&preamble.to_bytes()).unwrap();
        guest.write_all(output).unwrap();
        guest.shutdown(std::net::Shutdown::Write).unwrap();
        writer.copy(stream, host, false).unwrap();
        let mut acks = Vec::new();
        guest.read_to_end(&mut acks).unwrap();
        let last = acks.rchunks(8).next().unwrap();
        u64::from_le_bytes(last.try_into().unwrap())
    }

    fn lines(path: &Path) -> Vec<(String, String)> {
        let (all, _) = read(path, None, None).unwrap();
        all.into_iter().map(|l| (l.stream, l.line)).collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(s, l)| (s.to_string(), l.to_string()))
            .collect()
    }

    #[test]
    fn lines_round_trip_with_tail_and_partial_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let writer = LogWriter::open(&path).unwrap();
        let kept = deliver(&writer, "stdout", 0, b"one\ntwo\nthree");
        assert_eq!(kept, 13, "acknowledged by stream offset");
        assert_eq!(deliver(&writer, "stderr", 0, b"oops\n"), 5);
        assert_eq!(
            lines(&path),
            pairs(&[
                ("stdout", "one"),
                ("stdout", "two"),
                ("stdout", "three"),
                ("stderr", "oops")
            ])
        );
        let (_, offset) = read(&path, None, None).unwrap();
        assert_eq!(offset, fs::metadata(&path).unwrap().len());
        let (last, _) = read(&path, Some(1), None).unwrap();
        assert_eq!(last[0].line, "oops");
    }

    #[test]
    fn a_reopened_log_resumes_each_stream_where_its_last_record_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let writer = LogWriter::open(&path).unwrap();
        assert_eq!(writer.resume_point("stdout"), Resume::default());
        deliver(&writer, "stdout", 100, b"a\nbb\n");
        deliver(&writer, "stderr", 0, b"e\n");
        drop(writer);
        // A daemon killed in the middle of a record leaves part of it.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"time":1,"stream":"stdout","li"#)
            .unwrap();
        drop(file);
        let writer = LogWriter::open(&path).unwrap();
        let resume = writer.resume_point("stdout");
        assert_eq!(
            resume,
            Resume {
                stream_id: STREAM,
                offset: 105
            }
        );
        assert_eq!(writer.resume_point("stderr").offset, 2);
        // The agent resends from there; nothing is doubled or glued to the
        // cut record.
        deliver(&writer, "stdout", resume.offset, b"ccc\n");
        assert_eq!(
            lines(&path),
            pairs(&[
                ("stdout", "a"),
                ("stdout", "bb"),
                ("stderr", "e"),
                ("stdout", "ccc")
            ])
        );
        assert_eq!(
            LogWriter::open(&path)
                .unwrap()
                .resume_point("stdout")
                .offset,
            109
        );
    }

    #[test]
    fn a_line_without_end_is_kept_in_bounded_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let writer = LogWriter::open(&path).unwrap();
        let mut output = vec![b'x'; MAX_LINE_BYTES * 2 + 10];
        output.extend_from_slice(b"\nEND\n");
        assert_eq!(deliver(&writer, "stdout", 0, &output), output.len() as u64);
        let found = lines(&path);
        let sizes: Vec<usize> = found.iter().map(|(_, l)| l.len()).collect();
        assert_eq!(sizes, [MAX_LINE_BYTES, MAX_LINE_BYTES, 10, 3]);
        assert_eq!(found[3].1, "END");
        let (records, _) = read(&path, None, None).unwrap();
        let partial: Vec<bool> = records.iter().map(|l| l.partial).collect();
        assert_eq!(partial, [true, true, false, false], "pieces say so");
    }

    #[test]
    fn an_agent_that_closes_after_its_last_bytes_ends_the_stream_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let writer = LogWriter::open(&path).unwrap();
        let (mut guest, host) = std::os::unix::net::UnixStream::pair().unwrap();
        // A whole batch and the close before the host reads: each
        // acknowledgement then meets a closed socket (as a --rm run's
        // streams do once the container exits).
        guest.write_all(&Resume::default().to_bytes()).unwrap();
        let mut output = Vec::new();
        for i in 0..20_000 {
            output.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        let sender = std::thread::spawn(move || {
            guest.write_all(&output).unwrap();
            drop(guest);
        });
        std::thread::sleep(Duration::from_millis(50));
        let copied = writer.copy("stdout", host, false);
        sender.join().unwrap();
        copied.unwrap();
        let found = lines(&path);
        assert_eq!(found.len(), 20_000);
        assert_eq!(found[19_999].1, "line 19999");
    }

    #[test]
    fn a_terminals_output_is_kept_as_it_comes_and_characters_stay_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let writer = LogWriter::open(&path).unwrap();
        let (mut guest, host) = std::os::unix::net::UnixStream::pair().unwrap();
        let copier = std::thread::spawn(move || writer.copy("stdout", host, true));
        guest.write_all(&Resume::default().to_bytes()).unwrap();
        // A prompt, then a character cut in two by the writes.
        guest.write_all(b"/ # ").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lines(&path).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            lines(&path),
            pairs(&[("stdout", "/ # ")]),
            "kept before any newline"
        );
        guest.write_all(&"é".as_bytes()[..1]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        guest.write_all(&"é\n".as_bytes()[1..]).unwrap();
        drop(guest);
        copier.join().unwrap().unwrap();
        let (records, _) = read(&path, None, None).unwrap();
        let text: Vec<(&str, bool)> = records
            .iter()
            .map(|r| (r.line.as_str(), r.partial))
            .collect();
        assert_eq!(text, [("/ # ", true), ("é", false)]);
        assert!(
            ends_whole(b"abc") && ends_whole("é".as_bytes()) && !ends_whole(&"€".as_bytes()[..2])
        );
    }

    #[test]
    fn an_agent_that_takes_no_acknowledgements_has_its_stream_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let writer = LogWriter::open(&dir.path().join("c.log")).unwrap();
        let (mut guest, host) = std::os::unix::net::UnixStream::pair().unwrap();
        // Plays an agent that prints line after line and never reads the
        // acknowledgements; it stops once the host drops the stream.
        let agent = std::thread::spawn(move || {
            guest.write_all(&Resume::default().to_bytes()).unwrap();
            for _ in 0..1_000_000 {
                if guest.write_all(b"line\n").is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            false
        });
        let error = writer
            .copy_within("stdout", host, Duration::from_millis(300), false)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        assert!(error.to_string().contains("no acknowledgement"), "{error}");
        assert!(agent.join().unwrap(), "the agent saw its stream dropped");
    }
}
