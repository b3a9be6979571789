//! virtio-blk on a raw image file: read, write, flush, get-id, discard and
//! write-zeroes. The guest sees the disk as `/dev/vdX`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{ByteValued, Le32, Le64};
use vmm_sys_util::epoll::EventSet;

use super::rate_limiter::RateLimiter;
use super::worker::{DeviceBroken, QueueHandler, Registrar, Worker, FIRST_BACKEND_TOKEN};
use super::{
    read_config_bytes, serve_queue_limited, ActivateContext, ActivateError, Interrupt, Memory,
};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZES: &[u16] = &[256];
/// Longest device ID GET_ID returns (virtio spec 5.2.6).
pub const MAX_ID_LEN: usize = 20;
/// Data moves between the file and guest memory through a buffer this big.
const COPY_CHUNK: usize = 128 * 1024;
/// One discard or write-zeroes segment per request keeps parsing simple;
/// Linux merges into larger ranges instead.
const MAX_DISCARD_SEGMENTS: u32 = 1;
const MAX_DISCARD_SECTORS: u32 = u32::MAX / SECTOR_SIZE as u32;

pub use capsa_vmm_config::DiskConfig;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {} is {size} bytes, not a multiple of {SECTOR_SIZE}-byte sectors", path.display())]
    Size { path: PathBuf, size: u64 },
    #[error("disk image {} is in use by another VM (it is locked)", path.display())]
    Locked { path: PathBuf },
    #[error("disk ID {0:?} is longer than {MAX_ID_LEN} bytes")]
    IdTooLong(String),
}

/// A virtio-blk device before and between activations.
pub struct Block {
    file: File,
    rate: Option<capsa_vmm_config::RateLimit>,
    read_only: bool,
    sectors: u64,
    id: [u8; MAX_ID_LEN],
    config: Vec<u8>,
}

impl Block {
    pub fn open(config: &DiskConfig) -> Result<Self, DiskError> {
        let open_error = |source| DiskError::Open {
            path: config.path.clone(),
            source,
        };
        let file = match config.fd {
            Some(fd) => File::from(crate::fds::adopt(fd).map_err(open_error)?),
            None => OpenOptions::new()
                .read(true)
                .write(!config.read_only)
                .open(&config.path)
                .map_err(open_error)?,
        };
        // Two VMs writing one image corrupt it; readers may share.
        let locked = if config.read_only {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        if locked.is_err() {
            return Err(DiskError::Locked {
                path: config.path.clone(),
            });
        }
        let size = file.metadata().map_err(open_error)?.len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Size {
                path: config.path.clone(),
                size,
            });
        }
        let mut id = [0u8; MAX_ID_LEN];
        if let Some(text) = &config.id {
            if text.len() > MAX_ID_LEN {
                return Err(DiskError::IdTooLong(text.clone()));
            }
            id[..text.len()].copy_from_slice(text.as_bytes());
        }
        let sectors = size / SECTOR_SIZE;
        Ok(Self {
            file,
            rate: config.rate,
            read_only: config.read_only,
            sectors,
            id,
            config: config_space(sectors),
        })
    }
}

