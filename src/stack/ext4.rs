//! The ext4 filesystem inside the container: mkfs, fsck, resize.
//!
//! mkfs writes the inode tables at once (`lazy_itable_init=0`): otherwise the kernel's
//! ext4lazyinit thread zeroes them in the background after the first mount, across the
//! network, long after `init` said it was done. The cost of that is paid once and is
//! proportional to the inode tables, so the inode count is sized for backups
//! (`Profile::inode_count`, default one inode per 64 KiB, a quarter of mke2fs's default)
//! instead of mke2fs's 1.56 % of the size: 16 GiB with defaults wrote 340 MiB to the server
//! at init (FACTS.md). `-m 0`: no blocks reserved for root on a data volume.
//!
//! The journal is not written at init (`lazy_journal_init=1`): only its superblock is, and
//! the rest is allocated on the server as runs first write it (see [`chosen_journal_bytes`]
//! for its size). Its never-written blocks decrypt to random bytes, which recovery cannot
//! take for a transaction: jbd2 replays from the journal superblock's start block and stops
//! at the first block without the journal magic and the next expected sequence number (64
//! bits to match by chance), and ext4 with metadata_csum checksums every journal block on
//! top. What e2fsprogs warns about with lazy journal init is a stale journal of an earlier
//! filesystem on reused disk, whose blocks do carry the magic; a new sparse container holds
//! none.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cmd::Cmd;
use crate::fsutil::{plan_reads, read_ranges, Beneath};

pub fn mkfs(device: &Path, label: &str, inodes: u64, journal: u64) -> Result<()> {
    Cmd::new("mkfs.ext4")?
        .args(["-q", "-F", "-m", "0", "-I", "256", "-L", label, "-N"])
        .arg(inodes.to_string())
        .arg("-J")
        .arg(format!("size={}", journal >> 20))
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=1"])
        // Metadata checksums (crc32c over every inode, directory block, bitmap, group
        // descriptor, and the journal's blocks) are what stop garbled or replayed-out-of-place
        // ciphertext from reaching the kernel's ext4 code as plausible metadata: required,
        // not left to mke2fs's defaults ([`check_features`]). 64bit goes with them (64-byte
        // group descriptors, whose checksums cover the bitmaps' too).
        .args(["-O", "metadata_csum,64bit"])
        .arg(device)
        .run()?;
    Ok(())
}

/// Whether the ext4 on `device` has a journal that needs recovery (the superblock's
/// INCOMPAT_RECOVER flag: set while mounted read-write, cleared by a clean unmount). Read
/// straight from the superblock (offset 1024, s_feature_incompat at 0x60), no process.
pub fn needs_recovery(device: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(device)
        .with_context(|| format!("opening {} to read its superblock", device.display()))?;
    let mut sb = [0u8; 0x64];
    f.read_exact_at(&mut sb, 1024)
        .with_context(|| format!("reading the superblock of {}", device.display()))?;
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        anyhow::bail!(
            "{} holds no ext4 filesystem (bad superblock magic)",
            device.display()
        );
    }
    let incompat = u32::from_le_bytes([sb[0x60], sb[0x61], sb[0x62], sb[0x63]]);
    Ok(incompat & 0x4 != 0)
}

/// The superblock's feature flags that every open requires: RO_COMPAT_METADATA_CSUM and
/// INCOMPAT_64BIT, with crc32c as the checksum type.
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const INCOMPAT_64BIT: u32 = 0x80;
const CHECKSUM_CRC32C: u8 = 1;

/// Refuse (exit 6) an ext4 on `device` (the opened mapping: decrypted bytes) without
/// metadata checksums: without them the kernel takes whatever the blocks decrypt to for
/// metadata, so a server's flipped or replayed ciphertext reaches ext4's code as plausible
/// structures instead of being refused as a checksum error. `init` makes every container
/// with them ([`mkfs`]). Read straight from the superblock, before the mount.
pub fn check_features(device: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(device)
        .with_context(|| format!("opening {} to read its superblock", device.display()))?;
    let mut sb = [0u8; 1024];
    f.read_exact_at(&mut sb, 1024)
        .with_context(|| format!("reading the superblock of {}", device.display()))?;
    features_ok(&sb).map_err(|why| {
        crate::error::Failure::Security(format!(
            "the ext4 filesystem in the container ({}) {why}: e2ebackup creates every container \
             with metadata checksums, which keep altered ciphertext from reaching the kernel as \
             plausible metadata, and refuses to mount one without them",
            device.display()
        ))
        .into()
    })
}

