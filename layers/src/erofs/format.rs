//! Writes a tree (see `tree`) as an uncompressed EROFS image, the layout
//! the Linux driver reads (fs/erofs/erofs_fs.h): 4 KiB blocks; the
//! superblock at byte 1024 of block 0; file data in whole blocks from
//! block 1, written as the layer streams in; then directory blocks; then
//! the metadata area, every inode in the 64-byte extended form with its
//! extended attributes inline and, for small files and symlinks, its data
//! right after it (the "flat inline" layout, which may not cross a
//! block).

use std::io::{self, Read, Seek, SeekFrom, Write};

use super::tree::{Data, Kind, Node, NodeId, Tree};

pub const BLOCK: u64 = 4096;
const SUPER_OFFSET: u64 = 1024;
const MAGIC: u32 = 0xE0F5_E1E2;
const INODE_BYTES: u64 = 64;
const SLOT_BYTES: u64 = 32;
const DIRENT_BYTES: usize = 12;
const XATTR_HEADER_BYTES: u64 = 12;

const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_FLAT_INLINE: u16 = 2;
/// i_format: bit 0 set is the extended inode; the layout from bit 1.
const EXTENDED: u16 = 1;

pub const S_IFMT: u32 = 0o170_000;
pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFCHR: u32 = 0o020_000;
pub const S_IFBLK: u32 = 0o060_000;
pub const S_IFIFO: u32 = 0o010_000;

fn file_type(mode: u32) -> u8 {
    match mode & S_IFMT {
        S_IFREG => 1,
        S_IFDIR => 2,
        S_IFCHR => 3,
        S_IFBLK => 4,
        S_IFIFO => 5,
        S_IFLNK => 7,
        _ => 0,
    }
}

/// The EROFS name index and the rest of an extended attribute's name;
/// None for a namespace EROFS cannot hold.
pub fn xattr_index(name: &str) -> Option<(u8, &str)> {
    const PREFIXES: &[(&str, u8)] = &[("user.", 1), ("trusted.", 4), ("security.", 6)];
    match name {
        "system.posix_acl_access" => return Some((2, "")),
        "system.posix_acl_default" => return Some((3, "")),
        _ => {}
    }
    PREFIXES
        .iter()
        .find_map(|(prefix, index)| name.strip_prefix(prefix).map(|rest| (*index, rest)))
        .filter(|(_, rest)| !rest.is_empty())
}

fn align(value: u64, to: u64) -> u64 {
    value.div_ceil(to) * to
}

/// The bytes of a node's inline extended attributes (0 without any).
fn xattr_bytes(node: &Node) -> u64 {
    if node.xattrs.is_empty() {
        return 0;
    }
    XATTR_HEADER_BYTES
        + node
            .xattrs
            .iter()
            .map(|(name, value)| {
                let rest = xattr_index(name).map_or(name.len(), |(_, r)| r.len());
                align(4 + rest as u64 + value.len() as u64, 4)
            })
            .sum::<u64>()
}

/// Streams file data into whole blocks from block 1 on.
pub struct Writer<W: Write + Seek> {
    out: W,
    next_block: u64,
}

/// Where one inode goes and how its data is laid out.
#[derive(Clone, Copy, Default)]
struct Placement {
    nid: u64,
    layout: u16,
    /// Data blocks (flat plain), or 0.
    blkaddr: u64,
    size: u64,
}

