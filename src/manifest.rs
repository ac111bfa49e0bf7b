//! Per-snapshot manifests: a hash of every regular file, taken on the client from what it
//! read from the source, so that `verify` and `restore` can name every file whose content
//! changed on the server afterwards (XTS has no integrity: a flipped ciphertext bit
//! decrypts to 16 garbled bytes, silently).
//!
//! Format 2 (written now): `manifests/<id>` inside the container, a header record
//! `e2ebackup-manifest 2 sha1`, then one record per file,
//! `<sha1 hex> <size> <group> <path>`, every record ending in NUL (file names may contain
//! newlines and need not be UTF-8; they cannot contain NUL). The path is relative to the
//! snapshot. `group` is 0 for a file that had one link in the source, else the record
//! number (1 = the first file) of the first name of its hard-link group in the source: the
//! source's true link structure (see [`build`]). A hash of `-` characters means that no
//! hash could be taken on the client (the file changed in the source after rsync read it
//! and it was not in the hashes rsync reported): `verify` and `restore` count such files
//! and cannot check them.
//!
//! Where a hash comes from, never from bytes read back through the container (once a page
//! is synced and evicted, that read comes from the server):
//! - rsync's own whole-file checksum of what it transferred (`--checksum-choice=sha1`,
//!   `--out-format=%C`), computed over the stream it read from the source ([`Fresh`]);
//! - the previous manifest, for a file that rsync hard-linked to the previous snapshot (same
//!   inode), or copied locally from it because only its attributes changed (same size and
//!   modification time, rsync's own quick check): that hash was taken on the client then;
//! - else the source file itself, read here, if it still has the size and modification
//!   time that rsync gave the copy.
//!
//! Format 1 (older versions, still read): no header, records `<sha256 hex> <size> <path>`,
//! hashed from the container after rsync wrote it. `verify` and `restore` check each file
//! with the algorithm its manifest names.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, FileType};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::Digest;

pub const MANIFESTS: &str = "manifests";

/// The longest record read back: a hash, a size and a path (a path below the snapshot can
/// exceed PATH_MAX, but not by this much). A longer run without a NUL is damage (XTS lets
/// the server garble ciphertext undetected), and a record is never read without a bound.
const MAX_RECORD: u64 = 64 << 10;

/// What the first record of a manifest of format 2 or later starts with.
const HEADER: &[u8] = b"e2ebackup-manifest ";

/// The format written now.
pub const VERSION: u32 = 2;

/// The hash of the format written now: rsync's transfer checksum, `--checksum-choice=sha1`
/// (rsync offers xxh128, xxh3, xxh64, md5, md4 and sha1; of those only sha1 is a
/// cryptographic hash still without a known second preimage).
pub const ALGORITHM: Algorithm = Algorithm::Sha1;

/// A hash algorithm a manifest names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Format 1.
    Sha256,
    Sha1,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha1 => "sha1",
        }
    }

    fn parse(s: &[u8]) -> Option<Algorithm> {
        match s {
            b"sha256" => Some(Algorithm::Sha256),
            b"sha1" => Some(Algorithm::Sha1),
            _ => None,
        }
    }

    /// Hex digits of a digest.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha1 => 40,
        }
    }
}

/// The length of a digest of [`ALGORITHM`].
pub const DIGEST_LEN: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Lowercase hex digest in the manifest's algorithm; `None`: none taken on the client.
    pub hash: Option<String>,
    pub size: u64,
    /// The source's hard-link group: 0 for one link, else the record number of its first
    /// name (format 1: always 0).
    pub group: u64,
    /// Relative to the snapshot directory, raw bytes.
    pub path: Vec<u8>,
}

pub fn path_of(root: &Path, id: &str) -> PathBuf {
    root.join(MANIFESTS).join(id)
}

/// The hash of the file at `p` in `algorithm`, as hex.
pub fn hash_file(p: &Path, algorithm: Algorithm) -> Result<String> {
    let mut f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
    hash_with(&mut f, algorithm).with_context(|| format!("reading {}", p.display()))
}

/// The hash of everything `r` reads, in [`ALGORITHM`] (hex).
pub fn hash_reader(mut r: impl Read) -> Result<String> {
    hash_with(&mut r, ALGORITHM)
}

fn hash_with(r: &mut impl Read, algorithm: Algorithm) -> Result<String> {
    Ok(match algorithm {
        Algorithm::Sha256 => hex(&digest_of::<sha2::Sha256>(r)?),
        Algorithm::Sha1 => hex(&digest_of::<sha1::Sha1>(r)?),
    })
}

/// The digest of everything `r` reads, in 1 MiB reads; a signal ends it between two of them.
fn digest_of<D: Digest>(r: &mut impl Read) -> Result<Vec<u8>> {
    let mut h = D::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        crate::signals::check()?;
    }
    Ok(h.finalize().to_vec())
}

/// Lower-case hex of `digest` (manifest hashes, the generation record's MAC, `keys
/// rotate`'s marker).
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A digest of [`ALGORITHM`] from rsync's hex (`%C`); `None` for anything else (rsync
/// prints blanks where it has no checksum: a hard link, a local copy).
pub fn parse_digest(h: &str) -> Option<[u8; DIGEST_LEN]> {
    let b = h.as_bytes();
    if b.len() != 2 * DIGEST_LEN {
        return None;
    }
    let mut out = [0u8; DIGEST_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        let pair = std::str::from_utf8(&b[2 * i..2 * i + 2]).ok()?;
        *o = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// The file a hash belongs to: rsync writes every file of a snapshot under a new inode,
/// sets its size and modification time, and nothing else writes there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    /// Nanoseconds since the epoch.
    mtime: i64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
        }
    }
}

/// What [`Fresh::record`] made of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hashed {
    Now,
    /// Nothing there yet: rsync names a file just before it renames it into place.
    Missing,
    /// Not a regular file, or no room left: `build` takes its hash elsewhere.
    Passed,
}

/// The hashes rsync reported for the files it wrote in this run (its transfer checksum over
/// what it read from the source, `%C`), each filed under the inode rsync wrote, looked up
/// by [`build`] once [`Fresh::seal`]ed. 56 bytes a file; no file is read for them.
#[derive(Debug, Default)]
pub struct Fresh {
    taken: Vec<(Stamp, [u8; DIGEST_LEN])>,
}

impl Fresh {
    /// At most this many hashes are held (56 MiB); the files after them are hashed from
    /// the source by `build`.
    pub const MOST: usize = 1 << 20;

    /// What a resume keeps of the files an earlier run left, checked against their source
    /// ([`Fresh::hash_expecting`]): a million files' hashes, the rest sent again.
    pub const MOST_CHECKED: usize = 1 << 20;

    /// File rsync's `digest` of the regular file it wrote at `p` (never through a link).
    pub fn record(&mut self, p: &Path, digest: [u8; DIGEST_LEN]) -> Hashed {
        self.record_up_to(p, digest, Self::MOST)
    }