/// [`check_features`] on the superblock's 1024 bytes; the error says what is missing.
fn features_ok(sb: &[u8; 1024]) -> std::result::Result<(), String> {
    let le32 = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return Err("has no ext4 superblock (bad magic)".into());
    }
    let mut missing = Vec::new();
    if le32(0x64) & RO_COMPAT_METADATA_CSUM == 0 {
        missing.push("metadata_csum");
    }
    if le32(0x60) & INCOMPAT_64BIT == 0 {
        missing.push("64bit");
    }
    if !missing.is_empty() {
        return Err(format!("lacks the feature(s) {}", missing.join(", ")));
    }
    if sb[0x175] != CHECKSUM_CRC32C {
        return Err(format!("names checksum type {}, not crc32c (1)", sb[0x175]));
    }
    Ok(())
}

/// What a read-only `e2fsck -fn` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Fsck {
    Clean,
    /// Errors it would have corrected (exit 4).
    Errors,
    /// It stopped (exit 8 or 12): on a filesystem with metadata checksums, what it stopped
    /// at is typically a checksum that does not match ("Inode checksum does not match
    /// inode"). The last lines of its output.
    Aborted {
        code: i32,
        output: String,
    },
}

/// Read-only check (`e2fsck -fn`).
pub fn check_readonly(device: &Path) -> Result<Fsck> {
    let d = Cmd::new("e2fsck")?
        .args(["-f", "-n"])
        .arg(device)
        .ok_codes(&[0, 1, 4, 8, 12])
        .run()?;
    Ok(match d.code {
        0 => Fsck::Clean,
        1 | 4 => Fsck::Errors,
        code => Fsck::Aborted {
            code,
            output: crate::cmd::tail(&format!("{}\n{}", d.stdout, d.stderr), 4)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        },
    })
}

/// mke2fs's default journal size for a filesystem of `blocks` 4 KiB blocks
/// (ext2fs_default_journal_size in e2fsprogs).
pub fn journal_bytes(blocks: u64) -> u64 {
    let jblocks = match blocks {
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    };
    jblocks * 4096
}

/// The smallest journal `init` gives a filesystem that mke2fs would give as much: what a run
/// of 20000 small files needs so that its metadata fits the journal without a forced
/// checkpoint in between (a transaction holds a quarter of the journal). Measured on the
/// host tier, 20000 files, 25 ms each way (docs/benchmarks.md, run 8): a full backup took
/// 13.5 s with a 5 MiB journal, 11.3 s with 8, 9.5 s with 16 and 8.4-8.5 s with 32 or 64;
/// a no-change run 5.1, 4.3, 3.4 and 3.4-3.5 s.
pub const MIN_JOURNAL: u64 = 32 << 20;

/// The journal `init` creates for a filesystem of `fs_bytes`: a 256th of it in whole MiB (as
/// much as the inode tables, whose changes it carries), at least [`MIN_JOURNAL`], at most
/// mke2fs's default (which is 4 MiB below 128 MiB and 32 MiB at 1 GiB). It is not written
/// at init (`lazy_journal_init=1`): it is allocated on the server as the first runs cycle
/// through it, and then stays allocated. A 256th, not a thousandth as before run 10: at
/// 100000 files in 25 GiB (host tier, 25 ms each way) a no-change step took 12.2-13.6 s
/// with 32 MiB, where a transaction fills and forces a checkpoint mid-run, and 11.2-11.4 s
/// with 100 MiB (11.0-11.6 with 128).
pub fn chosen_journal_bytes(fs_bytes: u64) -> u64 {
    ((fs_bytes >> 8) >> 20 << 20)
        .max(MIN_JOURNAL)
        .min(journal_bytes(fs_bytes / 4096))
}

/// Bytes `init` writes to the server: LUKS2 header (metadata and keyslot area,
/// [`crate::stack::luks::HEADER_BYTES`]), inode tables, and ~0.3 % of bitmaps and group
/// descriptors. The journal is not among them (see [`chosen_journal_bytes`]).
pub fn estimate_init_bytes(size: u64, inodes: u64) -> u64 {
    crate::stack::luks::HEADER_BYTES + inodes * 256 + size / 300
}