impl<W: Write + Seek> Writer<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        out.seek(SeekFrom::Start(BLOCK))?;
        Ok(Writer { out, next_block: 1 })
    }

    /// Writes `data` at the next free block, padded to whole blocks;
    /// returns its first block.
    pub fn write_blocks(&mut self, data: &[u8]) -> io::Result<u64> {
        let start = self.next_block;
        self.out.seek(SeekFrom::Start(start * BLOCK))?;
        self.out.write_all(data)?;
        let padded = align(data.len() as u64, BLOCK);
        self.pad(padded - data.len() as u64)?;
        self.next_block += padded / BLOCK;
        Ok(start)
    }

    /// Starts a file whose bytes come in pieces (`append`), then `end_file`.
    pub fn start_file(&mut self) -> io::Result<u64> {
        self.out.seek(SeekFrom::Start(self.next_block * BLOCK))?;
        Ok(self.next_block)
    }

    pub fn append(&mut self, piece: &[u8]) -> io::Result<()> {
        self.out.write_all(piece)
    }

    pub fn end_file(&mut self, start: u64, size: u64) -> io::Result<()> {
        let padded = align(size, BLOCK);
        self.pad(padded - size)?;
        self.next_block = start + padded / BLOCK;
        Ok(())
    }

    fn pad(&mut self, bytes: u64) -> io::Result<()> {
        io::copy(&mut io::repeat(0).take(bytes), &mut self.out).map(|_| ())
    }

    /// Lays out and writes the directories and the inodes of `tree`, then
    /// the superblock; returns the image's size in blocks.
    pub fn finish(mut self, tree: &Tree) -> io::Result<u64> {
        let order = tree.inodes_in_order();
        let mut placements = vec![Placement::default(); tree.len()];
        // Small data that will not fit beside its inode goes to blocks.
        let mut offset = 0u64;
        for &id in &order {
            let node = tree.node(id);
            let head = INODE_BYTES + xattr_bytes(node);
            let inline = match &node.kind {
                Kind::File(Data::Inline(bytes)) | Kind::Symlink(bytes) => Some(bytes.as_slice()),
                _ => None,
            };
            let mut placement = Placement {
                layout: LAYOUT_FLAT_PLAIN,
                ..Placement::default()
            };
            match inline {
                Some(bytes) if head + bytes.len() as u64 <= BLOCK => {
                    let in_block = offset % BLOCK;
                    if in_block + head + bytes.len() as u64 > BLOCK {
                        offset = align(offset, BLOCK);
                    }
                    placement.layout = LAYOUT_FLAT_INLINE;
                    placement.size = bytes.len() as u64;
                    placement.nid = offset / SLOT_BYTES;
                    offset = align(offset + head + bytes.len() as u64, SLOT_BYTES);
                }
                Some(bytes) => {
                    placement.blkaddr = self.write_blocks(bytes)?;
                    placement.size = bytes.len() as u64;
                    placement.nid = offset / SLOT_BYTES;
                    offset = align(offset + head, SLOT_BYTES);
                }
                None => {
                    if let Kind::File(Data::Blocks { blkaddr, size }) = node.kind {
                        placement.blkaddr = blkaddr;
                        placement.size = size;
                    }
                    placement.nid = offset / SLOT_BYTES;
                    offset = align(offset + head, SLOT_BYTES);
                }
            }
            placements[id] = placement;
        }
        let metadata_bytes = offset;
        for &id in &order {
            if let Kind::Dir(_) = tree.node(id).kind {
                let blocks = dirent_blocks(tree, id, &placements);
                let mut all = Vec::with_capacity(blocks.len() * BLOCK as usize);
                for block in &blocks {
                    all.resize(align(all.len() as u64, BLOCK) as usize, 0);
                    all.extend_from_slice(block);
                }
                // The last block's used part is the directory's tail.
                let last = blocks.last().map_or(0, Vec::len) as u64;
                let size = (blocks.len() as u64 - 1) * BLOCK + last;
                placements[id].blkaddr = self.write_blocks(&all)?;
                placements[id].size = size;
            }
        }
        let meta_block = self.next_block;
        for (ino, &id) in order.iter().enumerate() {
            let node = tree.node(id);
            let placement = placements[id];
            self.out.seek(SeekFrom::Start(
                meta_block * BLOCK + placement.nid * SLOT_BYTES,
            ))?;
            let mut bytes = inode_bytes(node, placement, ino as u32 + 1);
            match &node.kind {
                Kind::File(Data::Inline(data)) | Kind::Symlink(data)
                    if placement.layout == LAYOUT_FLAT_INLINE =>
                {
                    bytes.extend_from_slice(data)
                }
                _ => {}
            }
            self.out.write_all(&bytes)?;
        }
        let blocks = meta_block + align(metadata_bytes, BLOCK) / BLOCK;
        self.out.seek(SeekFrom::Start(blocks * BLOCK - 1))?;
        self.out.write_all(&[0])?;
        self.out.seek(SeekFrom::Start(SUPER_OFFSET))?;
        self.out.write_all(&superblock(
            placements[tree.root()].nid,
            order.len() as u64,
            blocks,
            meta_block,
        ))?;
        self.out.flush()?;
        Ok(blocks)
    }
}