    fn record_up_to(&mut self, p: &Path, digest: [u8; DIGEST_LEN], most: usize) -> Hashed {
        let m = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Hashed::Missing,
            Err(_) => return Hashed::Passed,
        };
        if !m.file_type().is_file() || self.taken.len() >= most {
            return Hashed::Passed;
        }
        if self.taken.capacity() == self.taken.len() {
            // Grow by doubling up to `most`, never past it.
            let more = self.taken.len().max(1024).min(most - self.taken.len());
            self.taken.reserve_exact(more);
        }
        self.taken.push((Stamp::of(&m), digest));
        Hashed::Now
    }

    /// [`Fresh::hash`], keeping the hash only when it is `want` (hex): otherwise `Passed`.
    /// A resumed snapshot's files left by an earlier run are kept with the hash of their
    /// source file this way (snapshots::resume).
    pub fn hash_expecting(&mut self, p: &Path, want: &str) -> Hashed {
        use std::os::unix::fs::OpenOptionsExt;
        let m = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Hashed::Missing,
            Err(_) => return Hashed::Passed,
        };
        if !m.file_type().is_file() {
            return Hashed::Passed;
        }
        let Some(digest) = parse_digest(want) else {
            return Hashed::Passed;
        };
        // The copy is read back only to compare it with the source's hash (taken on the
        // client): what is kept is that hash, never one of the bytes read back.
        let same = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(p)
            .ok()
            .and_then(|mut f| hash_with(&mut f, ALGORITHM).ok())
            .is_some_and(|h| h == want);
        if !same {
            return Hashed::Passed;
        }
        self.record_up_to(p, digest, Self::MOST_CHECKED)
    }

    /// Ready for lookups: sorted by inode, the newest hash of each kept.
    pub fn seal(mut self) -> Fresh {
        self.taken.reverse();
        self.taken.sort_by_key(|(s, _)| (s.dev, s.ino));
        self.taken.dedup_by_key(|(s, _)| (s.dev, s.ino));
        self
    }

    /// Both sets of hashes, `later`'s first where both have one inode, sealed.
    pub fn merge(self, later: Fresh) -> Fresh {
        let mut taken = self.taken;
        taken.reverse();
        taken.extend(later.taken.into_iter().rev());
        Fresh { taken }.seal()
    }

    /// The hash of the file `m` describes, if it was taken of the data it holds now.
    fn get(&self, m: &std::fs::Metadata) -> Option<String> {
        let now = Stamp::of(m);
        let i = self
            .taken
            .binary_search_by_key(&(now.dev, now.ino), |(s, _)| (s.dev, s.ino))
            .ok()?;
        let (stamp, digest) = &self.taken[i];
        (*stamp == now).then(|| hex(digest))
    }

    pub fn len(&self) -> usize {
        self.taken.len()
    }

    pub fn is_empty(&self) -> bool {
        self.taken.is_empty()
    }
}

fn encode_header(w: &mut impl Write) -> std::io::Result<()> {
    write!(w, "e2ebackup-manifest {VERSION} {}", ALGORITHM.name())?;
    w.write_all(&[0])
}

fn encode_into(w: &mut impl Write, e: &Entry) -> std::io::Result<()> {
    match &e.hash {
        Some(h) => write!(w, "{h} ")?,
        None => write!(w, "{} ", "-".repeat(ALGORITHM.hex_len()))?,
    }
    write!(w, "{} {} ", e.size, e.group)?;
    w.write_all(&e.path)?;
    w.write_all(&[0])
}

/// A whole manifest of the current format.
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_header(&mut out).expect("writing to a Vec");
    for e in entries {
        encode_into(&mut out, e).expect("writing to a Vec");
    }
    out
}

fn parse_record(rec: &[u8], version: u32, algorithm: Algorithm) -> Result<Entry> {
    let fields = if version == 1 { 3 } else { 4 };
    let parts: Vec<&[u8]> = rec.splitn(fields, |b| *b == b' ').collect();
    if parts.len() != fields {
        bail!("malformed manifest record");
    }
    let number = |s: &[u8], what: &str| -> Result<u64> {
        std::str::from_utf8(s)
            .ok()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("malformed manifest record ({what})"))
    };
    let h = parts[0];
    let hash = if version == 1 {
        Some(String::from_utf8_lossy(h).into_owned())
    } else if h.len() == algorithm.hex_len() && h.iter().all(|b| *b == b'-') {
        None
    } else if h.len() == algorithm.hex_len()
        && h.iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    {
        Some(String::from_utf8_lossy(h).into_owned())
    } else {
        bail!("malformed manifest record (hash)");
    };
    Ok(Entry {
        hash,
        size: number(parts[1], "size")?,
        group: if version == 1 {
            0
        } else {
            number(parts[2], "group")?
        },
        path: parts[fields - 1].to_vec(),
    })
}

/// The records of a manifest, read one at a time: memory stays flat in the file count.
pub struct Records<R> {
    r: R,
    what: String,
    buf: Vec<u8>,
    done: bool,
    /// The manifest's format (1: no header).
    pub version: u32,
    /// The hash its records hold.
    pub algorithm: Algorithm,
    /// A header this version cannot read: the first item, then the end.
    refused: Option<anyhow::Error>,
}

impl<R: BufRead> Records<R> {
    /// Read the header, if the manifest has one (format 2 and later).
    pub fn new(mut r: R, what: impl Into<String>) -> Records<R> {
        let (mut version, mut algorithm, mut refused) = (1, Algorithm::Sha256, None);
        let has_header = match r.fill_buf() {
            Ok(b) => b.starts_with(HEADER),
            Err(e) => {
                refused = Some(anyhow!(e));
                false
            }
        };
        if has_header {
            let mut head = Vec::new();
            let got = (&mut r).take(256).read_until(0, &mut head);
            let parsed = got.ok().and_then(|_| {
                let head = head.strip_suffix(&[0])?.strip_prefix(HEADER)?;
                let (v, a) = head.split_at(head.iter().position(|b| *b == b' ')?);
                let v: u32 = std::str::from_utf8(v).ok()?.parse().ok()?;
                Some((v, Algorithm::parse(&a[1..])))
            });
            match parsed {
                Some((VERSION, Some(a))) => (version, algorithm) = (VERSION, a),
                Some((v, _)) if v > VERSION => {
                    refused = Some(anyhow!(
                        "manifest format {v} is newer than this e2ebackup reads ({VERSION})"
                    ))
                }
                _ => refused = Some(anyhow!("malformed manifest header")),
            }
        }
        Records {
            r,
            what: what.into(),
            buf: Vec::new(),
            done: false,
            version,
            algorithm,
            refused,
        }
    }
}

impl<R: BufRead> Iterator for Records<R> {
    type Item = Result<Entry>;
    fn next(&mut self) -> Option<Result<Entry>> {
        if let Some(e) = self.refused.take() {
            self.done = true;
            return Some(Err(e).with_context(|| format!("reading manifest {}", self.what)));
        }
        loop {
            if self.done {
                return None;
            }
            self.buf.clear();
            let got = (&mut self.r)
                .take(MAX_RECORD + 1)
                .read_until(0, &mut self.buf);
            let r = match got {
                Ok(0) => {
                    self.done = true;
                    return None;
                }
                Ok(_) if self.buf.last() != Some(&0) && self.buf.len() as u64 > MAX_RECORD => Err(
                    anyhow::anyhow!("a record of more than {MAX_RECORD} bytes without its end"),
                ),
                Ok(_) => {
                    if self.buf.last() == Some(&0) {
                        self.buf.pop();
                    }
                    if self.buf.is_empty() {
                        continue;
                    }
                    parse_record(&self.buf, self.version, self.algorithm)
                }
                Err(e) => Err(e.into()),
            };
            if r.is_err() {
                self.done = true;
            }
            return Some(r.with_context(|| format!("reading manifest {}", self.what)));
        }
    }
}

pub type FileRecords = Records<BufReader<File>>;

