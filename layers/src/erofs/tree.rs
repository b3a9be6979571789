//! One layer as a tree of inodes, built from its tar entries with the
//! same policy as `unpack` (nothing outside the root, nothing through a
//! symlink or another non-directory, hard links only to this layer's own
//! files, overlay's xattrs only ours) and in the same overlay form (OCI
//! whiteouts become 0:0 character devices, opaque markers the
//! `trusted.overlay.opaque` xattr). Nothing is written to any host
//! filesystem: a device node or a set-id file is only bytes of the image.

use std::collections::BTreeMap;

use super::format::{S_IFCHR, S_IFDIR};

pub type NodeId = usize;

/// File data: small files stay here until the metadata is written, larger
/// ones are already in blocks of the image.
#[derive(Debug)]
pub enum Data {
    Inline(Vec<u8>),
    Blocks { blkaddr: u64, size: u64 },
}

#[derive(Debug)]
pub enum Kind {
    Dir(BTreeMap<Vec<u8>, NodeId>),
    File(Data),
    Symlink(Vec<u8>),
    /// Character and block devices (by `mode`), FIFOs (rdev 0).
    Device {
        rdev: u32,
    },
}

#[derive(Debug)]
pub struct Node {
    /// Type and permission bits, as st_mode.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub nlink: u32,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub kind: Kind,
    parent: NodeId,
}

pub struct Tree {
    nodes: Vec<Node>,
}

/// Why an entry cannot go where it says.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    ThroughSymlink(String),
    NotADirectory(String),
    LinkTargetMissing,
    LinkToDirectory,
    ReplacesRoot,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ThroughSymlink(at) => write!(
                f,
                "{at} is a symlink, and writing through it could escape the root"
            ),
            Refusal::NotADirectory(at) => write!(f, "{at} is not a directory"),
            Refusal::LinkTargetMissing => write!(f, "hard link target is not in this layer"),
            Refusal::LinkToDirectory => write!(f, "hard link to a directory"),
            Refusal::ReplacesRoot => write!(f, "entry would replace the root"),
        }
    }
}