fn superblock(root_nid: u64, inodes: u64, blocks: u64, meta_block: u64) -> Vec<u8> {
    let mut sb = vec![0u8; 128];
    sb[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    // No checksum (feature_compat 0), no incompatible features.
    sb[12] = 12; // blkszbits: 4 KiB
    sb[14..16].copy_from_slice(&(root_nid as u16).to_le_bytes());
    sb[16..24].copy_from_slice(&inodes.to_le_bytes());
    sb[36..40].copy_from_slice(&(blocks as u32).to_le_bytes());
    sb[40..44].copy_from_slice(&(meta_block as u32).to_le_bytes());
    sb
}

fn inode_bytes(node: &Node, placement: Placement, ino: u32) -> Vec<u8> {
    let mut b = vec![0u8; INODE_BYTES as usize];
    let format = EXTENDED | (placement.layout << 1);
    b[0..2].copy_from_slice(&format.to_le_bytes());
    let xattrs = xattr_bytes(node);
    let icount: u16 = if xattrs == 0 {
        0
    } else {
        ((xattrs - XATTR_HEADER_BYTES) / 4 + 1) as u16
    };
    b[2..4].copy_from_slice(&icount.to_le_bytes());
    b[4..6].copy_from_slice(&(node.mode as u16).to_le_bytes());
    let (size, u) = match node.kind {
        Kind::Device { rdev } => (0, rdev),
        _ => (placement.size, placement.blkaddr as u32),
    };
    b[8..16].copy_from_slice(&size.to_le_bytes());
    b[16..20].copy_from_slice(&u.to_le_bytes());
    b[20..24].copy_from_slice(&ino.to_le_bytes());
    b[24..28].copy_from_slice(&node.uid.to_le_bytes());
    b[28..32].copy_from_slice(&node.gid.to_le_bytes());
    b[32..40].copy_from_slice(&node.mtime.to_le_bytes());
    b[44..48].copy_from_slice(&node.nlink.to_le_bytes());
    if xattrs > 0 {
        // The inline xattr header: no name filter, no shared xattrs.
        b.extend_from_slice(&[0u8; XATTR_HEADER_BYTES as usize]);
        for (name, value) in &node.xattrs {
            let (index, rest) = xattr_index(name).unwrap_or((0, name));
            let start = b.len();
            b.push(rest.len() as u8);
            b.push(index);
            b.extend_from_slice(&(value.len() as u16).to_le_bytes());
            b.extend_from_slice(rest.as_bytes());
            b.extend_from_slice(value);
            b.resize(start + align((b.len() - start) as u64, 4) as usize, 0);
        }
    }
    b
}

/// A directory's entries ("." and ".." among them), sorted by name as the
/// driver's binary search needs, packed into blocks.
fn dirent_blocks(tree: &Tree, dir: NodeId, placements: &[Placement]) -> Vec<Vec<u8>> {
    let mut entries: Vec<(&[u8], NodeId)> = vec![(b".", dir), (b"..", tree.parent(dir))];
    if let Kind::Dir(children) = &tree.node(dir).kind {
        entries.extend(children.iter().map(|(name, &id)| (name.as_slice(), id)));
    }
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let mut blocks = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        let mut used = 0usize;
        let mut end = start;
        while end < entries.len() && used + DIRENT_BYTES + entries[end].0.len() <= BLOCK as usize {
            used += DIRENT_BYTES + entries[end].0.len();
            end += 1;
        }
        let chunk = &entries[start..end];
        let mut block = Vec::with_capacity(used);
        let mut name_offset = chunk.len() * DIRENT_BYTES;
        for (name, id) in chunk {
            block.extend_from_slice(&placements[*id].nid.to_le_bytes());
            block.extend_from_slice(&(name_offset as u16).to_le_bytes());
            block.push(file_type(tree.node(*id).mode));
            block.push(0);
            name_offset += name.len();
        }
        for (name, _) in chunk {
            block.extend_from_slice(name);
        }
        blocks.push(block);
        start = end;
    }
    blocks
}
