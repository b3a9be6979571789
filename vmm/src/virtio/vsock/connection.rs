//! One stream between a guest port and a host Unix socket: its state and
//! the credit accounting of both directions.

use std::io::{ErrorKind, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

/// How much data from the guest we buffer per connection when the host
/// side is slow; this is the credit (buf_alloc) we grant the guest.
pub const HOST_BUF_ALLOC: u32 = 256 * 1024;
/// Tell the guest about freed credit once this much has been forwarded.
const CREDIT_UPDATE_THRESHOLD: u32 = HOST_BUF_ALLOC / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent to the guest, awaiting its RESPONSE.
    Connecting,
    Established,
}

/// Why the connection must be reset.
#[derive(Debug, PartialEq, Eq)]
pub enum Violation {
    /// The guest sent more than the credit we granted.
    CreditOverrun,
}

pub struct Connection {
    pub stream: UnixStream,
    pub token: u64,
    pub state: State,
    /// Guest data not yet accepted by the Unix socket.
    pending: Vec<u8>,
    /// Bytes of guest data handed to the Unix socket (our fwd_cnt).
    fwd_cnt: Wrapping<u32>,
    /// fwd_cnt as last told to the guest.
    fwd_cnt_reported: Wrapping<u32>,
    /// The guest's receive buffer and how much of what we sent it has
    /// consumed; with `sent` this gives the credit we may use.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    sent: Wrapping<u32>,
    /// The guest will send nothing more (SHUTDOWN with SEND).
    pub guest_done_sending: bool,
    /// The guest will read nothing more (SHUTDOWN with RCV).
    pub guest_done_receiving: bool,
    /// The host side reached end of file; the guest has been told.
    pub host_eof: bool,
    /// Waiting in the muxer's list of streams to read from.
    pub wants_rx: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Self {
            stream,
            token,
            state,
            pending: Vec::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_reported: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            sent: Wrapping(0),
            guest_done_sending: false,
            guest_done_receiving: false,
            host_eof: false,
            wants_rx: false,
        }
    }

    /// Every packet from the guest carries its current credit.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.sent - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn record_sent(&mut self, bytes: u32) {
        self.sent += Wrapping(bytes);
    }

    /// Our credit fields for a packet to the guest; sending them counts as
    /// reporting fwd_cnt.
    pub fn credit_fields(&mut self) -> (u32, u32) {
        self.fwd_cnt_reported = self.fwd_cnt;
        (HOST_BUF_ALLOC, self.fwd_cnt.0)
    }

    /// Whether the guest should hear about credit we freed.
    pub fn credit_update_due(&self) -> bool {
        (self.fwd_cnt - self.fwd_cnt_reported).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Data from the guest for the host. Writes what the socket takes now and
    /// keeps the rest; the guest may not exceed the credit we gave it.
    pub fn receive_from_guest(&mut self, data: &[u8]) -> Result<(), Violation> {
        let buffered = self.pending.len() as u64 + data.len() as u64;
        let unreported = u64::from((self.fwd_cnt - self.fwd_cnt_reported).0);
        // A guest that keeps to its credit has at most buf_alloc bytes past
        // the fwd_cnt we last reported: those we still hold plus those we
        // forwarded since. More is an overrun.
        if buffered + unreported > u64::from(HOST_BUF_ALLOC) {
            return Err(Violation::CreditOverrun);
        }
        if self.pending.is_empty() {
            let written = self.write_some(data);
            self.pending.extend_from_slice(&data[written..]);
        } else {
            self.pending.extend_from_slice(data);
            self.flush();
        }
        Ok(())
    }

    /// Pushes buffered guest data to the socket. Returns true once nothing
    /// is left.
    pub fn flush(&mut self) -> bool {
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            let written = self.write_some(&pending);
            self.pending = pending;
            self.pending.drain(..written);
        }
        self.pending.is_empty()
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn write_some(&mut self, mut data: &[u8]) -> usize {
        let total = data.len();
        while !data.is_empty() {
            match self.stream.write(data) {
                Ok(0) => break,
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // WouldBlock: wait for EPOLLOUT. Other errors (the host
                // closed its end) show up as EOF/HUP on the read side.
                Err(_) => break,
            }
        }
        let written = total - data.len();
        self.fwd_cnt += Wrapping(written as u32);
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, 1, State::Established), b)
    }

    #[test]
    fn peer_credit_follows_sent_and_forwarded_bytes() {
        let (mut c, _peer) = pair();
        assert_eq!(c.peer_credit(), 0, "no credit before the guest tells us");
        c.update_peer_credit(1000, 0);
        c.record_sent(600);
        assert_eq!(c.peer_credit(), 400);
        c.update_peer_credit(1000, 500);
        assert_eq!(c.peer_credit(), 900);
        // Counters wrap around u32 without losing track.
        c.sent = Wrapping(u32::MAX - 10);
        c.update_peer_credit(1000, u32::MAX - 10);
        c.record_sent(100);
        assert_eq!(c.peer_credit(), 900);
    }

    #[test]
    fn guest_data_reaches_the_socket_and_frees_credit() {
        let (mut c, mut peer) = pair();
        c.receive_from_guest(b"hello").unwrap();
        let mut buf = [0u8; 5];
        std::io::Read::read_exact(&mut peer, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(!c.credit_update_due());
        c.receive_from_guest(&vec![0u8; CREDIT_UPDATE_THRESHOLD as usize])
            .unwrap();
        assert!(c.credit_update_due());
        assert_eq!(c.credit_fields().1, 5 + CREDIT_UPDATE_THRESHOLD);
        assert!(!c.credit_update_due());
    }

    #[test]
    fn a_stalled_host_buffers_up_to_the_credit_then_it_is_an_overrun() {
        let (mut c, peer) = pair();
        // Fill the socket buffer so that nothing more is written.
        let chunk = vec![7u8; 64 * 1024];
        while c.write_some(&chunk) > 0 {}
        c.credit_fields(); // the guest knows everything forwarded so far
        for _ in 0..HOST_BUF_ALLOC / (64 * 1024) {
            c.receive_from_guest(&chunk).unwrap();
        }
        assert!(c.has_pending());
        assert_eq!(c.receive_from_guest(b"x"), Err(Violation::CreditOverrun));
        drop(peer);
    }
}
