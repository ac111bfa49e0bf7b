//! Per-snapshot manifests: the SHA-256 of every regular file, written at backup time, so
//! `verify` can name every file whose content changed on the server afterwards (XTS has
//! no integrity: a flipped ciphertext bit decrypts to 16 garbled bytes, silently).
//!
//! Format: `manifests/<id>` inside the container, one record per file,
//! `<sha256 hex> <size> <path>\0` with the path relative to the snapshot. Records end in NUL
//! because file names may contain newlines and need not be UTF-8; they cannot contain NUL.
//! Hashing is incremental: a file that rsync hard-linked to the previous snapshot (same
//! inode) has the same content, so its hash is taken from the previous manifest; a file
//! rsync wrote was hashed as it wrote it ([`Fresh`]); only the rest is read here.

use std::cmp::Ordering;
use std::ffi::{OsStr, OsString};
use std::fs::{File, FileType};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const MANIFESTS: &str = "manifests";

/// The longest record read back: a hash, a size and a path (a path below the snapshot can
/// exceed PATH_MAX, but not by this much). A longer run without a NUL is damage (XTS lets
/// the server garble ciphertext undetected), and a record is never read without a bound.
const MAX_RECORD: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub sha256: String,
    pub size: u64,
    /// Relative to the snapshot directory, raw bytes.
    pub path: Vec<u8>,
}

pub fn path_of(root: &Path, id: &str) -> PathBuf {
    root.join(MANIFESTS).join(id)
}

pub fn hash_file(p: &Path) -> Result<String> {
    let mut f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let digest = digest_of(&mut f).with_context(|| format!("reading {}", p.display()))?;
    Ok(hex(&digest))
}

/// SHA-256 (hex) of everything `r` reads.
pub fn hash_reader(mut r: impl Read) -> Result<String> {
    Ok(hex(&digest_of(&mut r)?))
}

/// SHA-256 of everything `r` reads, in 1 MiB reads; a signal ends it between two of them.
fn digest_of(r: &mut impl Read) -> Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        crate::signals::check()?;
    }
    Ok(h.finalize().into())
}

fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a hash was taken of: a file keeps its device, inode, size and ctime only while
/// its data stays the same (every write sets the ctime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    /// Nanoseconds since the epoch.
    ctime: i64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            ctime: m.ctime().saturating_mul(1_000_000_000) + m.ctime_nsec(),
        }
    }
}

/// What [`Fresh::hash`] made of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hashed {
    Now,
    /// Nothing there yet: rsync names a file just before it renames it into place.
    Missing,
    /// Not a regular file, changed while read, unreadable, or no room left: `build` hashes
    /// it if it is a file of the snapshot.
    Passed,
}

/// The hashes of the files rsync writes in this run, each taken right after rsync wrote
/// it, from the page cache. Without them `build` read every new file back after rsync was
/// done, and by then a client that cannot cache all the new data (a first backup larger
/// than its memory, or a machine that reclaims idle page cache, as this one does) had lost
/// the pages: the file came back from the server, a second transfer of the new data at one
/// small file per round trip (docs/benchmarks.md, run 9). 64 bytes a file, looked up by
/// inode once [`Fresh::seal`]ed.
#[derive(Debug, Default)]
pub struct Fresh {
    taken: Vec<(Stamp, [u8; 32])>,
}

impl Fresh {
    /// At most this many hashes are held (8 MiB); the files after them are hashed by
    /// `build`, as before. 100000 new files fit: `run`'s memory target is set there.
    pub const MOST: usize = 1 << 17;

    /// Hash the regular file at `p`: never through a link at its end, never opening
    /// anything but a regular file.
    pub fn hash(&mut self, p: &Path) -> Hashed {
        self.hash_up_to(p, Self::MOST)
    }

    /// What a resume keeps of the files an earlier run left, checked against their source
    /// ([`Fresh::hash_expecting`]): 64 MiB of hashes for a million files, the rest sent again.
    pub const MOST_CHECKED: usize = 1 << 20;