/// The virtio_blk_config fields we fill in (the rest read as zero).
fn config_space(sectors: u64) -> Vec<u8> {
    let mut config = vec![0u8; 60];
    config[0..8].copy_from_slice(&sectors.to_le_bytes());
    // seg_max: the queue size less the header and status descriptors.
    config[12..16].copy_from_slice(&u32::from(QUEUE_SIZES[0] - 2).to_le_bytes());
    config[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    config[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
    config[44..48].copy_from_slice(&1u32.to_le_bytes());
    config[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    config[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
    config[56] = 1; // write_zeroes_may_unmap
    config
}

impl super::VirtioDevice for Block {
    fn backing_bytes(&self) -> u64 {
        self.sectors * SECTOR_SIZE
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX;
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, mut context: ActivateContext) -> Result<Worker, ActivateError> {
        let handler = self
            .queue_handler(
                context.memory,
                context.queues.remove(0),
                context.interrupt.clone(),
            )
            .map_err(ActivateError::Dup)?;
        Worker::spawn(
            handler,
            context.queue_events,
            context.interrupt,
            &context.thread,
        )
    }
}

impl Block {
    /// What serves the request queue, with its own handle on the image.
    pub fn queue_handler(
        &self,
        memory: Memory,
        queue: Queue,
        interrupt: Interrupt,
    ) -> std::io::Result<BlockQueue> {
        Ok(BlockQueue {
            disk: Disk {
                file: self.file.try_clone()?,
                read_only: self.read_only,
                sectors: self.sectors,
                id: self.id,
            },
            memory,
            queue,
            interrupt,
            limiter: RateLimiter::new(self.rate.as_ref())?,
        })
    }
}

/// The backend as the worker uses it.
pub struct Disk {
    pub file: File,
    pub read_only: bool,
    pub sectors: u64,
    pub id: [u8; MAX_ID_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RequestHeader {
    request_type: Le32,
    reserved: Le32,
    sector: Le64,
}
// SAFETY: plain little-endian integers with no padding; any bytes are valid.
unsafe impl ByteValued for RequestHeader {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiscardSegment {
    sector: Le64,
    num_sectors: Le32,
    flags: Le32,
}
// SAFETY: plain little-endian integers with no padding; any bytes are valid.
unsafe impl ByteValued for DiscardSegment {}

/// Why a request failed; each maps to a status byte for the driver.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestError {
    /// The chain is malformed: no header, bad addresses, wrong directions.
    Malformed(&'static str),
    /// Outside the disk, or data not a whole number of sectors.
    OutOfRange,
    ReadOnly,
    Unsupported(u32),
    Io(std::io::ErrorKind),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

pub struct BlockQueue {
    pub disk: Disk,
    pub memory: Memory,
    pub queue: Queue,
    pub interrupt: Interrupt,
    /// The disk's rate limit (requests and bytes, reads and writes
    /// together), if it has one.
    pub limiter: Option<RateLimiter>,
}

/// The worker's token for the rate limiter's timer.
const LIMITER_TOKEN: u64 = FIRST_BACKEND_TOKEN;

impl BlockQueue {
    pub fn process(&mut self) -> Result<(), DeviceBroken> {
        let mut buf = vec![0u8; COPY_CHUNK];
        let (disk, memory) = (&self.disk, &self.memory);
        serve_queue_limited(
            &mut self.queue,
            memory,
            &self.interrupt,
            self.limiter.as_mut(),
            |chain| Ok(disk.serve(memory, chain, &mut buf)),
        )
    }
}

impl QueueHandler for BlockQueue {
    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn register(&mut self, registrar: &Registrar) -> std::io::Result<()> {
        match &self.limiter {
            Some(limiter) => registrar.add(limiter.as_raw_fd(), LIMITER_TOKEN, EventSet::IN),
            None => Ok(()),
        }
    }

    fn queue_event(&mut self, _index: usize, _epoll: &Registrar) -> Result<(), DeviceBroken> {
        self.process()
    }

    fn backend_event(
        &mut self,
        _token: u64,
        _events: EventSet,
        _epoll: &Registrar,
    ) -> Result<(), DeviceBroken> {
        if let Some(limiter) = &mut self.limiter {
            limiter.timer_fired();
        }
        self.process()
    }
}

impl Disk {
    /// Carries out one request and writes its status byte. Returns how many
    /// bytes the device wrote into the chain (the used length).
    pub fn serve(&self, memory: &Memory, chain: DescriptorChain<&Memory>, buf: &mut [u8]) -> u32 {
        // The status byte is the last device-writable byte of the chain.
        let Ok(mut writer) = chain.clone().writer(memory) else {
            return 0;
        };
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            // Nowhere to put a status: the driver broke the protocol and
            // learns nothing back.
            return 0;
        };
        let Ok(mut status_writer) = writer.split_at(data_len) else {
            return 0;
        };
        let (status, written) = match self.execute(memory, chain, &mut writer, buf) {
            Ok(()) => (VIRTIO_BLK_S_OK as u8, writer.bytes_written()),
            Err(e) => (e.status(), writer.bytes_written()),
        };
        if status_writer.write_all(&[status]).is_err() {
            return 0;
        }
        (written + 1) as u32
    }

    fn execute(
        &self,
        memory: &Memory,
        chain: DescriptorChain<&Memory>,
        writer: &mut virtio_queue::Writer<'_>,
        buf: &mut [u8],
    ) -> Result<(), RequestError> {
        let mut reader = chain
            .reader(memory)
            .map_err(|_| RequestError::Malformed("unreadable request buffers"))?;
        let header: RequestHeader = reader
            .read_obj()
            .map_err(|_| RequestError::Malformed("request header missing"))?;
        let sector = header.sector.to_native();
        match header.request_type.to_native() {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes() as u64;
                let offset = self.byte_range(sector, len)?;
                self.copy_to_guest(offset, len, writer, buf)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let len = reader.available_bytes() as u64;
                let offset = self.byte_range(sector, len)?;
                self.copy_from_guest(offset, len, &mut reader, buf)
            }
            VIRTIO_BLK_T_FLUSH => self
                .file
                .sync_data()
                .map_err(|e| RequestError::Io(e.kind())),
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(MAX_ID_LEN);
                writer
                    .write_all(&self.id[..n])
                    .map_err(|_| RequestError::Malformed("ID buffer unwritable"))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                if reader.available_bytes() != std::mem::size_of::<DiscardSegment>() {
                    return Err(RequestError::Malformed("expected exactly one segment"));
                }
                let segment: DiscardSegment = reader
                    .read_obj()
                    .map_err(|_| RequestError::Malformed("segment unreadable"))?;
                let len = u64::from(segment.num_sectors.to_native()) * SECTOR_SIZE;
                let offset = self.byte_range(segment.sector.to_native(), len)?;
                self.deallocate(offset, len)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they lie on the disk
    /// and are whole sectors.
    fn byte_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::OutOfRange);
        }
        let end = sector
            .checked_add(len / SECTOR_SIZE)
            .ok_or(RequestError::OutOfRange)?;
        if end > self.sectors {
            return Err(RequestError::OutOfRange);
        }
        Ok(sector * SECTOR_SIZE)
    }

    fn copy_to_guest(
        &self,
        mut offset: u64,
        len: u64,
        writer: &mut virtio_queue::Writer<'_>,
        buf: &mut [u8],
    ) -> Result<(), RequestError> {
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..n], offset)
                .map_err(|e| RequestError::Io(e.kind()))?;
            writer
                .write_all(&buf[..n])
                .map_err(|_| RequestError::Malformed("data buffer unwritable"))?;
            offset += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    fn copy_from_guest(
        &self,
        mut offset: u64,
        len: u64,
        reader: &mut virtio_queue::Reader<'_>,
        buf: &mut [u8],
    ) -> Result<(), RequestError> {
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            reader
                .read_exact(&mut buf[..n])
                .map_err(|_| RequestError::Malformed("data buffer unreadable"))?;
            self.file
                .write_all_at(&buf[..n], offset)
                .map_err(|e| RequestError::Io(e.kind()))?;
            offset += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    /// Discard punches a hole; write-zeroes zeroes the range (and may
    /// unmap it, which the config space allows).
    fn deallocate(&self, offset: u64, len: u64) -> Result<(), RequestError> {
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(RequestError::OutOfRange);
        };
        // SAFETY: fallocate on a descriptor we own, with plain integers; a
        // punched hole reads back as zeroes, which both requests require.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // A filesystem without hole punching: zero the bytes instead.
            let zeroes = vec![0u8; COPY_CHUNK];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(COPY_CHUNK as u64) as usize;
                self.file
                    .write_all_at(&zeroes[..n], at)
                    .map_err(|e| RequestError::Io(e.kind()))?;
                at += n as u64;
            }
            return Ok(());
        }
        Err(RequestError::Io(err.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{readable, writable, Guest, DATA_START};
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const HEADER: u64 = DATA_START;
    const DATA: u64 = DATA_START + 0x1000;
    const STATUS: u64 = DATA_START + 0x800;

    fn disk(sectors: u64, read_only: bool) -> (tempfile::NamedTempFile, DiskConfig) {
        let file = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(file.path(), &content).unwrap();
        let config = DiskConfig::at(file.path(), read_only, Some("capsa-test-disk".into()));
        (file, config)
    }

    fn guest(config: &DiskConfig) -> Guest {
        let mut guest = Guest::new(Box::new(Block::open(config).unwrap()));
        guest.activate(0, 1, 16);
        guest
    }

    fn header(g: &Guest, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        g.write(HEADER, &h);
    }

    /// Runs one request and returns (status byte, used length).
    fn request(g: &mut Guest, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
        header(g, kind, sector);
        g.write(STATUS, &[0xee]);
        let mut descs = vec![readable(HEADER, 16)];
        if let Some((len, device_writes)) = data {
            descs.push(if device_writes {
                writable(DATA, len)
            } else {
                readable(DATA, len)
            });
        }
        descs.push(writable(STATUS, 1));
        let before = g.used_idx(0);
        g.add_chain(0, &descs);
        g.notify(0);
        assert!(g.wait_used(0, before + 1), "request not completed");
        (g.read(STATUS, 1)[0], g.used_entry(0, before).1)
    }

    #[test]
    fn reads_and_writes_reach_the_image() {
        let (file, config) = disk(64, false);
        let mut g = guest(&config);
        let (status, used) = request(&mut g, VIRTIO_BLK_T_IN, 2, Some((1024, true)));
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        assert_eq!(used, 1025);
        let expected: Vec<u8> = (1024..2048u64).map(|i| (i % 251) as u8).collect();
        assert_eq!(g.read(DATA, 1024), expected);

        g.write(DATA, &[0xab; 512]);
        let (status, used) = request(&mut g, VIRTIO_BLK_T_OUT, 5, Some((512, false)));
        assert_eq!((status, used), (VIRTIO_BLK_S_OK as u8, 1));
        let (status, _) = request(&mut g, VIRTIO_BLK_T_FLUSH, 0, None);
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        let on_disk = std::fs::read(file.path()).unwrap();
        assert_eq!(&on_disk[5 * 512..6 * 512], &[0xab; 512][..]);
        assert_eq!(
            on_disk[6 * 512],
            ((6 * 512) % 251) as u8,
            "neighbours untouched"
        );
    }

    #[test]
    fn get_id_discard_and_write_zeroes() {
        let (file, config) = disk(64, false);
        let mut g = guest(&config);
        let (status, _) = request(&mut g, VIRTIO_BLK_T_GET_ID, 0, Some((20, true)));
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        assert_eq!(&g.read(DATA, 15), b"capsa-test-disk");

        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let mut segment = [0u8; 16];
            segment[0..8].copy_from_slice(&8u64.to_le_bytes());
            segment[8..12].copy_from_slice(&8u32.to_le_bytes());
            g.write(DATA, &segment);
            let (status, _) = request(&mut g, kind, 0, Some((16, false)));
            assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        }
        let on_disk = std::fs::read(file.path()).unwrap();
        assert!(on_disk[8 * 512..16 * 512].iter().all(|&b| b == 0));
        assert_eq!(on_disk.len(), 64 * 512, "size kept");
        assert_ne!(on_disk[16 * 512 + 1], 0);
    }

    #[test]
    fn bad_requests_fail_with_a_status_and_the_device_keeps_going() {
        let (_file, config) = disk(64, false);
        let mut g = guest(&config);
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        // Past the end, straddling the end, not whole sectors.
        assert_eq!(
            request(&mut g, VIRTIO_BLK_T_IN, 64, Some((512, true))).0,
            ioerr
        );
        assert_eq!(
            request(&mut g, VIRTIO_BLK_T_IN, 63, Some((1024, true))).0,
            ioerr
        );
        assert_eq!(
            request(&mut g, VIRTIO_BLK_T_IN, u64::MAX, Some((512, true))).0,
            ioerr
        );
        assert_eq!(
            request(&mut g, VIRTIO_BLK_T_OUT, 0, Some((100, false))).0,
            ioerr
        );
        assert_eq!(request(&mut g, 0x77, 0, None).0, VIRTIO_BLK_S_UNSUPP as u8);
        // Data in the wrong direction: a read whose buffer the device may
        // not write is seen as zero-length data plus the status byte.
        assert_eq!(
            request(&mut g, VIRTIO_BLK_T_IN, 0, Some((512, false))).0,
            VIRTIO_BLK_S_OK as u8
        );
        // Still serving.
        assert_eq!(
            request(&mut g, VIRTIO_BLK_T_IN, 0, Some((512, true))).0,
            VIRTIO_BLK_S_OK as u8
        );
        assert_eq!(g.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let (file, config) = disk(8, true);
        let mut g = guest(&config);
        assert_ne!(g.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
        g.write(DATA, &[1; 512]);
        let (status, _) = request(&mut g, VIRTIO_BLK_T_OUT, 0, Some((512, false)));
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(std::fs::read(file.path()).unwrap()[0], 0);
    }

    #[test]
    fn hostile_chains_complete_without_touching_the_image() {
        let (file, config) = disk(8, false);
        let before = std::fs::read(file.path()).unwrap();
        let mut g = guest(&config);
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        header(&g, VIRTIO_BLK_T_OUT, 0);
        // A loop: 0 -> 1 -> 0.
        g.write_raw_desc(0, 0, HEADER, 16, next, 1);
        g.write_raw_desc(0, 1, DATA, 512, next, 0);
        g.publish(0, 0);
        // Out of guest memory, and a length that wraps the address space.
        g.write_raw_desc(0, 2, HEADER, 16, next, 3);
        g.write_raw_desc(0, 3, 1 << 40, 512, next, 4);
        g.write_raw_desc(0, 4, STATUS, 1, write, 0);
        g.publish(0, 2);
        g.write_raw_desc(0, 5, HEADER, 16, next, 6);
        g.write_raw_desc(0, 6, u64::MAX - 10, u32::MAX, next, 7);
        g.write_raw_desc(0, 7, STATUS, 1, write, 0);
        g.publish(0, 5);
        // A next index beyond the table, and a zero-length chain.
        g.write_raw_desc(0, 8, HEADER, 16, next, 999);
        g.publish(0, 8);
        g.write_raw_desc(0, 9, HEADER, 0, 0, 0);
        g.publish(0, 9);
        g.notify(0);
        assert!(g.wait_used(0, 5), "the well-indexed chains complete");
        assert_eq!(std::fs::read(file.path()).unwrap(), before);
        // A good request afterwards is still served.
        let (status, _) = request(&mut g, VIRTIO_BLK_T_IN, 0, Some((512, true)));
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn an_avail_index_running_ahead_of_the_ring_breaks_the_device() {
        let (_file, config) = disk(8, false);
        let mut g = guest(&config);
        g.set_avail_idx(0, 500);
        g.notify(0);
        assert!(g.wait_broken());
        g.write_reg(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(g.status(), 0);
        // So does a head index beyond the descriptor table.
        g.activate(0, 1, 16);
        g.publish(0, 4000);
        g.notify(0);
        assert!(g.wait_broken());
        // Reset brings it back.
        g.write_reg(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(g.status(), 0);
        g.activate(0, 1, 16);
        let (status, _) = request(&mut g, VIRTIO_BLK_T_IN, 0, Some((512, true)));
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn images_that_are_not_whole_sectors_are_refused() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), [0u8; 1000]).unwrap();
        let config = DiskConfig::at(file.path(), false, None);
        let err = Block::open(&config).err().unwrap();
        assert!(err.to_string().contains("not a multiple of 512"), "{err}");
    }

    #[test]
    fn a_disk_open_read_write_is_locked_against_a_second_writer() {
        let (_file, config) = disk(8, false);
        let _first = Block::open(&config).unwrap();
        let err = Block::open(&config).err().unwrap();
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