/// Size of the ext4 filesystem on `device` in bytes (block count x block size).
pub fn fs_bytes(device: &Path) -> Result<u64> {
    let d = Cmd::new("dumpe2fs")?.arg("-h").arg(device).run()?;
    let field = |name: &str| -> Option<u64> {
        d.stdout
            .lines()
            .find(|l| l.starts_with(name))?
            .split(':')
            .nth(1)?
            .trim()
            .parse()
            .ok()
    };
    match (field("Block count:"), field("Block size:")) {
        (Some(c), Some(s)) => Ok(c * s),
        _ => anyhow::bail!("cannot read the ext4 size of {}", device.display()),
    }
}

/// `e2fsck -f -p`: required by resize2fs before an offline resize. Exit 1 (errors fixed)
/// is fine; anything worse stops the grow.
pub fn fsck_preen(device: &Path) -> Result<()> {
    Cmd::new("e2fsck")?
        .args(["-f", "-p"])
        .arg(device)
        .ok_codes(&[0, 1])
        .run()?;
    Ok(())
}

/// Grow the filesystem to fill its device (online if mounted, offline otherwise).
pub fn resize_to_fill(device: &Path) -> Result<()> {
    Cmd::new("resize2fs")?.arg(device).run()?;
    Ok(())
}

// ---------------------------------------------------------------- metadata read-ahead

/// What [`read_metadata`] read into the page cache of the device.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MetadataRead {
    /// Bytes of the used part of the inode tables, and of the bitmaps.
    pub table_bytes: u64,
    /// Bytes of directory blocks (and the small gaps between them read through).
    pub directory_bytes: u64,
    /// Read requests issued (at most [`READ_CHUNK`] each).
    pub reads: usize,
}

/// A run of blocks (first, count) and the creation time of the directory it belongs to.
type Dated = (u64, (u64, u64));

/// The largest single read: large enough to keep several SFTP requests in flight behind
/// one read, small enough to spread over the threads.
pub const READ_CHUNK: u64 = 256 << 10;
/// Directory extents closer than this are read as one (the gap is read through).
const GAP_READ_THROUGH: u64 = 32 << 10;

/// The layout the superblock gives, validated before anything is computed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    block: u64,
    groups: u64,
    inodes_per_group: u64,
    inode_size: u64,
    desc_size: u64,
    /// First block of the group descriptor table.
    gdt_block: u64,
    blocks: u64,
}

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}
fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

impl Geometry {
    /// From the 1024 bytes of the superblock. Every value comes from inside the container
    /// (the server cannot forge it coherently, but can garble it): anything out of range
    /// is an error, not a read of whatever it points at.
    fn parse(sb: &[u8]) -> Result<Geometry> {
        anyhow::ensure!(sb.len() >= 1024, "short superblock");
        anyhow::ensure!(le16(sb, 0x38) == 0xEF53, "bad superblock magic");
        let log = le32(sb, 0x18);
        anyhow::ensure!(log <= 6, "block size out of range");
        let block = 1024u64 << log;
        let incompat = le32(sb, 0x60);
        let wide = incompat & 0x80 != 0; // INCOMPAT_64BIT
        let blocks = le32(sb, 0x04) | if wide { le32(sb, 0x150) << 32 } else { 0 };
        let first = le32(sb, 0x14);
        let per_group = le32(sb, 0x20);
        let inodes_per_group = le32(sb, 0x28);
        let inode_size = le16(sb, 0x58);
        let desc_size = if wide { le16(sb, 0xFE) } else { 32 };
        anyhow::ensure!(
            per_group > 0
                && inodes_per_group > 0
                && (128..=block).contains(&inode_size)
                && inode_size.is_power_of_two()
                && (32..=1024).contains(&desc_size)
                && blocks > first
                && blocks.checked_mul(block).is_some_and(|b| b <= 1 << 60),
            "superblock values out of range"
        );
        Ok(Geometry {
            block,
            groups: (blocks - first).div_ceil(per_group),
            inodes_per_group,
            inode_size,
            desc_size,
            gdt_block: first + 1,
            blocks,
        })
    }

