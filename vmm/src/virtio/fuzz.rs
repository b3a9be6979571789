//! Property tests: random descriptor chains and request bytes, as a hostile
//! guest would write them, fed to every device's request parsing. Whatever
//! comes in, the device answers or breaks cleanly (DEVICE_NEEDS_RESET); it
//! never panics and never writes outside what the request allows.

use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::testing::{Guest, DATA_START, MEMORY_SIZE};
use super::Interrupt;

const QUEUE_SIZE: u16 = 16;

#[derive(Clone, Debug)]
pub struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..0x4000).prop_map(|o| DATA_START + o * 16),
        1 => Just(0u64),
        1 => (MEMORY_SIZE - 64)..(MEMORY_SIZE + 64),
        1 => any::<u64>(),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1u32),
        Just(16u32),
        Just(44u32),
        Just(512u32),
        Just(4096u32),
        0u32..70_000,
        Just(u32::MAX),
    ]
}

fn flags() -> impl Strategy<Value = u16> {
    prop_oneof![
        4 => Just(VRING_DESC_F_NEXT as u16),
        4 => Just((VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16),
        3 => Just(VRING_DESC_F_WRITE as u16),
        3 => Just(0u16),
        1 => Just(VRING_DESC_F_INDIRECT as u16),
        1 => any::<u16>(),
    ]
}

pub(crate) fn descriptors() -> impl Strategy<Value = Vec<RawDesc>> {
    prop::collection::vec(
        (addr(), len(), flags(), 0u16..(QUEUE_SIZE + 4)).prop_map(|(addr, len, flags, next)| {
            RawDesc {
                addr,
                len,
                flags,
                next,
            }
        }),
        1..(QUEUE_SIZE as usize),
    )
}

/// Writes the descriptors, publishes `heads`, and fills the data area with
/// `bytes` so headers parse as something.
pub(crate) fn hostile_guest(
    guest: &mut Guest,
    queue: usize,
    descs: &[RawDesc],
    heads: &[u16],
    bytes: &[u8],
) {
    guest.layout_queue(queue, QUEUE_SIZE);
    for (i, d) in descs.iter().enumerate() {
        guest.write_raw_desc(queue, i as u16, d.addr, d.len, d.flags, d.next);
    }
    for &head in heads {
        guest.publish(queue, head);
    }
    let mut fill = Vec::with_capacity(0x4_0000);
    while fill.len() < 0x4_0000 {
        fill.extend_from_slice(bytes);
        if bytes.is_empty() {
            break;
        }
    }
    guest.write(DATA_START, &fill);
}

fn heads() -> impl Strategy<Value = Vec<u16>> {
    prop::collection::vec(prop_oneof![8 => 0u16..QUEUE_SIZE, 1 => any::<u16>()], 0..24)
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..96)
}

fn test_guest() -> Guest {
    Guest::new(Box::new(super::rng::Rng))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("CAPSA_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn block_requests(descs in descriptors(), heads in heads(), bytes in bytes(), read_only: bool) {
        use super::block::{Block, DiskConfig, SECTOR_SIZE};
        use super::worker::{QueueHandler, Registrar};
        let file = tempfile::NamedTempFile::new().unwrap();
        let image: Vec<u8> = (0..16 * SECTOR_SIZE).map(|i| (i % 253) as u8).collect();
        std::fs::write(file.path(), &image).unwrap();
        let config = DiskConfig::at(file.path(), read_only, None);
        let mut guest = test_guest();
        hostile_guest(&mut guest, 0, &descs, &heads, &bytes);
        let device = Block::open(&config).unwrap();
        let mut handler = device.queue_handler(guest.memory.clone(), guest.device_queue(0), Interrupt::for_test()).unwrap();
        let registrar = Registrar::new().unwrap();
        let _ = handler.queue_event(0, &registrar);
        let after = std::fs::read(file.path()).unwrap();
        prop_assert_eq!(after.len(), image.len());
        if read_only {
            prop_assert_eq!(after, image);
        }
    }

    #[test]
    fn rng_requests(descs in descriptors(), heads in heads()) {
        use super::worker::{QueueHandler, Registrar};
        let mut guest = test_guest();
        hostile_guest(&mut guest, 0, &descs, &heads, &[]);
        let mut handler = super::rng::RngQueue {
            memory: guest.memory.clone(),
            queue: guest.device_queue(0),
            interrupt: Interrupt::for_test(),
        };
        let _ = handler.queue_event(0, &Registrar::new().unwrap());
    }

    #[test]
    fn vsock_packets(descs in descriptors(), heads in heads(), bytes in bytes(), rx_descs in descriptors(), rx_heads in heads()) {
        use super::vsock::{Vsock, VsockConfig};
        use super::worker::{QueueHandler, Registrar};
        let dir = tempfile::tempdir().unwrap();
        let config = VsockConfig::at(dir.path().join("v.sock"));
        let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("v.sock_0"));
        let vsock = Vsock::new(&config).unwrap();
        let mut guest = test_guest();
        hostile_guest(&mut guest, 0, &rx_descs, &rx_heads, &[]);
        hostile_guest(&mut guest, 1, &descs, &heads, &bytes);
        guest.layout_queue(2, QUEUE_SIZE);
        let queues = vec![guest.device_queue(0), guest.device_queue(1), guest.device_queue(2)];
        let mut muxer = vsock.muxer(guest.memory.clone(), queues, Interrupt::for_test());
        let registrar = Registrar::new().unwrap();
        let _ = muxer.register(&registrar);
        let _ = muxer.queue_event(1, &registrar);
        let _ = muxer.queue_event(0, &registrar);
    }

    #[test]
    fn net_frames(descs in descriptors(), heads in heads(), bytes in bytes(), rx_descs in descriptors(), rx_heads in heads(), mergeable: bool) {
        use super::worker::{QueueHandler, Registrar};
        let mut guest = test_guest();
        hostile_guest(&mut guest, 0, &rx_descs, &rx_heads, &[]);
        hostile_guest(&mut guest, 1, &descs, &heads, &bytes);
        let memory = guest.memory.clone();
        let (rx, tx) = (guest.device_queue(0), guest.device_queue(1));
        // Without the privileges to make a namespace and a tap there is
        // nothing to drive; the net unit tests say so.
        let _ = super::net::tests::in_private_netns(move |tap| {
            let mut handler = super::net::NetQueues::new(tap, memory, rx, tx, Interrupt::for_test(), mergeable);
            let registrar = Registrar::new().unwrap();
            let _ = handler.queue_event(1, &registrar);
            let _ = handler.queue_event(0, &registrar);
        });
    }
}