    fn hash_up_to(&mut self, p: &Path, most: usize) -> Hashed {
        let m = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Hashed::Missing,
            Err(_) => return Hashed::Passed,
        };
        if !m.file_type().is_file() || self.taken.len() >= most {
            return Hashed::Passed;
        }
        let taken = (|| -> Result<Option<(Stamp, [u8; 32])>> {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(p)?;
            let before = f.metadata()?;
            if !before.file_type().is_file() || before.ino() != m.ino() {
                return Ok(None);
            }
            let digest = digest_of(&mut f)?;
            let stamp = Stamp::of(&before);
            Ok((Stamp::of(&f.metadata()?) == stamp).then_some((stamp, digest)))
        })();
        match taken {
            Ok(Some(t)) => {
                if self.taken.capacity() == self.taken.len() {
                    // Grow by doubling up to `most`, never past it.
                    let more = self.taken.len().max(1024).min(most - self.taken.len());
                    self.taken.reserve_exact(more);
                }
                self.taken.push(t);
                Hashed::Now
            }
            _ => Hashed::Passed,
        }
    }

    /// [`Fresh::hash`], keeping the hash only when it is `want` (hex): otherwise `Passed`.
    /// A resumed snapshot's files left by an earlier run are kept with the hash of their
    /// source file this way (snapshots::resume).
    pub fn hash_expecting(&mut self, p: &Path, want: &str) -> Hashed {
        let n = self.taken.len();
        let r = self.hash_up_to(p, Self::MOST_CHECKED);
        if r == Hashed::Now && hex(&self.taken[n].1) != want {
            self.taken.truncate(n);
            return Hashed::Passed;
        }
        r
    }

    /// Ready for lookups: sorted by inode, the newest hash of each kept.
    pub fn seal(mut self) -> Fresh {
        self.taken.reverse();
        self.taken.sort_by_key(|(s, _)| (s.dev, s.ino));
        self.taken.dedup_by_key(|(s, _)| (s.dev, s.ino));
        self
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

fn encode_into(w: &mut impl Write, e: &Entry) -> std::io::Result<()> {
    write!(w, "{} {} ", e.sha256, e.size)?;
    w.write_all(&e.path)?;
    w.write_all(&[0])
}

pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        encode_into(&mut out, e).expect("writing to a Vec");
    }
    out
}

fn parse_record(rec: &[u8]) -> Result<Entry> {
    let mut parts = rec.splitn(3, |b| *b == b' ');
    let (Some(h), Some(s), Some(p)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("malformed manifest record");
    };
    Ok(Entry {
        sha256: String::from_utf8_lossy(h).into_owned(),
        size: std::str::from_utf8(s)
            .ok()
            .and_then(|s| s.parse().ok())
            .context("malformed manifest record (size)")?,
        path: p.to_vec(),
    })
}

/// The records of a manifest, read one at a time: memory stays flat in the file count.
pub struct Records<R> {
    r: R,
    what: String,
    buf: Vec<u8>,
    done: bool,
}

impl<R: BufRead> Records<R> {
    pub fn new(r: R, what: impl Into<String>) -> Records<R> {
        Records {
            r,
            what: what.into(),
            buf: Vec::new(),
            done: false,
        }
    }
}

impl<R: BufRead> Iterator for Records<R> {
    type Item = Result<Entry>;
    fn next(&mut self) -> Option<Result<Entry>> {
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
                    parse_record(&self.buf)
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

/// The fewest bytes a record takes: a 64-digit hash, a space, a one-digit size, a space, a
/// one-byte path and the NUL.
const MIN_RECORD: u64 = 64 + 1 + 1 + 1 + 1 + 1;

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

/// Write the manifest of `snap` to `out`, one record per regular file, reusing the hash of
/// every file that shares its inode with the same path in the previous snapshot `prev`
/// (its directory and its manifest, followed alongside in the same order), then those in
/// `fresh`; the rest are read and hashed here. A previous manifest that cannot be read only
/// costs re-hashing. Returns the number of records.
pub fn build<R: BufRead>(
    snap: &Path,
    prev: Option<(&Path, Records<R>)>,
    fresh: &Fresh,
    out: &mut impl Write,
) -> Result<Built> {
    let (pdir, mut prev_records) = match prev {
        Some((d, r)) => (Some(d), Some(r)),
        None => (None, None),
    };
    // The same records as the previous manifest, so far: every file reused in order, no
    // previous record passed over, nothing unreadable.
    let same = std::cell::Cell::new(pdir.is_some());
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
    let mut pending = next_prev();
    let mut n = 0;
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
        let reused = match (&pending, pdir) {
            (Some(e), Some(pdir)) if Path::new(OsStr::from_bytes(&e.path)) == rel => {
                std::fs::symlink_metadata(pdir.join(&rel))
                    .ok()
                    .filter(|pm| pm.ino() == m.ino() && pm.dev() == m.dev() && e.size == m.len())
                    .map(|_| e.sha256.clone())
            }
            _ => None,
        };
        // A reused record is consumed: the next one waits for the next path.
        if reused.is_some() {
            pending = next_prev();
        } else {
            same.set(false);
        }
        let entry = Entry {
            sha256: match reused.or_else(|| fresh.get(&m)) {
                Some(h) => h,
                None => hash_file(&abs)?,
            },
            size: m.len(),
            path: rel.into_os_string().into_vec(),
        };
        encode_into(out, &entry)?;
        n += 1;
    }
    if pending.is_some() || next_prev().is_some() {
        same.set(false);
    }
    Ok(Built {
        files: n,
        same_as_previous: same.get(),
    })
}

/// What [`build`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Built {
    pub files: u64,
    /// Record for record what the previous manifest holds (a run that changed nothing).
    pub same_as_previous: bool,
}