    /// Byte ranges of each group's used inode-table prefix and of its two bitmaps, from
    /// the group descriptor table; anything pointing past the filesystem is left out.
    fn table_ranges(&self, gdt: &[u8]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let dsz = self.desc_size as usize;
        for d in gdt.chunks_exact(dsz).take(self.groups as usize) {
            let hi = |at: usize| if dsz >= 64 { le32(d, at) << 32 } else { 0 };
            let hi16 = |at: usize| if dsz >= 64 { le16(d, at) << 16 } else { 0 };
            let block_bitmap = le32(d, 0x00) | hi(0x20);
            let inode_bitmap = le32(d, 0x04) | hi(0x24);
            let table = le32(d, 0x08) | hi(0x28);
            let flags = le16(d, 0x12);
            let unused = le16(d, 0x1C) | hi16(0x32);
            for b in [block_bitmap, inode_bitmap] {
                if b > 0 && b < self.blocks {
                    out.push((b * self.block, self.block));
                }
            }
            // INODE_UNINIT: nothing in this group's table was ever used.
            let used = if flags & 0x1 != 0 {
                0
            } else {
                self.inodes_per_group.saturating_sub(unused)
            };
            let len = used * self.inode_size;
            if len > 0 && table > 0 && table.saturating_add(len.div_ceil(self.block)) <= self.blocks
            {
                out.push((table * self.block, len));
            }
        }
        out
    }

    /// The extents (first block, length) of every directory among the inodes in `table`,
    /// each with the directory's creation time (unix seconds; `u64::MAX` for an inode
    /// without one: it counts as new), as far as the inode itself lists them; `nodes` gets
    /// the blocks of the extent-tree nodes below a directory with more than four runs of
    /// blocks ([`Self::extent_node`] reads them), with the same time. Inline and non-extent
    /// directories are left to the walk that follows.
    fn directory_extents(&self, table: &[u8], out: &mut Vec<Dated>, nodes: &mut Vec<Dated>) {
        let (mut found, mut below) = (Vec::new(), Vec::new());
        for ino in table.chunks_exact(self.inode_size as usize) {
            let mode = le16(ino, 0x00);
            let links = le16(ino, 0x1A);
            let flags = le32(ino, 0x20);
            if mode & 0xF000 != 0x4000 || links == 0 || flags & 0x80000 == 0 {
                continue;
            }
            // i_crtime, where the inode has room for it (i_extra_isize covers it).
            let born = if ino.len() >= 0x94 && le16(ino, 0x80) >= 0x18 {
                le32(ino, 0x90)
            } else {
                u64::MAX
            };
            self.extent_node(&ino[0x28..0x28 + 60], &mut found, &mut below);
            out.extend(found.drain(..).map(|e| (born, e)));
            nodes.extend(below.drain(..).map(|b| (born, (b, 1))));
        }
    }

    /// One node of an extent tree (the 60 bytes in the inode, or a tree block): a leaf
    /// adds its extents to `out`, an index node its children's blocks to `nodes`. Anything
    /// malformed or pointing past the filesystem is skipped.
    fn extent_node(&self, node: &[u8], out: &mut Vec<(u64, u64)>, nodes: &mut Vec<u64>) {
        if node.len() < 12 || le16(node, 0) != 0xF30A {
            return;
        }
        let entries = (le16(node, 2) as usize).min(node.len() / 12 - 1);
        let leaf = le16(node, 6) == 0;
        for e in 0..entries {
            let x = &node[12 + 12 * e..24 + 12 * e];
            if leaf {
                let mut len = le16(x, 4);
                if len > 32768 {
                    len -= 32768; // an uninitialized extent: still its blocks
                }
                let start = (le16(x, 6) << 32) | le32(x, 8);
                if len > 0 && start > 0 && start.saturating_add(len) <= self.blocks {
                    out.push((start, len));
                }
            } else {
                let child = (le16(x, 8) << 32) | le32(x, 4);
                if child > 0 && child < self.blocks {
                    nodes.push(child);
                }
            }
        }
    }
}

