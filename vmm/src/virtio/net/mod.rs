//! virtio-net on a tap device, with checksum and TSO offloads both ways and
//! mergeable receive buffers (so the guest need not post 64 KiB buffers to
//! receive TSO frames).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueOwnedT};
use vmm_sys_util::epoll::EventSet;

use super::rate_limiter::RateLimiter;
use super::worker::{DeviceBroken, QueueHandler, Registrar, Worker, FIRST_BACKEND_TOKEN};
use super::{
    complete, next_chain, notify, read_config_bytes, ActivateContext, ActivateError, Interrupt,
    Memory,
};
use capsa_tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};

const QUEUE_SIZES: &[u16] = &[256, 256];
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const TAP_TOKEN: u64 = FIRST_BACKEND_TOKEN;
const RX_LIMITER_TOKEN: u64 = FIRST_BACKEND_TOKEN + 1;
const TX_LIMITER_TOKEN: u64 = FIRST_BACKEND_TOKEN + 2;
/// The largest frame either side may pass: a 64 KiB TSO segment with its
/// Ethernet (and VLAN) header, after the virtio-net header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65536 + 18;
/// Where num_buffers sits in virtio_net_hdr_v1.
const NUM_BUFFERS_OFFSET: usize = 10;

pub use capsa_vmm_config::NetConfig;

pub struct Net {
    tap: Tap,
    rate: Option<capsa_vmm_config::RateLimit>,
    config_space: Vec<u8>,
}

impl Net {
    pub fn new(config: &NetConfig) -> Result<Self, TapError> {
        let tap = match config.fd {
            Some(fd) => {
                let fd = crate::fds::adopt(fd).map_err(|source| TapError::Attach {
                    name: config.tap.clone(),
                    source,
                })?;
                Tap::from_fd(fd, &config.tap)?
            }
            None => Tap::open(&config.tap)?,
        };
        if let Some(bridge) = &config.bridge {
            tap.join_bridge(bridge)?;
        }
        Ok(Self {
            tap,
            rate: config.rate,
            config_space: config.mac.0.to_vec(),
        })
    }
}

impl super::VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
        ]
        .iter()
        .fold(0, |acc, bit| acc | 1u64 << bit)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn activate(&mut self, mut context: ActivateContext) -> Result<Worker, ActivateError> {
        let acked = context.acked_features;
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        // The tap may hand us only what the guest said it can take.
        let mut offload = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            offload |= TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                offload |= TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                offload |= TUN_F_TSO6;
            }
        }
        self.tap
            .set_offload(offload)
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        let tap = self.tap.try_clone().map_err(ActivateError::Dup)?;
        let tx = context.queues.remove(TX_QUEUE);
        let rx = context.queues.remove(RX_QUEUE);
        let mut handler = NetQueues::new(
            tap,
            context.memory,
            rx,
            tx,
            context.interrupt.clone(),
            has(VIRTIO_NET_F_MRG_RXBUF),
        );
        let limiter = || RateLimiter::new(self.rate.as_ref()).map_err(ActivateError::Worker);
        handler.rx_limiter = limiter()?;
        handler.tx_limiter = limiter()?;
        Worker::spawn(
            handler,
            context.queue_events,
            context.interrupt,
            &context.thread,
        )
    }
}

pub struct NetQueues {
    pub tap: Tap,
    pub memory: Memory,
    pub rx: Queue,
    pub tx: Queue,
    pub interrupt: Interrupt,
    pub mergeable: bool,
    frame: Vec<u8>,
    /// A frame read from the tap that waits for receive buffers or for
    /// the receive rate limit.
    held: Option<usize>,
    /// Whether the held frame has passed the rate limit already.
    held_admitted: bool,
    /// The tap may have more frames (edge-triggered: until WouldBlock).
    tap_readable: bool,
    pub dropped: u64,
    /// Each way's rate limit (frames and bytes), if the NIC has one.
    pub rx_limiter: Option<RateLimiter>,
    pub tx_limiter: Option<RateLimiter>,
}

impl NetQueues {
    pub fn new(
        tap: Tap,
        memory: Memory,
        rx: Queue,
        tx: Queue,
        interrupt: Interrupt,
        mergeable: bool,
    ) -> Self {
        Self {
            tap,
            memory,
            rx,
            tx,
            interrupt,
            mergeable,
            frame: vec![0u8; MAX_FRAME],
            held: None,
            held_admitted: false,
            tap_readable: true,
            dropped: 0,
            rx_limiter: None,
            tx_limiter: None,
        }
    }