/// The manifest of snapshot `id`, opened for reading; `None` if it has none.
pub fn open(root: &Path, id: &str) -> Result<Option<FileRecords>> {
    let p = path_of(root, id);
    match File::open(&p) {
        Ok(f) => Ok(Some(Records::new(
            BufReader::with_capacity(1 << 16, f),
            p.display().to_string(),
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening {}", p.display())),
    }
}

/// The fewest bytes a record takes: a 40-digit hash, a space, a one-digit size, a space, a
/// one-digit group, a space, a one-byte path and the NUL (format 1's are longer).
const MIN_RECORD: u64 = 40 + 1 + 1 + 1 + 1 + 1 + 1 + 1;

/// At most how many files snapshot `id`'s manifest lists: its size over the shortest record,
/// from one stat, nothing read. (Counting its records read the whole manifest through the
/// cold stack before every run: 2.4 MiB, 0.15-0.2 s at 20000 files and 25 ms each way.)
pub fn most_files(root: &Path, id: &str) -> Result<Option<u64>> {
    let p = path_of(root, id);
    match std::fs::metadata(&p) {
        Ok(m) => Ok(Some(m.len() / MIN_RECORD)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the size of {}", p.display())),
    }
}

/// Every regular file below a directory, as paths relative to it, in the order of `Path`'s
/// own comparison (component by component): each directory's entries sorted by name, a
/// subdirectory's contents right after its name. That is the order manifests are written
/// in, so the previous one can be followed alongside. Only the directories on the way down
/// are held, never the whole tree.
struct Walk {
    root: PathBuf,
    /// Per open directory: its relative path and its entries not yet taken, sorted
    /// descending (taken from the end).
    open: Vec<(PathBuf, Vec<(OsString, FileType)>)>,
}

impl Walk {
    fn new(root: &Path) -> Result<Walk> {
        let top = Self::entries(root)?;
        Ok(Walk {
            root: root.to_path_buf(),
            open: vec![(PathBuf::new(), top)],
        })
    }

    fn entries(abs: &Path) -> Result<Vec<(OsString, FileType)>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(abs).with_context(|| format!("reading {}", abs.display()))? {
            let e = e.with_context(|| format!("reading {}", abs.display()))?;
            let t = e
                .file_type()
                .with_context(|| format!("reading {}", abs.display()))?;
            if t.is_dir() || t.is_file() {
                v.push((e.file_name(), t));
            }
        }
        v.sort_unstable_by(|a, b| b.0.cmp(&a.0));
        Ok(v)
    }
}

impl Iterator for Walk {
    type Item = Result<PathBuf>;
    fn next(&mut self) -> Option<Result<PathBuf>> {
        loop {
            let (dir, entries) = self.open.last_mut()?;
            let Some((name, t)) = entries.pop() else {
                self.open.pop();
                continue;
            };
            let rel = dir.join(name);
            if t.is_file() {
                return Some(Ok(rel));
            }
            match Self::entries(&self.root.join(&rel)) {
                Ok(es) => self.open.push((rel, es)),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The hash of the source file at `src`, in [`ALGORITHM`], if it still is what the snapshot
/// holds: a regular file with the size and modification time rsync gave the copy `m`
/// (rsync's own quick check), unchanged while it was read. Never through a link at its end.
fn hash_source(src: &Path, m: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(src)
        .ok()?;
    let before = f.metadata().ok()?;
    let same = |s: &std::fs::Metadata| {
        s.file_type().is_file()
            && s.len() == m.len()
            && s.mtime() == m.mtime()
            && s.mtime_nsec() == m.mtime_nsec()
    };
    if !same(&before) {
        return None;
    }
    let h = hash_with(&mut f, ALGORITHM).ok()?;
    let after = f.metadata().ok()?;
    (same(&after) && after.ctime() == before.ctime() && after.ctime_nsec() == before.ctime_nsec())
        .then_some(h)
}

/// One inode of the new snapshot that may hold names the source keeps apart (or keep apart
/// names the source links): see [`build`].
#[derive(Default)]
struct Node {
    /// The source inode of its first name (`None`: not a regular file in the source now).
    src: Option<(u64, u64)>,
    names: Vec<PathBuf>,
    wrong: bool,
}

/// Write the manifest of `snap` to `out`, one record per regular file (see the module
/// documentation for where each hash comes from). `source` is the directory the snapshot's
/// paths are relative to on the client (`/`: rsync runs with `--relative`); `prev` is the
/// previous snapshot's directory and manifest, followed alongside in the same order;
/// `fresh` holds rsync's hashes of this run. Returns the number of records.
///
/// The source's hard-link groups are recorded (each file's source inode, by `lstat`), and
/// checked against the snapshot's: `--link-dest` links each name to the previous snapshot's
/// file of the same name, so two names that were one inode there and are independent files
/// in the source now (one replaced by an identical copy, same mode and times) come out as
/// one inode again, and a restore with `-H` would link them. Every inode of the snapshot
/// with a name whose source has several links, or a name linked from a previous file that
/// was in a group, is checked: the names that share an inode in the snapshot must share
/// one in the source, and the reverse. The names of every inode where they do not are
/// returned in [`Built::merged`], for `take` to copy again without `--link-dest`.
pub fn build<R: BufRead>(
    snap: &Path,
    source: Option<&Path>,
    prev: Option<(&Path, Records<R>)>,
    fresh: &Fresh,
    out: &mut impl Write,
) -> Result<Built> {
    let (pdir, mut prev_records) = match prev {
        Some((d, r)) => (Some(d), Some(r)),
        None => (None, None),
    };
    // Hashes and groups of a previous manifest of another format are of no use here.
    let prev_current = prev_records
        .as_ref()
        .is_some_and(|r| r.version == VERSION && r.algorithm == ALGORITHM);
    // The same records as the previous manifest, so far: every file reused in order, no
    // previous record passed over, nothing unreadable.
    let same = std::cell::Cell::new(prev_current);
    let mut next_prev = || -> Option<Entry> {
        match prev_records.as_mut()?.next()? {
            Ok(e) => Some(e),
            Err(e) => {
                crate::warn!("{e:#}: the files it lists are hashed again");
                same.set(false);
                prev_records = None;
                None
            }
        }
    };
    encode_header(out)?;
    let mut pending = next_prev();
    let (mut n, mut unhashed) = (0, 0);
    // Source inode -> the record number of its first name, for the files linked there.
    let mut groups: HashMap<(u64, u64), u64> = HashMap::new();
    // Inodes of the snapshot to check against the source's links; source inode -> the first
    // such snapshot inode.
    let mut nodes: HashMap<(u64, u64), Node> = HashMap::new();
    let mut src_nodes: HashMap<(u64, u64), (u64, u64)> = HashMap::new();
    for rel in Walk::new(snap)? {
        let rel = rel?;
        crate::signals::check()?;
        let abs = snap.join(&rel);
        let m = std::fs::symlink_metadata(&abs)
            .with_context(|| format!("reading {}", abs.display()))?;
        // Skip the previous records that sort before this path (files since deleted).
        while let Some(p) = &pending {
            if Path::new(OsStr::from_bytes(&p.path)).cmp(&rel) == Ordering::Less {
                same.set(false);
                pending = next_prev();
            } else {
                break;
            }
        }
        // The previous record of this path, consumed: the next one waits for the next path.
        let prev_rec = match &pending {
            Some(e) if Path::new(OsStr::from_bytes(&e.path)) == rel => {
                let r = pending.take();
                pending = next_prev();
                r
            }
            _ => None,
        };
        let pm = match (&prev_rec, pdir) {
            (Some(_), Some(pdir)) => std::fs::symlink_metadata(pdir.join(&rel)).ok(),
            _ => None,
        };
        let linked_from_prev = pm
            .as_ref()
            .is_some_and(|pm| pm.ino() == m.ino() && pm.dev() == m.dev());
        let src_path = source.map(|s| s.join(&rel));
        let sm = src_path
            .as_ref()
            .and_then(|p| std::fs::symlink_metadata(p).ok())
            .filter(|sm| sm.file_type().is_file());
        let src_key = sm.as_ref().map(|sm| (sm.dev(), sm.ino()));
        let group = match &sm {
            Some(sm) if sm.nlink() > 1 => *groups.entry((sm.dev(), sm.ino())).or_insert(n + 1),
            _ => 0,
        };
        let prev_grouped = prev_rec
            .as_ref()
            .is_some_and(|e| e.group != 0 || !prev_current);
        if group != 0 || (linked_from_prev && prev_grouped) {
            let key = (m.dev(), m.ino());
            let node = nodes.entry(key).or_insert_with(|| Node {
                src: src_key,
                ..Default::default()
            });
            if node.src != src_key {
                node.wrong = true;
            }
            node.names.push(rel.clone());
            if let Some(s) = src_key.filter(|_| group != 0) {
                let first = *src_nodes.entry(s).or_insert(key);
                if first != key {
                    // One source inode, two inodes in the snapshot.
                    node.wrong = true;
                    if let Some(other) = nodes.get_mut(&first) {
                        other.wrong = true;
                    }
                }
            }
        }
        let reused = prev_rec
            .as_ref()
            .filter(|e| prev_current && e.size == m.len())
            .and_then(|e| e.hash.clone())
            .filter(|_| {
                pm.as_ref().is_some_and(|pm| {
                    linked_from_prev
                        || (pm.file_type().is_file()
                            && pm.len() == m.len()
                            && pm.mtime() == m.mtime()
                            && pm.mtime_nsec() == m.mtime_nsec())
                })
            });
        let hash = fresh.get(&m).or(reused).or_else(|| match (&src_path, &sm) {
            // Only what `lstat` found a regular file is opened (never a device).
            (Some(p), Some(_)) => hash_source(p, &m),
            _ => None,
        });
        if hash.is_none() {
            unhashed += 1;
        }
        let entry = Entry {
            hash,
            size: m.len(),
            group,
            path: rel.into_os_string().into_vec(),
        };
        if prev_rec.as_ref() != Some(&entry) {
            same.set(false);
        }
        encode_into(out, &entry)?;
        n += 1;
    }
    if pending.is_some() || next_prev().is_some() {
        same.set(false);
    }
    let mut merged: Vec<PathBuf> = nodes
        .into_values()
        .filter(|node| node.wrong)
        .flat_map(|node| node.names)
        .collect();
    merged.sort();
    Ok(Built {
        files: n,
        unhashed,
        same_as_previous: same.get(),
        merged,
    })
}

/// What [`build`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub files: u64,
    /// Files with no hash taken on the client.
    pub unhashed: u64,
    /// Record for record what the previous manifest holds (a run that changed nothing).
    pub same_as_previous: bool,
    /// Names (relative to the snapshot) whose inodes in the snapshot do not follow the
    /// source's hard links: to be copied again.
    pub merged: Vec<PathBuf>,
}

/// A manifest ready to be put in place, not yet synced: written to a temporary file
/// beside its place, or, when it came out byte for byte the previous one, that one.
#[derive(Debug)]
pub struct Written {
    pub files: u64,
    pub unhashed: u64,
    /// [`Built::merged`]: when not empty, [`Written::discard`] this one, copy those again,
    /// and write the manifest anew.
    pub merged: Vec<PathBuf>,
    from: From,
    path: PathBuf,
}

#[derive(Debug)]
enum From {
    Temporary(PathBuf),
    /// The previous manifest, to be linked: manifests never change once in place.
    Previous(PathBuf),
}

impl Written {
    /// Whether it is the previous manifest again (a run that changed nothing).
    pub fn is_previous(&self) -> bool {
        matches!(self.from, From::Previous(_))
    }

    /// Put it in place: after a sync of the filesystem (its data), before the snapshot is.
    pub fn publish(self) -> Result<()> {
        let (r, from) = match &self.from {
            From::Temporary(t) => (std::fs::rename(t, &self.path), t),
            From::Previous(p) => (std::fs::hard_link(p, &self.path), p),
        };
        r.with_context(|| {
            format!(
                "putting {} in place as {}",
                from.display(),
                self.path.display()
            )
        })
    }

    /// Drop it unpublished.
    pub fn discard(self) -> Result<()> {
        match &self.from {
            From::Temporary(t) => {
                std::fs::remove_file(t).with_context(|| format!("removing {}", t.display()))
            }
            From::Previous(_) => Ok(()),
        }
    }
}

/// Build the manifest of snapshot `id` (in the directory `snap`, its files' sources below
/// `source`) into a temporary file.
/// Not synced here: the snapshot's commit syncs the filesystem once for its files and
/// this, then renames both (each fsync of its own is a journal commit and cache flushes,
/// serial round trips to the server). `prev` is the previous snapshot's directory, the id
/// of its manifest and that manifest's records. When the result is the previous manifest
/// byte for byte (same records, same length), the temporary file is removed before
/// anything of it was written out (delayed allocation: an unlinked file's dirty pages are
/// dropped), and the previous manifest is linked in its place instead: a run that changed
/// nothing does not send its manifest (2.4 MiB at 20000 files) to the server again.
pub fn write<R: BufRead>(
    root: &Path,
    id: &str,
    snap: &Path,
    source: Option<&Path>,
    prev: Option<(&Path, &str, Records<R>)>,
    fresh: &Fresh,
) -> Result<Written> {
    let dir = root.join(MANIFESTS);
    std::fs::create_dir_all(&dir)?;
    let mut built = None;
    let path = path_of(root, id);
    let previous = prev.as_ref().map(|(_, pid, _)| path_of(root, pid));
    let (tmp, f) = crate::fsutil::write_temp_with(&path, |w| {
        built = Some(build(snap, source, prev.map(|(d, _, r)| (d, r)), fresh, w)?);
        Ok(())
    })?;
    let built = built.context("the manifest was not built")?;
    let written_len = f.metadata().map(|m| m.len()).ok();
    drop(f);
    let same_length = |p: &Path| {
        let previous_len = std::fs::symlink_metadata(p).ok().map(|m| m.len());
        written_len.is_some() && previous_len == written_len
    };
    let from = match previous {
        Some(p) if built.same_as_previous && same_length(&p) => {
            std::fs::remove_file(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
            From::Previous(p)
        }
        _ => From::Temporary(tmp),
    };
    Ok(Written {
        files: built.files,
        unhashed: built.unhashed,
        merged: built.merged,
        from,
        path,
    })
}

/// Remove the temporary manifests of runs that ended before their commit.
pub fn remove_temporaries(root: &Path) -> Result<usize> {
    let dir = root.join(MANIFESTS);
    let entries = match std::fs::read_dir(&dir) {
        Ok(es) => es,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut n = 0;
    for e in entries {
        let e = e?;
        if crate::fsutil::is_temp_name(&e.file_name()) && e.file_type()?.is_file() {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// The buckets of the rolling subset: every path falls in one (by its SHA-256).
pub const BUCKETS: u32 = 100;

/// Whether `path` belongs to the share of a rolling `percent` subset that starts at bucket
/// `cursor`: the buckets `cursor .. cursor + percent` (mod [`BUCKETS`]). `verify` moves the
/// cursor on by `percent` after each such read ([`next_cursor`]), so the windows of
/// consecutive runs are contiguous: over `ceil(100 / percent)` runs they cover at least 100
/// consecutive buckets, that is every bucket, whatever the time between the runs (a
/// cursor taken from the date, `day * percent mod 100`, never moves when the interval in
/// days times `percent` is a multiple of 100).
pub fn in_rolling_subset(path: &[u8], percent: u32, cursor: u32) -> bool {
    if percent >= BUCKETS {
        return true;
    }
    let h = sha2::Sha256::digest(path);
    let bucket = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % BUCKETS;
    (bucket + BUCKETS - cursor % BUCKETS) % BUCKETS < percent
}

/// The cursor after a read of `percent` from `cursor`.
pub fn next_cursor(cursor: u32, percent: u32) -> u32 {
    (cursor % BUCKETS + percent.min(BUCKETS)) % BUCKETS
}

/// The cursor kept in `path` (the client's state directory): 0 when there is none yet, or
/// when what is there is not a cursor (said, not fatal: at worst one window is read twice).
pub fn read_cursor(path: &Path) -> u32 {
    match crate::fsutil::read_local_bounded(path, 64) {
        Ok((b, _)) => match std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            Some(c) if c < BUCKETS => c,
            _ => {
                crate::warn!("{} does not hold a cursor: starting at 0", path.display());
                0
            }
        },
        Err(_) => 0,
    }
}

/// Compare `snap` against its manifest's records, each file with the algorithm the
/// manifest names; returns how many files were read, how many have no hash to compare
/// with, and the paths (lossy, for messages) that differ.
pub fn verify<R: BufRead>(
    snap: &Path,
    entries: Records<R>,
    percent: u32,
    cursor: u32,
) -> Result<(u64, u64, Vec<String>)> {
    let algorithm = entries.algorithm;
    let mut checked = 0;
    let mut unhashed = 0;
    let mut bad = Vec::new();
    for e in entries {
        let e = match e {
            Ok(e) => e,
            Err(err) => {
                // The rest of the manifest cannot be trusted to line up; what was read is
                // checked, and the damage itself is a finding.
                bad.push(format!("{err:#}"));
                break;
            }
        };
        if !in_rolling_subset(&e.path, percent, cursor) {
            continue;
        }
        crate::signals::check()?;
        let Some(want) = &e.hash else {
            unhashed += 1;
            continue;
        };
        checked += 1;
        let abs = snap.join(OsStr::from_bytes(&e.path));
        let shown = String::from_utf8_lossy(&e.path).into_owned();
        match hash_file(&abs, algorithm) {
            Ok(h) if &h == want => {}
            Ok(_) => bad.push(format!("{shown}: content differs from the manifest")),
            Err(err) => bad.push(format!("{shown}: {err:#}")),
        }
    }
    Ok((checked, unhashed, bad))
}

/// What [`check_restored`] found.
#[derive(Debug, Default)]
pub struct Restored {
    /// Files hashed and compared.
    pub checked: u64,
    /// Files in the manifest without a hash to compare with.
    pub unhashed: u64,
    /// One line per file that differs, is missing or could not be read, and per damage
    /// of the manifest itself.
    pub bad: Vec<String>,
}

/// Threads that hash restored files.
pub const CHECK_THREADS: usize = 4;

/// Check every regular file of the manifest `records` that a restore wrote below `target`
/// (all of them, or those below one of the absolute `paths`): each is hashed on the client's
/// disk, with the manifest's algorithm, by `threads` threads, the manifest streamed past
/// them. Never through a link at a file's end, never opening anything but a regular file.
/// Files in `target` that the manifest does not list are not looked at.
pub fn check_restored<R: BufRead>(
    target: &Path,
    records: Records<R>,
    paths: &[PathBuf],
    threads: usize,
) -> Result<Restored> {
    use std::sync::Mutex;
    let algorithm = records.algorithm;
    let roots: Vec<&Path> = paths
        .iter()
        .map(|q| q.strip_prefix("/").unwrap_or(q))
        .collect();
    let found = Mutex::new(Restored::default());
    let check_one = |e: Entry, want: &str| {
        let rel = Path::new(OsStr::from_bytes(&e.path));
        let p = target.join(rel);
        let r = (|| -> Result<Option<String>> {
            use std::os::unix::fs::OpenOptionsExt;
            // Nothing but a regular file is opened (opening a device can act on it).
            let m = std::fs::symlink_metadata(&p)?;
            if !m.file_type().is_file() {
                return Ok(Some(format!(
                    "is a {}, not a regular file",
                    crate::fsutil::kind_word(m.mode())
                )));
            }
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(&p)?;
            let m = f.metadata()?;
            if !m.file_type().is_file() {
                return Ok(Some(format!(
                    "is a {}, not a regular file",
                    crate::fsutil::kind_word(m.mode())
                )));
            }
            let h = hash_with(&mut f, algorithm)?;
            Ok((h != want).then(|| "content differs from the manifest".to_string()))
        })();
        let problem = match r {
            Ok(None) => None,
            Ok(Some(why)) => Some(why),
            Err(err) => match err.downcast_ref::<std::io::Error>() {
                Some(io) if io.kind() == std::io::ErrorKind::NotFound => {
                    Some("missing after the restore".to_string())
                }
                _ => Some(format!("{err:#}")),
            },
        };
        let mut g = found.lock().unwrap_or_else(|e| e.into_inner());
        g.checked += 1;
        if let Some(why) = problem {
            g.bad
                .push(format!("{}: {why}", String::from_utf8_lossy(&e.path)));
        }
    };
    let threads = threads.max(1);
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Entry, String)>(1024);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..threads {
            s.spawn(|| loop {
                let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                match next {
                    Ok((e, want)) if crate::signals::pending().is_none() => check_one(e, &want),
                    Ok(_) => continue,
                    Err(_) => break,
                }
            });
        }
        for e in records {
            crate::signals::check()?;
            let e = match e {
                Ok(e) => e,
                Err(err) => {
                    found
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .bad
                        .push(format!("{err:#}"));
                    break;
                }
            };
            let rel = Path::new(OsStr::from_bytes(&e.path));
            if !roots.is_empty() && !roots.iter().any(|r| rel.starts_with(r)) {
                continue;
            }
            match e.hash.clone() {
                Some(want) => {
                    if tx.send((e, want)).is_err() {
                        break;
                    }
                }
                None => found.lock().unwrap_or_else(|e| e.into_inner()).unhashed += 1,
            }
        }
        drop(tx);
        Ok(())
    })?;
    crate::signals::check()?;
    let mut r = found.into_inner().unwrap_or_else(|e| e.into_inner());
    r.bad.sort();
    Ok(r)
}

/// `restore`'s check of what it wrote into `target` from snapshot `id` (in the container
/// mounted at `root`), for all of it or the absolute `paths`: every mismatch is named, and
/// any makes it a security refusal (exit 6). A snapshot without a manifest (taken by an
/// older version) is said to be unchecked.
///
/// `target` is where the files are read (the restore's held directory, by its descriptor's
/// path), `shown` what messages call it.
pub fn check_restore(
    root: &Path,
    id: &str,
    target: &Path,
    shown: &Path,
    paths: &[PathBuf],
) -> Result<()> {
    let Some(records) = open(root, id)? else {
        crate::warn!("snapshot {id} has no manifest (taken by an older version): the restored files are not checked");
        return Ok(());
    };
    let t = std::time::Instant::now();
    let algorithm = records.algorithm;
    let r = check_restored(target, records, paths, CHECK_THREADS)?;
    crate::info!(
        "checked {} restored file(s) against the manifest of {id} ({}) in {:.1} s",
        r.checked,
        algorithm.name(),
        t.elapsed().as_secs_f64()
    );
    if r.unhashed > 0 {
        crate::warn!(
            "{} restored file(s) have no hash in the manifest (they changed in the source while it was copied): not checked",
            r.unhashed
        );
    }
    if r.bad.is_empty() {
        return Ok(());
    }
    for b in &r.bad {
        crate::logging::emit(-2, "DIFFERS: ", format_args!("{b}"));
    }
    Err(crate::error::Failure::Security(format!(
        "the restore of snapshot {id} into {} has {} file(s) that differ from the manifest written at backup time: \
         the data on the server changed after it was written (the files are restored as they are; --no-check skips this check)",
        shown.display(),
        r.bad.len()
    ))
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(data: &[u8]) -> Records<&[u8]> {
        Records::new(data, "test")
    }

    /// What rsync would report for `snap`: the checksum of every file it wrote, that is
    /// every file not hard-linked to the same path in `prev`.
    fn fresh_of(snap: &Path, prev: Option<&Path>) -> Fresh {
        let mut f = Fresh::default();
        for rel in Walk::new(snap).unwrap() {
            let rel = rel.unwrap();
            let m = std::fs::metadata(snap.join(&rel)).unwrap();
            let linked = prev
                .and_then(|p| std::fs::metadata(p.join(&rel)).ok())
                .is_some_and(|pm| pm.ino() == m.ino());
            if !linked {
                let h = hash_file(&snap.join(&rel), ALGORITHM).unwrap();
                f.record(&snap.join(&rel), parse_digest(&h).unwrap());
            }
        }
        f.seal()
    }

    /// `build` into memory, the previous manifest given as entries.
    fn built(snap: &Path, prev: Option<(&Path, &[Entry])>) -> Vec<Entry> {
        let bytes = prev.map(|(_, es)| encode(es)).unwrap_or_default();
        let mut out = Vec::new();
        let n = build(
            snap,
            None,
            prev.map(|(d, _)| (d, records(&bytes))),
            &fresh_of(snap, prev.map(|(d, _)| d)),
            &mut out,
        )
        .unwrap()
        .files;
        let es: Vec<Entry> = records(&out).map(Result::unwrap).collect();
        assert_eq!(n as usize, es.len());
        es
    }

    /// A run that changed nothing builds the previous manifest again: `write` then links
    /// that one in place of writing its own; any difference writes a new one.
    #[test]
    fn an_unchanged_snapshot_links_the_previous_manifest() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir(root.join(MANIFESTS)).unwrap();
        let snap = |n: &str| root.join(n);
        std::fs::create_dir_all(snap("s1/a/b")).unwrap();
        for f in ["a/x", "a/b/y", "z"] {
            std::fs::write(snap("s1").join(f), f.as_bytes()).unwrap();
        }
        let none = Fresh::default();
        let w1 = write::<&[u8]>(
            root,
            "s1",
            &snap("s1"),
            None,
            None,
            &fresh_of(&snap("s1"), None),
        )
        .unwrap();
        assert!(!w1.is_previous(), "nothing to compare with");
        w1.publish().unwrap();
        // s2: every file a hard link of s1's, as rsync --link-dest makes it.
        let link_tree = |to: &str, skip: &[&str]| {
            std::fs::create_dir_all(snap(to).join("a/b")).unwrap();
            for f in ["a/x", "a/b/y", "z"] {
                if !skip.contains(&f) {
                    std::fs::hard_link(snap("s1").join(f), snap(to).join(f)).unwrap();
                }
            }
        };
        link_tree("s2", &[]);
        let prev = open(root, "s1").unwrap().unwrap();
        let w2 = write(
            root,
            "s2",
            &snap("s2"),
            None,
            Some((&snap("s1"), "s1", prev)),
            &none,
        )
        .unwrap();
        assert!(w2.is_previous());
        assert_eq!(w2.files, 3);
        w2.publish().unwrap();
        let (m1, m2) = (path_of(root, "s1"), path_of(root, "s2"));
        assert_eq!(
            std::fs::metadata(&m1).unwrap().ino(),
            std::fs::metadata(&m2).unwrap().ino()
        );
        let left: Vec<_> = std::fs::read_dir(root.join(MANIFESTS)).unwrap().collect();
        assert_eq!(left.len(), 2, "no temporary file left");
        // One file fewer (the last one in order), one changed, one added: written anew.
        link_tree("s3", &["z"]);
        link_tree("s4", &["a/x"]);
        std::fs::write(snap("s4/a/x"), b"other").unwrap();
        link_tree("s5", &[]);
        std::fs::write(snap("s5/zz"), b"new").unwrap();
        for s in ["s3", "s4", "s5"] {
            let prev = open(root, "s1").unwrap().unwrap();
            let w = write(
                root,
                s,
                &snap(s),
                None,
                Some((&snap("s1"), "s1", prev)),
                &fresh_of(&snap(s), Some(&snap("s1"))),
            )
            .unwrap();
            assert!(!w.is_previous(), "{s}");
            w.publish().unwrap();
            let m: Vec<Entry> = open(root, s)
                .unwrap()
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert_eq!(
                m.len(),
                if s == "s3" {
                    2
                } else if s == "s4" {
                    3
                } else {
                    4
                }
            );
        }
    }

    #[test]
    fn fresh_hashes_hold_only_while_the_data_is_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"first").unwrap();
        let digest = parse_digest(&hash_file(&f, ALGORITHM).unwrap()).unwrap();
        let mut fresh = Fresh::default();
        assert_eq!(
            fresh.record(&d.path().join("not yet"), digest),
            Hashed::Missing
        );
        assert_eq!(fresh.record(&f, digest), Hashed::Now);
        std::os::unix::fs::symlink(&f, d.path().join("link")).unwrap();
        assert_eq!(fresh.record(&d.path().join("link"), digest), Hashed::Passed);
        assert_eq!(fresh.record(d.path(), digest), Hashed::Passed);
        let fresh = fresh.seal();
        assert_eq!(fresh.len(), 1);
        let m = std::fs::symlink_metadata(&f).unwrap();
        assert_eq!(fresh.get(&m), Some(hash_file(&f, ALGORITHM).unwrap()));
        // A hard link made later (rsync -H) shares it: same inode, size and time.
        std::fs::hard_link(&f, d.path().join("f2")).unwrap();
        let m2 = std::fs::symlink_metadata(d.path().join("f2")).unwrap();
        assert_eq!(fresh.get(&m2), Some(hash_file(&f, ALGORITHM).unwrap()));
        // Rewritten (same size): the modification time moved on, the hash is not used.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"FIRST").unwrap();
        assert_eq!(fresh.get(&std::fs::symlink_metadata(&f).unwrap()), None);
        // Merged with a later set: the later hash of an inode wins.
        let mut later = Fresh::default();
        let now = parse_digest(&hash_file(&f, ALGORITHM).unwrap()).unwrap();
        assert_eq!(later.record(&f, now), Hashed::Now);
        let both = fresh.merge(later);
        assert_eq!(both.len(), 1);
        assert_eq!(
            both.get(&std::fs::symlink_metadata(&f).unwrap()),
            Some(hash_file(&f, ALGORITHM).unwrap())
        );
        // rsync's blanks and anything but 40 hex digits are no digest.
        assert_eq!(parse_digest(&" ".repeat(40)), None);
        assert_eq!(parse_digest("abc"), None);
        assert_eq!(parse_digest(&"ab".repeat(20)), Some([0xab; DIGEST_LEN]));
    }

    #[test]
    fn round_trip_with_odd_names() {
        let es = vec![
            Entry {
                hash: Some("ab".repeat(20)),
                size: 3,
                group: 1,
                path: b"dir/new\nline".to_vec(),
            },
            Entry {
                hash: None,
                size: 0,
                group: 0,
                path: b"latin1-\xe9t\xe9 with space".to_vec(),
            },
        ];
        let back: Vec<Entry> = records(&encode(&es)).map(Result::unwrap).collect();
        assert_eq!(back, es);
        // The shortest record there can be is MIN_RECORD bytes.
        let shortest = Entry {
            hash: Some("ef".repeat(20)),
            size: 7,
            group: 0,
            path: b"x".to_vec(),
        };
        let header = encode(&[]).len();
        assert_eq!(header, "e2ebackup-manifest 2 sha1\0".len());
        assert_eq!((encode(&[shortest]).len() - header) as u64, MIN_RECORD);
        let bad: Vec<Result<Entry>> = records(b"garbage\0").collect();
        assert_eq!(bad.len(), 1);
        assert!(bad[0].is_err());
        // A run of bytes with no NUL longer than a record can be is refused, not buffered,
        // and ends the iteration.
        let mut huge = encode(&es);
        huge.extend(std::iter::repeat_n(b'x', MAX_RECORD as usize + 10));
        let got: Vec<Result<Entry>> = records(&huge).collect();
        assert_eq!(got.len(), 3);
        assert!(got[0].is_ok() && got[1].is_ok());
        let err = format!("{:#}", got[2].as_ref().unwrap_err());
        assert!(err.contains("without its end"), "{err}");
    }

    #[test]
    fn build_reuses_shared_inodes_and_verify_names_changes() {
        let d = tempfile::tempdir().unwrap();
        let s1 = d.path().join("s1");
        let s2 = d.path().join("s2");
        std::fs::create_dir_all(s1.join("a")).unwrap();
        std::fs::write(s1.join("a/same"), b"same content").unwrap();
        std::fs::write(s1.join("a/changed"), b"old").unwrap();
        let m1 = built(&s1, None);
        assert_eq!(m1.len(), 2);
        std::fs::create_dir_all(s2.join("a")).unwrap();
        std::fs::hard_link(s1.join("a/same"), s2.join("a/same")).unwrap();
        std::fs::write(s2.join("a/changed"), b"new").unwrap();
        // Poison s1's manifest entry for the shared file: a reused hash proves no re-read.
        let mut poisoned = m1.clone();
        for e in &mut poisoned {
            if e.path == b"a/same" {
                e.hash = Some("00".repeat(20));
            }
        }
        let m2 = built(&s2, Some((&s1, &poisoned)));
        let same = m2.iter().find(|e| e.path == b"a/same").unwrap();
        assert_eq!(
            same.hash,
            Some("00".repeat(20)),
            "hash of a shared inode is reused"
        );
        let m2 = built(&s2, Some((&s1, &m1)));
        let m2 = encode(&m2);
        let (n, _, bad) = verify(&s2, records(&m2), 100, 0).unwrap();
        assert_eq!((n, bad.len()), (2, 0));
        std::fs::write(s2.join("a/changed"), b"NEW").unwrap();
        let (_, _, bad) = verify(&s2, records(&m2), 100, 0).unwrap();
        assert_eq!(
            bad,
            vec!["a/changed: content differs from the manifest".to_string()]
        );
    }

    #[test]
    fn walk_order_is_path_order_and_the_previous_manifest_is_followed_alongside() {
        let d = tempfile::tempdir().unwrap();
        let (s1, s2) = (d.path().join("s1"), d.path().join("s2"));
        // Names whose byte order and component order differ ("a" < "a-" < "a.b", but
        // "a/z" sorts before "a-" as a path), a deep file, and an empty directory.
        let names = ["a/z", "a-", "a.b", "a/b/c/d", "b", "a/0", "e/"];
        for s in [&s1, &s2] {
            for n in names {
                let p = s.join(n);
                std::fs::create_dir_all(if n.ends_with('/') {
                    &p
                } else {
                    p.parent().unwrap()
                })
                .unwrap();
            }
        }
        for n in names.iter().filter(|n| !n.ends_with('/')) {
            std::fs::write(s1.join(n), n.as_bytes()).unwrap();
        }
        // s1 also has files deleted since, sorting first, between and last.
        for n in ["0gone", "a/b/gone", "zz"] {
            std::fs::write(s1.join(n), b"gone").unwrap();
        }
        let m1 = built(&s1, None);
        let order: Vec<PathBuf> = m1
            .iter()
            .map(|e| PathBuf::from(OsStr::from_bytes(&e.path)))
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "records come in Path order");
        assert_eq!(order.len(), 9);
        // s2: every kept file hard-linked but "a.b", a new file in the middle.
        for n in names.iter().filter(|n| !n.ends_with('/') && **n != "a.b") {
            std::fs::hard_link(s1.join(n), s2.join(n)).unwrap();
        }
        std::fs::write(s2.join("a.b"), b"rewritten").unwrap();
        std::fs::write(s2.join("a/new"), b"new").unwrap();
        // Poisoned hashes in the previous manifest show which ones were reused.
        let poisoned: Vec<Entry> = m1
            .iter()
            .map(|e| Entry {
                hash: Some("00".repeat(20)),
                ..e.clone()
            })
            .collect();
        let m2 = built(&s2, Some((&s1, &poisoned)));
        let reused: Vec<&[u8]> = m2
            .iter()
            .filter(|e| e.hash == Some("00".repeat(20)))
            .map(|e| e.path.as_slice())
            .collect();
        assert_eq!(
            reused,
            vec![&b"a/0"[..], b"a/b/c/d", b"a/z", b"a-", b"b"],
            "exactly the shared inodes"
        );
        let truth = built(&s2, None);
        assert_eq!(
            m2.iter()
                .filter(|e| e.hash != Some("00".repeat(20)))
                .count(),
            2
        );
        // A previous manifest out of order loses reuse, never correctness; a damaged one
        // is read up to the damage and the rest hashed again (here: from rsync's checksums
        // of every file).
        let mut shuffled = m1.clone();
        shuffled.reverse();
        assert_eq!(built(&s2, Some((&s1, &shuffled))).len(), truth.len());
        let mut damaged = encode(&m1[..3]);
        damaged.extend_from_slice(b"no-size-field\0");
        let header = encode(&[]).len();
        damaged.extend_from_slice(&encode(&m1[3..])[header..]);
        let mut out = Vec::new();
        build(
            &s2,
            None,
            Some((&s1, records(&damaged))),
            &fresh_of(&s2, None),
            &mut out,
        )
        .unwrap();
        let got: Vec<Entry> = records(&out).map(Result::unwrap).collect();
        assert_eq!(got, truth, "re-hashed, same result");
        // verify names a damaged manifest and checks what it could read.
        let (n, _, bad) = verify(&s2, records(&damaged), 100, 0).unwrap();
        assert_eq!(n, 3);
        assert_eq!(bad.len(), 1 + 1, "{bad:?}");
        assert!(bad.iter().any(|b| b.contains("malformed manifest record")));
    }

    #[test]
    fn both_formats_are_read_and_checked_with_the_algorithm_they_name() {
        let d = tempfile::tempdir().unwrap();
        let snap = d.path();
        std::fs::write(snap.join("f"), b"content").unwrap();
        let sha256 = hash_file(&snap.join("f"), Algorithm::Sha256).unwrap();
        let sha1 = hash_file(&snap.join("f"), Algorithm::Sha1).unwrap();
        assert_eq!((sha256.len(), sha1.len()), (64, 40));
        // Format 1: no header, sha256, no group.
        let v1 = format!("{sha256} 7 f\0");
        let r = records(v1.as_bytes());
        assert_eq!((r.version, r.algorithm), (1, Algorithm::Sha256));
        let es: Vec<Entry> = r.map(Result::unwrap).collect();
        assert_eq!(
            es,
            vec![Entry {
                hash: Some(sha256.clone()),
                size: 7,
                group: 0,
                path: b"f".to_vec()
            }]
        );
        let (n, _, bad) = verify(snap, records(v1.as_bytes()), 100, 0).unwrap();
        assert_eq!((n, bad.len()), (1, 0));
        // Format 2: the header names sha1; the same file checks with it.
        let v2 = encode(&[Entry {
            hash: Some(sha1.clone()),
            size: 7,
            group: 0,
            path: b"f".to_vec(),
        }]);
        let r = records(&v2);
        assert_eq!((r.version, r.algorithm), (2, Algorithm::Sha1));
        let (n, _, bad) = verify(snap, records(&v2), 100, 0).unwrap();
        assert_eq!((n, bad.len()), (1, 0));
        // A sha256 in a sha1 manifest, or the other way round, is a finding.
        let wrong = format!("e2ebackup-manifest 2 sha1\0{sha256} 7 0 f\0");
        let (_, _, bad) = verify(snap, records(wrong.as_bytes()), 100, 0).unwrap();
        assert!(
            bad[0].contains("malformed manifest record (hash)"),
            "{bad:?}"
        );
        let wrong = format!("{sha1} 7 f\0");
        let (_, _, bad) = verify(snap, records(wrong.as_bytes()), 100, 0).unwrap();
        assert_eq!(
            bad,
            vec!["f: content differs from the manifest".to_string()]
        );
        // A file without a hash is counted, not compared.
        let none = encode(&[Entry {
            hash: None,
            size: 7,
            group: 0,
            path: b"f".to_vec(),
        }]);
        assert_eq!(
            verify(snap, records(&none), 100, 0).unwrap(),
            (0, 1, vec![])
        );
        // A newer format, or a garbled header, is refused by name, and nothing is read.
        for (head, says) in [
            (
                &b"e2ebackup-manifest 3 sha1\0"[..],
                "newer than this e2ebackup",
            ),
            (b"e2ebackup-manifest 2 md5\0", "malformed manifest header"),
            (b"e2ebackup-manifest x\0", "malformed manifest header"),
        ] {
            let mut m = head.to_vec();
            m.extend_from_slice(&v2[encode(&[]).len()..]);
            let got: Vec<Result<Entry>> = records(&m).collect();
            assert_eq!(got.len(), 1);
            let err = format!("{:#}", got[0].as_ref().unwrap_err());
            assert!(err.contains(says), "{err}");
        }
    }

    /// Copy `from` to `to` with rsync as a snapshot does (`-aH`, optionally --link-dest).
    fn rsync_snapshot(from: &Path, to: &Path, link: Option<&Path>) {
        let mut c = std::process::Command::new("rsync");
        c.args(["-aH", "--numeric-ids"]);
        if let Some(l) = link {
            c.arg(format!("--link-dest={}", l.display()));
        }
        let st = c
            .arg(format!("{}/", from.display()))
            .arg(format!("{}/", to.display()))
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Issue 29, item 3, performed with rsync itself: A and B are one inode; B is replaced
    /// by an identical independent copy (same mode and times); --link-dest links both names
    /// to the old inode again. `build` names them, and only them; a true pair is left.
    #[test]
    fn link_dest_merging_independent_files_is_found() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (src, s1, s2) = (
            d.path().join("src"),
            d.path().join("s1"),
            d.path().join("s2"),
        );
        std::fs::create_dir_all(src.join("dir")).unwrap();
        for (name, body) in [
            ("dir/a", "shared\n"),
            ("dir/c", "pair\n"),
            ("dir/e", "one\n"),
        ] {
            std::fs::write(src.join(name), body).unwrap();
        }
        std::fs::hard_link(src.join("dir/a"), src.join("dir/b")).unwrap();
        std::fs::hard_link(src.join("dir/c"), src.join("dir/d")).unwrap();
        rsync_snapshot(&src, &s1, None);
        let m1 = {
            let mut out = Vec::new();
            let b = build::<&[u8]>(&s1, Some(&src), None, &Fresh::default(), &mut out).unwrap();
            assert!(b.merged.is_empty(), "a first copy follows the source");
            assert_eq!(b.unhashed, 0, "hashed from the source");
            records(&out).map(Result::unwrap).collect::<Vec<_>>()
        };
        let group =
            |es: &[Entry], p: &str| es.iter().find(|e| e.path == p.as_bytes()).unwrap().group;
        assert_eq!(group(&m1, "dir/a"), 1);
        assert_eq!(group(&m1, "dir/b"), 1);
        assert_eq!(group(&m1, "dir/c"), 3);
        assert_eq!(group(&m1, "dir/d"), 3);
        assert_eq!(group(&m1, "dir/e"), 0);
        // B becomes an independent copy with the same content, mode and times.
        let tmp = src.join("dir/b.new");
        std::fs::copy(src.join("dir/a"), &tmp).unwrap();
        let m = std::fs::metadata(src.join("dir/a")).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m.mode())).unwrap();
        let st = std::process::Command::new("touch")
            .arg("-r")
            .arg(src.join("dir/a"))
            .arg(&tmp)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::rename(&tmp, src.join("dir/b")).unwrap();
        rsync_snapshot(&src, &s2, Some(&s1));
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(
            ino(&s2.join("dir/a")),
            ino(&s2.join("dir/b")),
            "rsync --link-dest merged them (the bug this finds)"
        );
        let bytes = encode(&m1);
        let mut out = Vec::new();
        let b = build(
            &s2,
            Some(&src),
            Some((&s1, records(&bytes))),
            &Fresh::default(),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            b.merged,
            vec![PathBuf::from("dir/a"), PathBuf::from("dir/b")],
            "the merged names, not the true pair"
        );
        let m2: Vec<Entry> = records(&out).map(Result::unwrap).collect();
        assert_eq!((group(&m2, "dir/a"), group(&m2, "dir/b")), (0, 0));
        assert_eq!((group(&m2, "dir/c"), group(&m2, "dir/d")), (3, 3));
        assert_eq!(b.unhashed, 0);
        // Copied again without --link-dest (what `links::copy_again` does): nothing left.
        for n in &b.merged {
            std::fs::remove_file(s2.join(n)).unwrap();
        }
        let st = std::process::Command::new("rsync")
            .args(["-aH", "--numeric-ids", "--relative"])
            .arg(format!("{}/./dir/a", src.display()))
            .arg(format!("{}/./dir/b", src.display()))
            .arg(format!("{}/", s2.display()))
            .status()
            .unwrap();
        assert!(st.success());
        let mut out = Vec::new();
        let b = build(
            &s2,
            Some(&src),
            Some((&s1, records(&bytes))),
            &Fresh::default(),
            &mut out,
        )
        .unwrap();
        assert!(b.merged.is_empty(), "{:?}", b.merged);
        assert_ne!(ino(&s2.join("dir/a")), ino(&s2.join("dir/b")));
        assert_eq!(ino(&s2.join("dir/c")), ino(&s2.join("dir/d")));
        // The reverse: a source pair that the snapshot holds as two inodes is named too.
        std::fs::remove_file(s2.join("dir/d")).unwrap();
        std::fs::copy(s2.join("dir/c"), s2.join("dir/d")).unwrap();
        let mut out = Vec::new();
        let b = build::<&[u8]>(&s2, Some(&src), None, &Fresh::default(), &mut out).unwrap();
        assert_eq!(
            b.merged,
            vec![PathBuf::from("dir/c"), PathBuf::from("dir/d")]
        );
    }

    #[test]
    fn a_restore_is_checked_file_by_file() {
        let d = tempfile::tempdir().unwrap();
        let (snap, target) = (d.path().join("snap"), d.path().join("target"));
        for root in [&snap, &target] {
            std::fs::create_dir_all(root.join("home/alice")).unwrap();
            std::fs::create_dir_all(root.join("etc")).unwrap();
            for (i, f) in ["home/alice/x", "home/alice/y", "etc/z", "etc/w"]
                .iter()
                .enumerate()
            {
                std::fs::write(root.join(f), format!("file {i}").repeat(1000)).unwrap();
            }
        }
        let m = built(&snap, None);
        let bytes = encode(&m);
        let all = check_restored(&target, records(&bytes), &[], 3).unwrap();
        assert_eq!((all.checked, all.unhashed, all.bad.len()), (4, 0, 0));
        // A flipped byte, a missing file, a link in place of a file; other files in the
        // target are none of its business.
        let mut y = std::fs::read(target.join("home/alice/y")).unwrap();
        y[1234] ^= 1;
        std::fs::write(target.join("home/alice/y"), y).unwrap();
        std::fs::remove_file(target.join("etc/z")).unwrap();
        std::fs::remove_file(target.join("etc/w")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", target.join("etc/w")).unwrap();
        std::fs::write(target.join("etc/extra"), b"not in the manifest").unwrap();
        let all = check_restored(&target, records(&bytes), &[], 3).unwrap();
        assert_eq!(all.checked, 4);
        assert_eq!(all.bad.len(), 3, "{:?}", all.bad);
        assert!(all.bad[0].starts_with("etc/w: "), "{:?}", all.bad);
        assert_eq!(all.bad[1], "etc/z: missing after the restore");
        assert_eq!(
            all.bad[2],
            "home/alice/y: content differs from the manifest"
        );
        // A subset checks that subset only ("/home/alice", not "/home/alic").
        let sub =
            check_restored(&target, records(&bytes), &[PathBuf::from("/home/alice")], 2).unwrap();
        assert_eq!((sub.checked, sub.bad.len()), (2, 1));
        let none =
            check_restored(&target, records(&bytes), &[PathBuf::from("/home/alic")], 2).unwrap();
        assert_eq!(none.checked, 0);
        // A damaged manifest is itself a finding.
        let mut damaged = bytes.clone();
        damaged.extend_from_slice(b"garbage\0");
        let r = check_restored(&target, records(&damaged), &[], 1).unwrap();
        assert!(r
            .bad
            .iter()
            .any(|b| b.contains("malformed manifest record")));
    }

    #[test]
    fn rolling_subset_covers_everything_over_its_period() {
        let paths: Vec<Vec<u8>> = (0..2000).map(|i| format!("f{i}").into_bytes()).collect();
        let bucket_of = |p: &[u8]| (0..BUCKETS).find(|c| in_rolling_subset(p, 1, *c)).unwrap();
        // Each path is in exactly one bucket, and the buckets are all used.
        let buckets: Vec<u32> = paths.iter().map(|p| bucket_of(p)).collect();
        for (p, b) in paths.iter().zip(&buckets) {
            assert_eq!(
                (0..BUCKETS).filter(|c| in_rolling_subset(p, 1, *c)).count(),
                1
            );
            assert!(*b < BUCKETS);
        }
        assert_eq!(
            buckets
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            BUCKETS as usize
        );
        // Every percentage, from any starting cursor: ceil(100 / P) runs, each moving the
        // cursor on, read every file; each run reads about P % of them.
        for percent in 1..=BUCKETS {
            for start in [0, 1, 37, 99] {
                let mut seen = vec![false; paths.len()];
                let mut cursor = start;
                let runs = BUCKETS.div_ceil(percent);
                for _ in 0..runs {
                    let mut today = 0;
                    for (i, p) in paths.iter().enumerate() {
                        if in_rolling_subset(p, percent, cursor) {
                            seen[i] = true;
                            today += 1;
                        }
                    }
                    let expect = paths.len() as u32 * percent / BUCKETS;
                    assert!(
                        today as u32 <= expect * 2 + 60,
                        "{percent}%: {today} of 2000 in one run"
                    );
                    cursor = next_cursor(cursor, percent);
                }
                assert!(
                    seen.iter().all(|s| *s),
                    "{percent}% from {start}: {runs} runs read every file"
                );
            }
        }
        // The date-based offset this replaces: at 50 % every 2 days it never moved.
        let day_offset = |day: u32, percent: u32| (day * percent) % 100;
        assert_eq!(day_offset(0, 50), day_offset(2, 50));
        // The cursor does move: 50 % twice covers 0..100.
        assert_eq!(next_cursor(next_cursor(0, 50), 50), 0);
        assert_eq!(next_cursor(0, 50), 50);
        assert_eq!(next_cursor(99, 100), 99);
        // Percentages that change between runs keep the windows contiguous.
        let mut seen = [false; BUCKETS as usize];
        let mut cursor = 90;
        for percent in [30, 10, 45, 15] {
            for b in 0..BUCKETS {
                if (b + BUCKETS - cursor) % BUCKETS < percent {
                    seen[b as usize] = true;
                }
            }
            cursor = next_cursor(cursor, percent);
        }
        assert!(seen.iter().all(|s| *s));
        // The kept cursor: absent or garbled reads as 0.
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("verify-cursor");
        assert_eq!(read_cursor(&f), 0);
        std::fs::write(&f, "42\n").unwrap();
        assert_eq!(read_cursor(&f), 42);
        std::fs::write(&f, "142").unwrap();
        assert_eq!(read_cursor(&f), 0);
    }
}