const ROOT: NodeId = 0;

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    pub fn new() -> Self {
        Tree {
            nodes: vec![made_directory(ROOT)],
        }
    }

    pub fn root(&self) -> NodeId {
        ROOT
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    pub fn parent(&self, id: NodeId) -> NodeId {
        self.nodes[id].parent
    }

    /// The directory `parents` names (made when missing, as `unpack`
    /// makes them: 0755, root's), refusing to pass through anything else.
    fn directory(&mut self, parents: &[&[u8]]) -> Result<NodeId, Refusal> {
        let mut at = ROOT;
        let mut walked = Vec::new();
        for part in parents {
            walked.push(String::from_utf8_lossy(part).into_owned());
            let existing = match &self.nodes[at].kind {
                Kind::Dir(children) => children.get(*part).copied(),
                _ => unreachable!("only directories are walked into"),
            };
            at = match existing {
                Some(id) => match self.nodes[id].kind {
                    Kind::Dir(_) => id,
                    Kind::Symlink(_) => return Err(Refusal::ThroughSymlink(walked.join("/"))),
                    _ => return Err(Refusal::NotADirectory(walked.join("/"))),
                },
                None => self.insert(at, part, made_directory(at)),
            };
        }
        Ok(at)
    }

    /// Puts `node` at `name` in `dir`, replacing what was there.
    fn insert(&mut self, dir: NodeId, name: &[u8], mut node: Node) -> NodeId {
        self.remove(dir, name);
        node.parent = dir;
        let is_dir = matches!(node.kind, Kind::Dir(_));
        let id = self.nodes.len();
        self.nodes.push(node);
        self.link_into(dir, name, id);
        if is_dir {
            self.nodes[dir].nlink += 1;
        }
        id
    }

    fn link_into(&mut self, dir: NodeId, name: &[u8], id: NodeId) {
        if let Kind::Dir(children) = &mut self.nodes[dir].kind {
            children.insert(name.to_vec(), id);
        }
    }

    /// Takes `name` out of `dir`; its node stays in the arena, unreached.
    fn remove(&mut self, dir: NodeId, name: &[u8]) {
        let removed = match &mut self.nodes[dir].kind {
            Kind::Dir(children) => children.remove(name),
            _ => None,
        };
        if let Some(old) = removed {
            if matches!(self.nodes[old].kind, Kind::Dir(_)) {
                self.nodes[dir].nlink -= 1;
            } else {
                self.nodes[old].nlink = self.nodes[old].nlink.saturating_sub(1);
            }
        }
    }

    fn split<'a, 'b>(path: &'a [&'b [u8]]) -> (&'a [&'b [u8]], &'b [u8]) {
        match path.split_last() {
            Some((last, parents)) => (parents, last),
            None => (&[], b""),
        }
    }

    /// Adds a non-directory (or a directory, merged with one already
    /// there) at `path`; returns its id.
    pub fn add(&mut self, path: &[&[u8]], node: Node) -> Result<NodeId, Refusal> {
        if path.is_empty() {
            // "./": only a directory's metadata can apply to the root.
            if !matches!(node.kind, Kind::Dir(_)) {
                return Err(Refusal::ReplacesRoot);
            }
            let root = &mut self.nodes[ROOT];
            (root.mode, root.uid, root.gid, root.mtime) =
                (node.mode, node.uid, node.gid, node.mtime);
            root.xattrs = node.xattrs;
            return Ok(ROOT);
        }
        let (parents, name) = Self::split(path);
        let dir = self.directory(parents)?;
        if let Kind::Dir(_) = node.kind {
            let existing = match &self.nodes[dir].kind {
                Kind::Dir(children) => children.get(name).copied(),
                _ => None,
            };
            if let Some(id) = existing.filter(|&id| matches!(self.nodes[id].kind, Kind::Dir(_))) {
                let there = &mut self.nodes[id];
                (there.mode, there.uid, there.gid, there.mtime) =
                    (node.mode, node.uid, node.gid, node.mtime);
                there.xattrs = node.xattrs;
                return Ok(id);
            }
        }
        Ok(self.insert(dir, name, node))
    }

    /// A hard link at `path` to the non-directory at `target`, which this
    /// layer must already hold.
    pub fn hard_link(&mut self, path: &[&[u8]], target: &[&[u8]]) -> Result<(), Refusal> {
        let (target_parents, target_name) = Self::split(target);
        let mut at = ROOT;
        for part in target_parents {
            at = match &self.nodes[at].kind {
                Kind::Dir(children) => *children.get(*part).ok_or(Refusal::LinkTargetMissing)?,
                _ => return Err(Refusal::LinkTargetMissing),
            };
            if !matches!(self.nodes[at].kind, Kind::Dir(_)) {
                return Err(Refusal::NotADirectory(
                    String::from_utf8_lossy(part).into_owned(),
                ));
            }
        }
        let id = match &self.nodes[at].kind {
            Kind::Dir(children) => *children
                .get(target_name)
                .ok_or(Refusal::LinkTargetMissing)?,
            _ => return Err(Refusal::LinkTargetMissing),
        };
        if matches!(self.nodes[id].kind, Kind::Dir(_)) {
            return Err(Refusal::LinkToDirectory);
        }
        let (parents, name) = Self::split(path);
        let dir = self.directory(parents)?;
        self.remove(dir, name);
        self.nodes[id].nlink += 1;
        self.link_into(dir, name, id);
        Ok(())
    }

    /// An OCI whiteout: `name` in the directory `parents` is hidden from
    /// the layers below (an overlay whiteout in its place).
    pub fn whiteout(&mut self, parents: &[&[u8]], name: &[u8]) -> Result<(), Refusal> {
        let dir = self.directory(parents)?;
        self.insert(
            dir,
            name,
            Node {
                mode: S_IFCHR,
                uid: 0,
                gid: 0,
                mtime: 0,
                nlink: 1,
                xattrs: Vec::new(),
                kind: Kind::Device { rdev: 0 },
                parent: dir,
            },
        );
        Ok(())
    }

    /// An OCI opaque marker: the directory hides the layers' below.
    pub fn opaque(&mut self, parents: &[&[u8]], xattr: &str) -> Result<(), Refusal> {
        let dir = self.directory(parents)?;
        let xattrs = &mut self.nodes[dir].xattrs;
        xattrs.retain(|(name, _)| name != xattr);
        xattrs.push((xattr.to_string(), b"y".to_vec()));
        Ok(())
    }

    /// Every inode reachable from the root, each once (a hard link's
    /// inode at its first name), the root first.
    pub fn inodes_in_order(&self) -> Vec<NodeId> {
        let mut seen = vec![false; self.nodes.len()];
        let mut order = Vec::new();
        let mut queue = std::collections::VecDeque::from([ROOT]);
        seen[ROOT] = true;
        while let Some(id) = queue.pop_front() {
            order.push(id);
            if let Kind::Dir(children) = &self.nodes[id].kind {
                for &child in children.values() {
                    if !seen[child] {
                        seen[child] = true;
                        queue.push_back(child);
                    }
                }
            }
        }
        order
    }
}

/// A directory the layer implies but does not list (the root, or a parent
/// of an entry): 0755, root's, as `unpack` makes them.
fn made_directory(parent: NodeId) -> Node {
    Node {
        mode: S_IFDIR | 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        nlink: 2,
        xattrs: Vec::new(),
        kind: Kind::Dir(BTreeMap::new()),
        parent,
    }
}

/// A node for a tar entry's metadata and kind.
pub fn node(
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
    kind: Kind,
) -> Node {
    let nlink = if matches!(kind, Kind::Dir(_)) { 2 } else { 1 };
    Node {
        mode,
        uid,
        gid,
        mtime,
        nlink,
        xattrs,
        kind,
        parent: ROOT,
    }
}