    /// Moves frames from the guest to the tap.
    pub fn process_tx(&mut self) -> Result<(), DeviceBroken> {
        let memory = self.memory.clone();
        let mut served = false;
        while let Some(chain) = next_chain(&mut self.tx, &memory)? {
            if let Some(limiter) = &mut self.tx_limiter {
                if !limiter.admit(super::chain_bytes(&chain)) {
                    self.tx.go_to_previous_position();
                    break;
                }
            }
            let head = chain.head_index();
            let sent = chain.reader(&memory).ok().and_then(|mut reader| {
                let len = reader.available_bytes();
                if !(VNET_HDR_LEN..=MAX_FRAME).contains(&len) {
                    return None;
                }
                reader.read_exact(&mut self.frame[..len]).ok()?;
                self.tap.write_frame(&self.frame[..len]).ok()
            });
            if sent.is_none() {
                self.dropped += 1;
            }
            complete(&mut self.tx, &memory, head, 0)?;
            served = true;
        }
        if served {
            notify(&mut self.tx, &memory, &self.interrupt)?;
        }
        Ok(())
    }

    /// Moves frames from the tap to the guest while both have some.
    pub fn process_rx(&mut self) -> Result<(), DeviceBroken> {
        let mut delivered = false;
        loop {
            let len = match self.held.take() {
                Some(len) => len,
                None if self.tap_readable => match self.tap.read_frame(&mut self.frame) {
                    Ok(len) if len >= VNET_HDR_LEN => len,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        // WouldBlock, or the tap went away: wait for epoll.
                        self.tap_readable = false;
                        break;
                    }
                },
                None => break,
            };
            if let Some(limiter) = &mut self.rx_limiter {
                if !self.held_admitted && !limiter.admit(len as u64) {
                    // Waits, read, for the limiter's timer.
                    self.held = Some(len);
                    break;
                }
            }
            if !self.deliver(len)? {
                // Admitted already: it waits for buffers only.
                self.held_admitted = true;
                self.held = Some(len);
                break;
            }
            self.held_admitted = false;
            delivered = true;
        }
        if delivered {
            notify(&mut self.rx, &self.memory.clone(), &self.interrupt)?;
        }
        Ok(())
    }

    /// Writes the frame in `self.frame[..len]` into receive buffers. Returns
    /// false, touching nothing, when the guest has not posted enough.
    fn deliver(&mut self, len: usize) -> Result<bool, DeviceBroken> {
        let memory = self.memory.clone();
        let mut writers = Vec::new();
        let mut room = 0usize;
        while room < len {
            let Some(chain) = next_chain(&mut self.rx, &memory)? else {
                for _ in 0..writers.len() {
                    self.rx.go_to_previous_position();
                }
                return Ok(false);
            };
            let head = chain.head_index();
            let writer = chain
                .writer(&memory)
                .map_err(|e| DeviceBroken(format!("receive buffer outside guest memory: {e}")))?;
            room += writer.available_bytes();
            writers.push((head, writer));
            if !self.mergeable {
                break;
            }
        }
        if room < len {
            // One buffer too small for the frame (no mergeable buffers):
            // the frame is dropped, the buffer returned empty.
            self.dropped += 1;
            for (head, _) in writers {
                complete(&mut self.rx, &memory, head, 0)?;
            }
            return Ok(true);
        }
        let count = writers.len() as u16;
        self.frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&count.to_le_bytes());
        let mut offset = 0;
        for (head, mut writer) in writers {
            let n = writer.available_bytes().min(len - offset);
            writer
                .write_all(&self.frame[offset..offset + n])
                .map_err(|e| DeviceBroken(format!("cannot write a receive buffer: {e}")))?;
            offset += n;
            complete(&mut self.rx, &memory, head, n as u32)?;
        }
        Ok(true)
    }
}

impl QueueHandler for NetQueues {
    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn register(&mut self, registrar: &Registrar) -> std::io::Result<()> {
        for (limiter, token) in [
            (&self.rx_limiter, RX_LIMITER_TOKEN),
            (&self.tx_limiter, TX_LIMITER_TOKEN),
        ] {
            if let Some(limiter) = limiter {
                registrar.add(limiter.as_raw_fd(), token, EventSet::IN)?;
            }
        }
        registrar.add(
            self.tap.as_raw_fd(),
            TAP_TOKEN,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )
    }

    fn queue_event(&mut self, index: usize, _epoll: &Registrar) -> Result<(), DeviceBroken> {
        if index == TX_QUEUE {
            self.process_tx()?;
        }
        self.process_rx()
    }