/// Read the metadata of the ext4 on `device` into the device's page cache, which is the
/// cache ext4 itself reads its metadata through: the used part of every inode table, the
/// bitmaps, then the blocks of every directory those inodes describe. Large reads, several
/// at a time: in a container mounted over the network that is a few dozen round trips
/// instead of one per cold block when rsync's `--link-dest` walk asks for them one after
/// another (docs/benchmarks.md). Only directories created at or after the time `since`
/// returns (unix seconds) are read: the previous snapshot's, not every older one's; none if
/// it returns `None`. It is asked once the tables are read, so a caller can start this
/// before it knows which snapshot that is. Reading a mounted filesystem's device is
/// coherent with the filesystem (one page cache), and only reads. At most `budget` bytes;
/// stops on `halt`. With `beneath` (a buffered loop device's file), each batch is first
/// read from that file in bulk ([`Beneath::prime`]): through a buffered loop on sshfs the
/// device's own large reads would go out as small FUSE read-ahead requests, one after
/// another (3.3 s for 10 MiB at 25 ms each way, docs/benchmarks.md).
pub fn read_metadata(
    device: &Path,
    since: impl FnOnce() -> Option<u64>,
    budget: u64,
    threads: usize,
    beneath: Option<&Beneath>,
    halt: impl Fn() -> bool + Sync,
) -> Result<MetadataRead> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(device)
        .with_context(|| format!("opening {} to read its metadata", device.display()))?;
    crate::fsutil::read_exactly(&f);
    let mut sb = [0u8; 1024];
    f.read_exact_at(&mut sb, 1024)
        .with_context(|| format!("reading the superblock of {}", device.display()))?;
    let g = Geometry::parse(&sb).with_context(|| format!("ext4 on {}", device.display()))?;
    let gdt_len = g.groups * g.desc_size;
    anyhow::ensure!(
        gdt_len <= budget,
        "{}: group descriptors larger than the read-ahead budget",
        device.display()
    );
    let mut gdt = vec![0u8; gdt_len as usize];
    f.read_exact_at(&mut gdt, g.gdt_block * g.block)
        .with_context(|| format!("reading the group descriptors of {}", device.display()))?;
    let mut left = budget - gdt_len;
    let mut within = |reads: Vec<(u64, u64)>| -> Vec<(u64, u64)> {
        reads
            .into_iter()
            .take_while(|(_, len)| {
                let ok = *len <= left;
                left = left.saturating_sub(*len);
                ok
            })
            .collect()
    };
    let prime = |reads: &[(u64, u64)]| {
        if let Some(b) = beneath {
            b.prime(reads.iter().copied(), threads, &halt);
        }
    };
    let tables = within(plan_reads(g.table_ranges(&gdt), 0, READ_CHUNK));
    prime(&tables);
    let found = std::sync::Mutex::new((Vec::new(), Vec::new()));
    let collect = |extents: Vec<Dated>, nodes: Vec<Dated>| {
        let mut f = found.lock().unwrap_or_else(|e| e.into_inner());
        f.0.extend(extents);
        f.1.extend(nodes);
    };
    read_ranges(&f, &tables, threads, READ_CHUNK, &halt, &|b: &[u8]| {
        let (mut extents, mut nodes) = (Vec::new(), Vec::new());
        g.directory_extents(b, &mut extents, &mut nodes);
        collect(extents, nodes);
    });
    let table_bytes = tables.iter().map(|r| r.1).sum();
    let Some(since) = since() else {
        return Ok(MetadataRead {
            table_bytes,
            directory_bytes: 0,
            reads: 1 + tables.len(),
        });
    };
    {
        let mut f = found.lock().unwrap_or_else(|e| e.into_inner());
        f.0.retain(|(born, _)| *born >= since);
        f.1.retain(|(born, _)| *born >= since);
    }
    let mut tree_reads = 0;
    // The tree blocks of fragmented directories, one level at a time (ext4 trees are at
    // most 5 deep).
    for _ in 0..5 {
        let nodes = std::mem::take(&mut found.lock().unwrap_or_else(|e| e.into_inner()).1);
        if nodes.is_empty() {
            break;
        }
        let reads = within(plan_reads(
            nodes
                .into_iter()
                .map(|(_, (b, _))| (b * g.block, g.block))
                .collect(),
            0,
            READ_CHUNK,
        ));
        tree_reads += reads.len();
        prime(&reads);
        read_ranges(&f, &reads, threads, READ_CHUNK, &halt, &|b: &[u8]| {
            let (mut extents, mut nodes) = (Vec::new(), Vec::new());
            for node in b.chunks_exact(g.block as usize) {
                g.extent_node(node, &mut extents, &mut nodes);
            }
            // Below a directory kept above: kept.
            collect(
                extents.into_iter().map(|e| (u64::MAX, e)).collect(),
                nodes.into_iter().map(|n| (u64::MAX, (n, 1))).collect(),
            );
        });
    }
    let dir_ranges = found
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .0
        .into_iter()
        .map(|(_, (b, n))| (b * g.block, n * g.block))
        .collect();
    let dir_reads = within(plan_reads(dir_ranges, GAP_READ_THROUGH, READ_CHUNK));
    prime(&dir_reads);
    read_ranges(&f, &dir_reads, threads, READ_CHUNK, &halt, &|_: &[u8]| {});
    Ok(MetadataRead {
        table_bytes,
        directory_bytes: dir_reads.iter().map(|r| r.1).sum(),
        reads: 1 + tables.len() + tree_reads + dir_reads.len(),
    })
}