/// A manifest ready to be put in place, not yet synced: written to a temporary file
/// beside its place, or, when it came out byte for byte the previous one, that one.
#[derive(Debug)]
pub struct Written {
    pub files: u64,
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
}

/// Build the manifest of snapshot `id` (in the directory `snap`) into a temporary file.
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
    prev: Option<(&Path, &str, Records<R>)>,
    fresh: &Fresh,
) -> Result<Written> {
    let dir = root.join(MANIFESTS);
    std::fs::create_dir_all(&dir)?;
    let mut built = None;
    let path = path_of(root, id);
    let previous = prev.as_ref().map(|(_, pid, _)| path_of(root, pid));
    let (tmp, f) = crate::fsutil::write_temp_with(&path, |w| {
        built = Some(build(snap, prev.map(|(d, _, r)| (d, r)), fresh, w)?);
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

/// Whether `path` belongs to today's share of a rolling `percent` subset: over
/// 100/percent days every file is read once.
pub fn in_rolling_subset(path: &[u8], percent: u32, day: i64) -> bool {
    if percent >= 100 {
        return true;
    }
    let h = Sha256::digest(path);
    let bucket = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % 100;
    let offset = ((day.rem_euclid(100)) as u32 * percent) % 100;
    (bucket + 100 - offset) % 100 < percent
}

/// Compare `snap` against its manifest's records; returns how many files were read and the
/// paths (lossy, for messages) that differ.
pub fn verify(
    snap: &Path,
    entries: impl IntoIterator<Item = Result<Entry>>,
    percent: u32,
    day: i64,
) -> Result<(u64, Vec<String>)> {
    let mut checked = 0;
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
        if !in_rolling_subset(&e.path, percent, day) {
            continue;
        }
        crate::signals::check()?;
        checked += 1;
        let abs = snap.join(OsStr::from_bytes(&e.path));
        let shown = String::from_utf8_lossy(&e.path).into_owned();
        match hash_file(&abs) {
            Ok(h) if h == e.sha256 => {}
            Ok(_) => bad.push(format!("{shown}: content differs from the manifest")),
            Err(err) => bad.push(format!("{shown}: {err:#}")),
        }
    }
    Ok((checked, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(data: &[u8]) -> Records<&[u8]> {
        Records::new(data, "test")
    }

    /// `build` into memory, the previous manifest given as entries.
    fn built(snap: &Path, prev: Option<(&Path, &[Entry])>) -> Vec<Entry> {
        let bytes = prev.map(|(_, es)| encode(es)).unwrap_or_default();
        let mut out = Vec::new();
        let n = build(
            snap,
            prev.map(|(d, _)| (d, records(&bytes))),
            &Fresh::default(),
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
        let w1 = write::<&[u8]>(root, "s1", &snap("s1"), None, &none).unwrap();
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
            let w = write(root, s, &snap(s), Some((&snap("s1"), "s1", prev)), &none).unwrap();
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
        let mut fresh = Fresh::default();
        assert_eq!(fresh.hash(&d.path().join("not yet")), Hashed::Missing);
        assert_eq!(fresh.hash(&f), Hashed::Now);
        std::os::unix::fs::symlink(&f, d.path().join("link")).unwrap();
        assert_eq!(fresh.hash(&d.path().join("link")), Hashed::Passed);
        assert_eq!(fresh.hash(d.path()), Hashed::Passed);
        // A FIFO is neither opened (that would wait for a writer) nor hashed.
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(fresh.hash(&fifo), Hashed::Passed);
        let fresh = fresh.seal();
        assert_eq!(fresh.len(), 1);
        let m = std::fs::symlink_metadata(&f).unwrap();
        assert_eq!(fresh.get(&m), Some(hash_file(&f).unwrap()));
        // Rewritten (same size): the ctime moved on, the hash is not used.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"FIRST").unwrap();
        assert_eq!(fresh.get(&std::fs::symlink_metadata(&f).unwrap()), None);
        // Hashed again later (a hard link made after it): the newest hash is the one kept.
        let mut again = Fresh::default();
        std::fs::write(&f, b"one").unwrap();
        assert_eq!(again.hash(&f), Hashed::Now);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::hard_link(&f, d.path().join("f2")).unwrap();
        assert_eq!(again.hash(&d.path().join("f2")), Hashed::Now);
        let again = again.seal();
        assert_eq!(again.len(), 1);
        let m = std::fs::symlink_metadata(&f).unwrap();
        assert_eq!(again.get(&m), Some(hash_file(&f).unwrap()));
    }

    #[test]
    fn round_trip_with_odd_names() {
        let es = vec![
            Entry {
                sha256: "ab".repeat(32),
                size: 3,
                path: b"dir/new\nline".to_vec(),
            },
            Entry {
                sha256: "cd".repeat(32),
                size: 0,
                path: b"latin1-\xe9t\xe9 with space".to_vec(),
            },
        ];
        let back: Vec<Entry> = records(&encode(&es)).map(Result::unwrap).collect();
        assert_eq!(back, es);
        // The shortest record there can be is MIN_RECORD bytes.
        let shortest = Entry {
            sha256: "ef".repeat(32),
            size: 7,
            path: b"x".to_vec(),
        };
        assert_eq!(encode(&[shortest]).len() as u64, MIN_RECORD);
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
                e.sha256 = "00".repeat(32);
            }
        }
        let m2 = built(&s2, Some((&s1, &poisoned)));
        let same = m2.iter().find(|e| e.path == b"a/same").unwrap();
        assert_eq!(
            same.sha256,
            "00".repeat(32),
            "hash of a shared inode is reused"
        );
        let m2 = built(&s2, Some((&s1, &m1)));
        let ok = |es: &[Entry]| es.iter().cloned().map(Ok).collect::<Vec<_>>();
        let (n, bad) = verify(&s2, ok(&m2), 100, 0).unwrap();
        assert_eq!((n, bad.len()), (2, 0));
        std::fs::write(s2.join("a/changed"), b"NEW").unwrap();
        let (_, bad) = verify(&s2, ok(&m2), 100, 0).unwrap();
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
                sha256: "00".repeat(32),
                ..e.clone()
            })
            .collect();
        let m2 = built(&s2, Some((&s1, &poisoned)));
        let reused: Vec<&[u8]> = m2
            .iter()
            .filter(|e| e.sha256 == "00".repeat(32))
            .map(|e| e.path.as_slice())
            .collect();
        assert_eq!(
            reused,
            vec![&b"a/0"[..], b"a/b/c/d", b"a/z", b"a-", b"b"],
            "exactly the shared inodes"
        );
        let truth = built(&s2, None);
        assert_eq!(m2.iter().filter(|e| e.sha256 != "00".repeat(32)).count(), 2);
        // A previous manifest out of order loses reuse, never correctness; a damaged one
        // is read up to the damage and the rest hashed again.
        let mut shuffled = m1.clone();
        shuffled.reverse();
        assert_eq!(built(&s2, Some((&s1, &shuffled))).len(), truth.len());
        let mut damaged = encode(&m1[..3]);
        damaged.extend_from_slice(b"no-size-field\0");
        damaged.extend_from_slice(&encode(&m1[3..]));
        let mut out = Vec::new();
        build(
            &s2,
            Some((&s1, records(&damaged))),
            &Fresh::default(),
            &mut out,
        )
        .unwrap();
        let got: Vec<Entry> = records(&out).map(Result::unwrap).collect();
        assert_eq!(got, truth, "re-hashed, same result");
        // verify names a damaged manifest and checks what it could read.
        let (n, bad) = verify(&s2, records(&damaged), 100, 0).unwrap();
        assert_eq!(n, 3);
        assert_eq!(bad.len(), 1 + 1, "{bad:?}");
        assert!(bad.iter().any(|b| b.contains("malformed manifest record")));
    }

    #[test]
    fn rolling_subset_covers_everything_over_its_period() {
        let paths: Vec<Vec<u8>> = (0..2000).map(|i| format!("f{i}").into_bytes()).collect();
        let mut seen = vec![false; paths.len()];
        for day in 0..10 {
            let mut today = 0;
            for (i, p) in paths.iter().enumerate() {
                if in_rolling_subset(p, 10, day) {
                    seen[i] = true;
                    today += 1;
                }
            }
            assert!(
                (120..=280).contains(&today),
                "day {day}: {today} of 2000 at 10%"
            );
        }
        assert!(seen.iter().all(|s| *s), "10 days at 10% read every file");
    }
}