    fn backend_event(
        &mut self,
        token: u64,
        _events: EventSet,
        _epoll: &Registrar,
    ) -> Result<(), DeviceBroken> {
        match token {
            TX_LIMITER_TOKEN => {
                if let Some(limiter) = &mut self.tx_limiter {
                    limiter.timer_fired();
                }
                return self.process_tx();
            }
            RX_LIMITER_TOKEN => {
                if let Some(limiter) = &mut self.rx_limiter {
                    limiter.timer_fired();
                }
            }
            _ => self.tap_readable = true,
        }
        self.process_rx()
    }

    fn quiesce(&mut self, registrar: &Registrar) {
        registrar.remove(self.tap.as_raw_fd());
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    use crate::virtio::testing::{writable, Guest, DATA_START};
    pub use capsa_tap::testing::in_private_netns;
    use proptest::prelude::*;

    fn with_handler<T: Send + 'static>(
        guest: &Guest,
        mergeable: bool,
        f: impl FnOnce(&mut NetQueues) -> T + Send + 'static,
    ) -> Option<T> {
        let memory = guest.memory.clone();
        let (rx, tx) = (guest.device_queue(RX_QUEUE), guest.device_queue(TX_QUEUE));
        in_private_netns(move |tap| {
            let mut handler = NetQueues::new(tap, memory, rx, tx, Interrupt::for_test(), mergeable);
            f(&mut handler)
        })
    }

    fn frame(handler: &mut NetQueues, len: usize) {
        for (i, b) in handler.frame[..len].iter_mut().enumerate() {
            *b = i as u8;
        }
    }

    #[test]
    fn a_frame_spreads_over_mergeable_buffers_with_their_count_in_the_header() {
        let mut guest = Guest::new(Box::new(crate::virtio::rng::Rng));
        guest.layout_queue(RX_QUEUE, 16);
        guest.layout_queue(TX_QUEUE, 16);
        for i in 0..4 {
            guest.add_chain(RX_QUEUE, &[writable(DATA_START + i * 0x1000, 1000)]);
        }
        let Some(delivered) = with_handler(&guest, true, |h| {
            frame(h, 2500);
            h.deliver(2500).unwrap()
        }) else {
            eprintln!("skipped: cannot create a network namespace here");
            return;
        };
        assert!(delivered);
        assert_eq!(guest.used_idx(RX_QUEUE), 3);
        let lens: Vec<u32> = (0..3).map(|n| guest.used_entry(RX_QUEUE, n).1).collect();
        assert_eq!(lens, vec![1000, 1000, 500]);
        let first = guest.read(DATA_START, 12);
        assert_eq!(u16::from_le_bytes([first[10], first[11]]), 3, "num_buffers");
        assert_eq!(guest.read(DATA_START + 0x1000, 4), vec![232, 233, 234, 235]);
    }

    #[test]
    fn a_frame_waits_when_buffers_run_short_and_is_dropped_when_one_is_too_small() {
        let mut guest = Guest::new(Box::new(crate::virtio::rng::Rng));
        guest.layout_queue(RX_QUEUE, 16);
        guest.layout_queue(TX_QUEUE, 16);
        guest.add_chain(RX_QUEUE, &[writable(DATA_START, 1000)]);
        let Some(mergeable_delivered) = with_handler(&guest, true, |h| {
            frame(h, 2500);
            h.deliver(2500).unwrap()
        }) else {
            return;
        };
        assert!(!mergeable_delivered, "held until more buffers come");
        assert_eq!(guest.used_idx(RX_QUEUE), 0, "and nothing consumed");
        let dropped = with_handler(&guest, false, |h| {
            frame(h, 2500);
            (h.deliver(2500).unwrap(), h.dropped)
        });
        assert_eq!(dropped, Some((true, 1)));
        assert_eq!(guest.used_entry(RX_QUEUE, 0).1, 0, "buffer returned empty");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn hostile_receive_buffers(
            descs in crate::virtio::fuzz::descriptors(),
            heads in prop::collection::vec(0u16..20, 0..20),
            len in 12usize..MAX_FRAME,
            mergeable: bool,
        ) {
            let mut guest = Guest::new(Box::new(crate::virtio::rng::Rng));
            crate::virtio::fuzz::hostile_guest(&mut guest, RX_QUEUE, &descs, &heads, &[]);
            guest.layout_queue(TX_QUEUE, 16);
            let outcome = with_handler(&guest, mergeable, move |h| {
                frame(h, len);
                h.deliver(len).map(|delivered| (delivered, h.dropped))
            });
            if let Some(Ok((true, 0))) = outcome {
                let used = guest.used_idx(RX_QUEUE);
                let total: u64 = (0..used).map(|n| u64::from(guest.used_entry(RX_QUEUE, n).1)).sum();
                prop_assert_eq!(total, len as u64);
            }
        }
    }
}