// ---------------------------------------------------------------- file extents

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extents whose bytes on the device are not the file's data as stored, or not there yet:
/// UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE, DATA_TAIL,
/// UNWRITTEN (reads as zeros, nothing to fetch).
const FIEMAP_EXTENT_SKIP: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800;
/// Extents asked for per call.
const FIEMAP_BATCH: usize = 64;
/// At most this many extents per file: a file more fragmented than that is read the usual
/// way for the rest (this is read-ahead).
const FIEMAP_MAX_EXTENTS: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

/// Where the data of the open file `f` lies on its filesystem's device: (byte offset on the
/// device, length), in file order, up to `len` bytes of the file (its size). Only extents
/// that hold the file's bytes as stored (see [`FIEMAP_EXTENT_SKIP`]). The FS_IOC_FIEMAP
/// ioctl reads the extent tree the kernel has already cached; nothing of the data is read.
pub fn file_extents(f: &std::fs::File, len: u64) -> Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut start = 0u64;
    while start < len && out.len() < FIEMAP_MAX_EXTENTS {
        let mut m = Fiemap {
            start,
            length: len - start,
            flags: 0,
            mapped_extents: 0,
            extent_count: FIEMAP_BATCH as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); FIEMAP_BATCH],
        };
        // SAFETY: FS_IOC_FIEMAP reads and fills a struct fiemap followed by extent_count
        // extents, which `m` holds and which outlives the call.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, &mut m as *mut Fiemap) };
        if r < 0 {
            return Err(std::io::Error::last_os_error()).context("FS_IOC_FIEMAP");
        }
        let n = (m.mapped_extents as usize).min(FIEMAP_BATCH);
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &m.extents[..n] {
            if e.flags & FIEMAP_EXTENT_SKIP == 0 && e.length > 0 && e.logical < len {
                out.push((e.physical, e.length.min(len - e.logical)));
            }
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
            start = start.max(e.logical.saturating_add(e.length));
        }
        if last {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn features_required_at_every_open() {
        let mut sb = [0u8; 1024];
        assert!(features_ok(&sb).unwrap_err().contains("bad magic"));
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        assert_eq!(
            features_ok(&sb).unwrap_err(),
            "lacks the feature(s) metadata_csum, 64bit"
        );
        sb[0x64..0x68].copy_from_slice(&RO_COMPAT_METADATA_CSUM.to_le_bytes());
        assert_eq!(features_ok(&sb).unwrap_err(), "lacks the feature(s) 64bit");
        sb[0x60..0x64].copy_from_slice(&INCOMPAT_64BIT.to_le_bytes());
        assert!(features_ok(&sb).unwrap_err().contains("checksum type 0"));
        sb[0x175] = CHECKSUM_CRC32C;
        features_ok(&sb).unwrap();
    }

    /// Real mke2fs images: what `mkfs` asks for passes, an ext4 made without checksums is
    /// refused with exit 6 naming the feature.
    #[test]
    fn features_of_real_images() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let os = |v: &'static [&'static str]| -> Vec<&'static std::ffi::OsStr> {
            v.iter().map(std::ffi::OsStr::new).collect()
        };
        let with = image(a.path(), 8 << 20, &os(&["-O", "metadata_csum,64bit"]));
        check_features(&with).unwrap();
        let without = image(b.path(), 8 << 20, &os(&["-O", "^metadata_csum"]));
        let e = check_features(&without).unwrap_err();
        assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Security);
        assert!(
            format!("{e}").contains("lacks the feature(s) metadata_csum"),
            "{e}"
        );
    }

    use super::*;

    #[test]
    fn estimates_grow_with_inodes_not_only_size() {
        assert_eq!(journal_bytes((1u64 << 30) / 4096), 32 << 20);
        assert_eq!(journal_bytes((1u64 << 40) / 4096), 1 << 30);
        assert_eq!(chosen_journal_bytes(64 << 20), 4 << 20);
        assert_eq!(chosen_journal_bytes(512 << 20), 16 << 20);
        assert_eq!(chosen_journal_bytes(1 << 30), 32 << 20);
        assert_eq!(chosen_journal_bytes(5 << 30), 32 << 20);
        assert_eq!(chosen_journal_bytes(25 << 30), 100 << 20);
        assert_eq!(chosen_journal_bytes(100 << 30), 400 << 20);
        assert_eq!(chosen_journal_bytes(1 << 40), 1 << 30);
        let small = estimate_init_bytes(16 << 30, (16u64 << 30) / 65536);
        let dflt = estimate_init_bytes(16 << 30, (16u64 << 30) / 16384);
        assert!(small < dflt);
        // 16 GiB at one inode per 64 KiB: well under mke2fs's default of ~340 MiB.
        assert!(small < 300 << 20, "{small}");
    }
}

/// A real ext4 image file of `bytes` in `dir`, made by mkfs.ext4 with `args` (mkfs and
/// debugfs need no device, no mount and no root).
#[cfg(test)]
fn image(dir: &Path, bytes: u64, args: &[&std::ffi::OsStr]) -> std::path::PathBuf {
    let img = dir.join("fs.img");
    std::fs::File::create(&img).unwrap().set_len(bytes).unwrap();
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .args(args)
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    img
}

#[cfg(test)]
mod recovery_tests {
    use super::*;

    /// A real ext4 image (a file: mkfs and debugfs need no device), with the recovery flag
    /// set by debugfs as the kernel sets it while mounted read-write.
    #[test]
    fn needs_recovery_reads_the_superblock_flag() {
        let d = tempfile::tempdir().unwrap();
        let img = image(d.path(), 8 << 20, &[]);
        assert!(!needs_recovery(&img).unwrap());
        let ok = std::process::Command::new("debugfs")
            .args(["-w", "-R", "feature needs_recovery"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(ok.status.success(), "{ok:?}");
        assert!(needs_recovery(&img).unwrap());
        let junk = d.path().join("junk");
        std::fs::write(&junk, vec![0u8; 4096]).unwrap();
        let e = needs_recovery(&junk).unwrap_err();
        assert!(format!("{e:#}").contains("bad superblock magic"), "{e:#}");
    }
}

#[cfg(test)]
mod metadata_tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_garbled_superblock_is_refused_and_garbled_tables_point_nowhere_outside() {
        assert!(Geometry::parse(&[0u8; 1024]).is_err());
        // Random superblocks with the magic in place: refused or bounded, never a panic,
        // and nothing they yield points past the filesystem.
        let mut x: u64 = 0x9E3779B97F4A7C15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut accepted = 0;
        for _ in 0..2000 {
            let mut sb: Vec<u8> = (0..1024).map(|_| rnd() as u8).collect();
            sb[0x38..0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
            sb[0x18..0x1C].copy_from_slice(&((rnd() % 8) as u32).to_le_bytes());
            sb[0x58..0x5A].copy_from_slice(&(128u16 << (rnd() % 3)).to_le_bytes());
            let Ok(g) = Geometry::parse(&sb) else {
                continue;
            };
            accepted += 1;
            let gdt: Vec<u8> = (0..(g.desc_size * 8)).map(|_| rnd() as u8).collect();
            let end = g.blocks * g.block;
            assert!(g.table_ranges(&gdt).iter().all(|(o, l)| o + l <= end));
            let table: Vec<u8> = (0..g.inode_size * 16).map(|_| rnd() as u8).collect();
            let (mut dated, mut dated_nodes) = (Vec::new(), Vec::new());
            g.directory_extents(&table, &mut dated, &mut dated_nodes);
            let mut ext: Vec<(u64, u64)> = dated.into_iter().map(|(_, e)| e).collect();
            let mut nodes: Vec<u64> = dated_nodes.into_iter().map(|(_, (b, _))| b).collect();
            for node in table.chunks_exact(g.block.min(table.len() as u64) as usize) {
                g.extent_node(node, &mut ext, &mut nodes);
            }
            assert!(ext.iter().all(|(b, n)| b + n <= g.blocks));
            assert!(nodes.iter().all(|b| *b < g.blocks));
        }
        assert!(
            accepted > 0,
            "the generator never produced a valid geometry"
        );
    }

    /// A real ext4 made by mke2fs from a directory tree (no mount, no root): every block
    /// debugfs lists for each directory is among what the read-ahead found, and it reads
    /// within its budget.
    #[test]
    fn finds_every_directory_block_of_a_real_filesystem() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        for a in 0..12 {
            for b in 0..5 {
                let dir = tree.join(format!("a{a}/b{b}"));
                std::fs::create_dir_all(&dir).unwrap();
                for f in 0..(3 + a * 20) {
                    std::fs::write(dir.join(format!("file-with-a-long-name-{f:04}")), b"x")
                        .unwrap();
                }
            }
        }
        let img = image(
            d.path(),
            64 << 20,
            &[
                "-I".as_ref(),
                "256".as_ref(),
                "-N".as_ref(),
                "8192".as_ref(),
                "-d".as_ref(),
                tree.as_os_str(),
            ],
        );

        // The extents the reader derives, by block.
        let f = std::fs::File::open(&img).unwrap();
        let mut sb = [0u8; 1024];
        f.read_exact_at(&mut sb, 1024).unwrap();
        let g = Geometry::parse(&sb).unwrap();
        let mut gdt = vec![0u8; (g.groups * g.desc_size) as usize];
        f.read_exact_at(&mut gdt, g.gdt_block * g.block).unwrap();
        let (mut dated, mut dated_nodes) = (Vec::new(), Vec::new());
        for (off, len) in g.table_ranges(&gdt) {
            let mut t = vec![0u8; len as usize];
            f.read_exact_at(&mut t, off).unwrap();
            g.directory_extents(&t, &mut dated, &mut dated_nodes);
        }
        let mut ext: Vec<(u64, u64)> = dated.into_iter().map(|(_, e)| e).collect();
        let mut nodes: Vec<u64> = dated_nodes.into_iter().map(|(_, (b, _))| b).collect();
        let mut found = std::collections::BTreeSet::new();
        let mut tree_blocks = 0;
        while let Some(b) = nodes.pop() {
            found.insert(b);
            tree_blocks += 1;
            let mut node = vec![0u8; g.block as usize];
            f.read_exact_at(&mut node, b * g.block).unwrap();
            g.extent_node(&node, &mut ext, &mut nodes);
        }
        assert!(
            tree_blocks > 0,
            "mke2fs -d fragments the larger directories"
        );
        for (b, n) in ext {
            found.extend(b..b + n);
        }
        // What debugfs says each directory occupies.
        let mut dirs = vec!["/".to_string()];
        for a in 0..12 {
            dirs.push(format!("/a{a}"));
            for b in 0..5 {
                dirs.push(format!("/a{a}/b{b}"));
            }
        }
        let mut want = 0u64;
        for dir in &dirs {
            let out = std::process::Command::new("debugfs")
                .args(["-R", &format!("blocks {dir}")])
                .arg(&img)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let blocks: Vec<u64> = text
                .split_whitespace()
                .map(|w| w.parse().unwrap())
                .collect();
            assert!(!blocks.is_empty(), "debugfs: no blocks for {dir}: {out:?}");
            for b in blocks {
                assert!(found.contains(&b), "block {b} of {dir} not found");
                want += 1;
            }
        }
        assert!(
            want > dirs.len() as u64,
            "some directories span several blocks"
        );

        let r = read_metadata(&img, || Some(0), 1 << 30, 4, None, || false).unwrap();
        assert!(r.directory_bytes >= want * g.block, "{r:?}");
        assert!(r.table_bytes > 0 && r.reads >= 2, "{r:?}");
        // A budget smaller than the tables: reads less, still no error; smaller than the
        // group descriptors: refused.
        let small = read_metadata(&img, || Some(0), 64 << 10, 4, None, || false).unwrap();
        assert!(
            small.table_bytes + small.directory_bytes <= 64 << 10,
            "{small:?}"
        );
        assert!(read_metadata(&img, || Some(0), 16, 4, None, || false).is_err());
        // Halted before it starts: nothing but the descriptors.
        let none = read_metadata(&img, || Some(0), 1 << 30, 4, None, || true).unwrap();
        assert_eq!((none.table_bytes > 0, none.directory_bytes), (true, 0));
        // Only directories created since a time: none of these (made just now) are
        // newer than an hour from now; all are newer than an hour ago.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let later = read_metadata(&img, || Some(now + 3600), 1 << 30, 4, None, || false).unwrap();
        assert_eq!(later.directory_bytes, 0, "{later:?}");
        let earlier = read_metadata(&img, || Some(now - 3600), 1 << 30, 4, None, || false).unwrap();
        assert_eq!(earlier.directory_bytes, r.directory_bytes, "{earlier:?}");
        // No previous snapshot: the tables, no directory.
        let tables_only = read_metadata(&img, || None, 1 << 30, 4, None, || false).unwrap();
        assert_eq!(
            (tables_only.table_bytes, tables_only.directory_bytes),
            (r.table_bytes, 0)
        );
    }
}
