//! Snapshots inside the container: the on-disk layout, and taking one with rsync.
//!
//! Layout (docs/layout.md; plain directories so a person can restore with `cp -a`):
//! ```text
//!   FORMAT                          "e2ebackup container format 1"
//!   snapshots/<id>/<absolute path>  complete snapshots, <id> = UTC time 20261122T123005Z
//!   manifests/<id>                  SHA-256 of every file of snapshot <id> (for `verify`)
//!   STATE                           authenticated generation counter (see generation.rs)
//!   .partial/<id>/...               a snapshot being written
//! ```
//! A snapshot is written under `.partial/` and renamed into `snapshots/` only after rsync
//! succeeded and the filesystem was synced, so a run that is interrupted, killed or fails
//! never leaves anything that looks complete; rename within one filesystem is atomic.
//! Unchanged files are hard links to the newest complete snapshot (`--link-dest`), so every
//! snapshot is a full tree while only changed files take space.

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cmd::Cmd;
use crate::profile::Profile;
use crate::snapid::SnapshotId;
use crate::stack::mount::{self, MountEntry};
use crate::{info, warn};

pub const FORMAT_LINE: &str = "e2ebackup container format 1";
pub const SNAPSHOTS: &str = "snapshots";
pub const PARTIAL: &str = ".partial";

/// Create the layout in a freshly made filesystem.
pub fn create_layout(root: &Path) -> Result<()> {
    std::fs::create_dir(root.join(SNAPSHOTS))?;
    std::fs::create_dir(root.join(crate::manifest::MANIFESTS))?;
    std::fs::create_dir(root.join(PARTIAL))?;
    std::fs::write(root.join("FORMAT"), format!("{FORMAT_LINE}\n"))?;
    // lost+found stays: e2fsck wants it.
    mount::syncfs(root)
}

/// Refuse a filesystem that is not ours (wrong container, or a damaged one).
pub fn check_layout(root: &Path) -> Result<()> {
    let f = std::fs::read_to_string(root.join("FORMAT")).unwrap_or_default();
    if f.trim() != FORMAT_LINE || !root.join(SNAPSHOTS).is_dir() {
        bail!(
            "the container's filesystem does not hold an e2ebackup layout (FORMAT file missing or unknown: {:?})",
            f.trim()
        );
    }
    Ok(())
}

/// Complete snapshots, oldest first. Entries that are not snapshot ids are reported, not used.
pub fn list(root: &Path) -> Result<Vec<SnapshotId>> {
    let dir = root.join(SNAPSHOTS);
    let mut v = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let name = e.file_name();
        match name.to_str().and_then(|n| n.parse::<SnapshotId>().ok()) {
            Some(id) if e.file_type()?.is_dir() => v.push(id),
            _ => warn!(
                "ignoring {} in snapshots/: not a snapshot",
                name.to_string_lossy()
            ),
        }
    }
    v.sort();
    Ok(v)
}

pub fn path_of(root: &Path, id: SnapshotId) -> PathBuf {
    root.join(SNAPSHOTS).join(id.to_string())
}

/// Remove what killed or failed runs left under `.partial/`, and their manifests not yet
/// put in place.
pub fn remove_partials(root: &Path) -> Result<usize> {
    crate::manifest::remove_temporaries(root)?;
    let dir = root.join(PARTIAL);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        info!(
            "removing incomplete snapshot {} left by an earlier run",
            p.display()
        );
        remove_tree(&p)?;
        n += 1;
    }
    Ok(n)
}

/// Delete a directory tree (a snapshot is a hard-link farm: unlinks only, no data copying).
pub fn remove_tree(p: &Path) -> Result<()> {
    std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))
}

/// How a snapshot went.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Taken {
    pub id: String,
    /// rsync exit 24: some files vanished while being copied (committed, with a warning).
    pub vanished_files: bool,
    pub files_transferred: Option<u64>,
    pub bytes_transferred: Option<u64>,
    pub link_dest: Option<String>,
}

/// Apply the retention policy to the snapshots in the mounted container at `root`.
/// Returns the decisions (newest first). With `dry_run` nothing is removed. The removals
/// are not synced: the caller commits the generation next, which makes them durable.
pub fn prune(p: &Profile, root: &Path, dry_run: bool) -> Result<Vec<crate::retention::Decision>> {
    use crate::retention;
    let ids = list(root)?;
    let now = crate::snapid::SnapshotId::now().unix();
    let decisions = retention::select(&ids, &p.retention, now);
    if p.retention.is_empty() {
        return Ok(decisions);
    }
    if let Some(f) = retention::future(&ids, now) {
        warn!(
            "snapshot {f} is dated in the future (this clock reads {}; was it set ahead when that snapshot was taken?): \
             retention is suspended and nothing is pruned until the clock passes {f}; \
             if that snapshot's date is wrong, remove it by hand (docs/operations.md, clock jumps)",
            crate::snapid::SnapshotId::from_unix(now)
        );
        return Ok(decisions);
    }
    for d in &decisions {
        if d.removed() && !dry_run {
            crate::signals::check()?;
            info!("pruning snapshot {}", d.id);
            // Move out of snapshots/ first (atomic), so an interrupted delete never leaves
            // a half-deleted tree that looks like a complete snapshot.
            let from = path_of(root, d.id);
            let to = root.join(PARTIAL).join(format!("{}.pruning", d.id));
            std::fs::rename(&from, &to)?;
            remove_tree(&to)?;
            let m = crate::manifest::path_of(root, &d.id.to_string());
            if m.exists() {
                std::fs::remove_file(&m)?;
            }
        }
    }
    // Not synced here: the generation commit that follows makes the removals durable
    // (its fsync commits their journal transactions), one journal commit less.
    Ok(decisions)
}

/// The rsync argv for one snapshot, with the mounts of this moment.
pub fn rsync_command(profile: &Profile, dest: &Path, link_dest: Option<&Path>) -> Result<Cmd> {
    // No mount table (no /proc) leaves only the fixed exclusions.
    let mounts = mount::mounts().unwrap_or_default();
    rsync_command_for(profile, dest, link_dest, &mounts)
}

fn rsync_command_for(
    profile: &Profile,
    dest: &Path,
    link_dest: Option<&Path>,
    mounts: &[MountEntry],
) -> Result<Cmd> {
    let mut c = Cmd::new("rsync")?
        .args([
            "-aHAX",
            "--numeric-ids",
            "--delete",
            "--relative",
            "--stats",
            // One overall progress line, rewritten in place: parsed for the progress meter.
            "--info=progress2",
        ])
        // A line for each item written, after its data (%b): the files are hashed as they
        // arrive (`hash_behind`).
        .arg(format!("--out-format={WROTE}%b:%n"))
        // rsync 24 = vanished source files: normal on a live system.
        .ok_codes(&[0, 24]);
    if profile.backup.one_file_system {
        c = c.arg("--one-file-system");
    }
    if let Some(l) = link_dest {
        c = c.arg(format!("--link-dest={}", l.display()));
    }
    for e in always_excluded(&profile.backup.sources, mounts) {
        c = c.arg(format!("--exclude={e}"));
    }
    for e in &profile.backup.excludes {
        c = c.arg(format!("--exclude={e}"));
    }
    for s in &profile.backup.sources {
        c = c.arg(&s.0);
    }
    Ok(c.arg(format!("{}/", dest.display())))
}

/// What rsync's line for each item it writes starts with (`--out-format`); then the bytes it
/// sent for it, a colon and its name, as rsync prints names: relative to the destination
/// (with a leading slash under --relative), a directory with a trailing slash, and every
/// byte it does not print as itself (control characters, bytes the locale cannot show,
/// and the backslash of a literal `\#`) escaped as `\#` and three octal digits.
const WROTE: &str = "e2ebackup-wrote:";

/// The path below the destination of the file one of rsync's `WROTE` lines names; `None`
/// for any other line, a directory, or a name that would leave the destination.
fn wrote(line: &str) -> Option<PathBuf> {
    let (_, name) = line.strip_prefix(WROTE)?.split_once(':')?;
    if name.ends_with('/') {
        return None;
    }
    let b = name.as_bytes();
    let mut raw = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i..i + 5)
            .filter(|e| e.starts_with(b"\\#") && e[2..].iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(e) => {
                let v = e[2..].iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                raw.push(u8::try_from(v).ok()?);
                i += 5;
            }
            None => {
                raw.push(b[i]);
                i += 1;
            }
        }
    }
    let rel = raw.strip_prefix(b"/").unwrap_or(&raw);
    let inside = rel
        .split(|b| *b == b'/')
        .all(|c| !matches!(c, b"" | b"." | b".."));
    inside.then(|| PathBuf::from(std::ffi::OsString::from_vec(rel.to_vec())))
}

/// Directories whose contents are never worth a snapshot: kernel interfaces and runtime
/// state, recreated at boot. Their own directories stay (a restored system needs the mount
/// points), only what is under them is excluded.
pub const PSEUDO_DIRS: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

/// File system types that are kernel interfaces or memory, wherever they are mounted (a bind
/// of /proc into a chroot is still /proc).
const PSEUDO_FS: [&str; 20] = [
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "pstore",
    "bpf",
    "mqueue",
    "hugetlbfs",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "efivarfs",
    "autofs",
    "rpc_pipefs",
];

/// An rsync pattern that matches `dir`'s contents literally. The pattern has a wildcard (the
/// final `*`), so rsync reads a backslash as an escape: escape the wildcard characters.
fn contents_pattern(dir: &Path) -> String {
    let mut p = String::new();
    for ch in dir.to_string_lossy().chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(ch);
    }
    format!("{}/*", p.trim_end_matches('/'))
}

/// The exclusions every run adds in front of the profile's own, for `sources` and the
/// current `mounts` (see [`crate::stack::mount::mounts`]): the contents of
/// - e2ebackup's run dir ([`crate::RUN_DIR`]: the sshfs mount of the server and the mounted
///   container are under it; without this, a source of `/` with one_file_system off copies
///   the container into itself),
/// - every mount of an opened e2ebackup container (`/dev/mapper/e2ebackup-*`, e.g. where
///   `e2ebackup mount` put it),
/// - [`PSEUDO_DIRS`] and every mount of a [`PSEUDO_FS`] type,
///
/// each only where a source contains it. A pseudo directory named as a source itself (say
/// `/run/foo` or `/dev/shm`) is the user's explicit wish and is not excluded, but the run
/// dir always is.
pub fn always_excluded(sources: &[crate::profile::AbsPath], mounts: &[MountEntry]) -> Vec<String> {
    let under = |d: &Path, strict: bool| {
        sources
            .iter()
            .any(|s| d.starts_with(&s.0) && (!strict || d != s.0.as_path()))
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    let add = |d: PathBuf, dirs: &mut Vec<PathBuf>| {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    };
    let run = Path::new(crate::layout::RUN_DIR);
    // The run dir, also when a source is inside it.
    if under(run, false) || sources.iter().any(|s| s.0.starts_with(run)) {
        add(run.to_path_buf(), &mut dirs);
    }
    for d in PSEUDO_DIRS {
        if under(Path::new(d), true) {
            add(PathBuf::from(d), &mut dirs);
        }
    }
    for m in mounts {
        let (mp, fstype, source) = (&m.target, &m.fstype, &m.source);
        let ours = source.starts_with("/dev/mapper/e2ebackup-") || mp.starts_with(run);
        if dirs.iter().any(|d| mp.starts_with(d)) {
            // Already covered (say /dev/pts under /dev, or a mount in the run dir).
            continue;
        }
        let ours_here = ours && (under(mp, false) || sources.iter().any(|s| s.0.starts_with(mp)));
        let pseudo_here = PSEUDO_FS.contains(&fstype.as_str()) && under(mp, true);
        if ours_here || pseudo_here {
            add(mp.clone(), &mut dirs);
        }
    }
    dirs.iter().map(|d| contents_pattern(d)).collect()
}

fn stat_number(stats: &str, label: &str) -> Option<u64> {
    let line = stats.lines().find(|l| l.starts_with(label))?;
    let v = line.split(':').nth(1)?.split_whitespace().next()?;
    v.replace(',', "").parse().ok()
}

/// Threads that walk the previous snapshot before rsync does.
const PREFETCH_THREADS: usize = 8;
/// Kernel memory a prefetched file costs, about (inode, dentry, its share of inode-table and
/// directory blocks): the prefetch is skipped when it would take over half of the free memory
/// (cached metadata evicted before rsync reaches it would only be read twice).
const PREFETCH_BYTES_PER_FILE: u64 = 2048;

fn mem_available() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = m
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Read the directories and inodes of the tree at `dir` with several threads, so that the
/// kernel caches them. rsync's `--link-dest` walk then finds them in memory: it compares
/// every source file with its counterpart in the previous snapshot, one after another, and
/// in a container freshly mounted over the network each cold directory or inode-table block
/// is a round trip (ext4 -> dm-crypt -> loop -> sshfs -> SSH). Parallel walkers keep several
/// of those in flight. Best effort: errors are ignored (rsync reports what matters), and a
/// pending signal stops the walk. Returns the number of entries examined.
pub fn prefetch_metadata(dir: &Path, threads: usize) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let seen = AtomicUsize::new(0);
    walk_parallel(
        vec![dir.to_path_buf()],
        threads,
        || crate::signals::pending().is_some(),
        |e, t| {
            seen.fetch_add(1, Ordering::Relaxed);
            if !t.is_some_and(|t| t.is_dir()) {
                // lstat: reads the inode (its block of the inode table).
                drop(e.metadata());
            }
        },
    );
    seen.into_inner()
}

/// `threads` walkers sharing one queue of directories, from `roots` down: each directory's
/// entries in name order (the order rsync goes in), every entry handed to `visit` with its
/// type, and every directory among them queued. Ends when the queue is empty and no walker
/// is busy, or as soon as `halt` says so. What [`prefetch_metadata`] and [`ReadAhead`] walk
/// with; errors are skipped (both are best effort).
fn walk_parallel(
    roots: Vec<PathBuf>,
    threads: usize,
    halt: impl Fn() -> bool + Sync,
    visit: impl Fn(&std::fs::DirEntry, Option<std::fs::FileType>) + Sync,
) {
    use std::sync::{Condvar, Mutex};
    struct Queue {
        dirs: Vec<PathBuf>,
        busy: usize,
    }
    // Popped from the end: the first name comes next.
    let dirs = roots.into_iter().rev().collect();
    let q = (Mutex::new(Queue { dirs, busy: 0 }), Condvar::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let (m, cv) = &q;
                let next = {
                    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        if halt() {
                            g.dirs.clear();
                        }
                        if let Some(d) = g.dirs.pop() {
                            g.busy += 1;
                            break d;
                        }
                        if g.busy == 0 {
                            cv.notify_all();
                            return;
                        }
                        g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                };
                let mut entries: Vec<_> = std::fs::read_dir(&next)
                    .map(|rd| rd.flatten().collect())
                    .unwrap_or_default();
                entries.sort_by_key(|e| e.file_name());
                let mut found = Vec::new();
                for e in entries {
                    if halt() {
                        break;
                    }
                    let t = e.file_type().ok();
                    visit(&e, t);
                    if t.is_some_and(|t| t.is_dir()) {
                        found.push(e.path());
                    }
                }
                let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                g.busy -= 1;
                g.dirs.extend(found.into_iter().rev());
                cv.notify_all();
            });
        }
    });
}

/// The regular files of the trees at `roots` (a root may be a file itself), walked by
/// `threads` walkers in name order ([`walk_parallel`]): each is handed to `file` with its
/// position (the sizes of the files handed out before it, roughly in the order rsync copies
/// them) and its size, and every other entry that is not a directory to `other`. What
/// [`read_ahead`] and [`warm_snapshot`] walk with; stops on `halt`. Returns the sizes
/// handed out, in all.
fn files_within(
    roots: &[PathBuf],
    threads: usize,
    halt: impl Fn() -> bool + Sync,
    file: impl Fn(&Path, u64, u64) + Sync,
    other: impl Fn(&std::fs::DirEntry) + Sync,
) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    let handed = AtomicU64::new(0);
    let within = |p: &Path, len: u64| file(p, handed.fetch_add(len, Ordering::Relaxed), len);
    let mut dirs = Vec::new();
    for r in roots {
        match std::fs::symlink_metadata(r) {
            Ok(m) if m.is_dir() => dirs.push(r.clone()),
            Ok(m) if m.is_file() => within(r, m.len()),
            _ => {}
        }
    }
    walk_parallel(dirs, threads, halt, |e, t| match t {
        Some(t) if t.is_dir() => {}
        Some(t) if t.is_file() => {
            if let Ok(md) = e.metadata() {
                within(&e.path(), md.len());
            }
        }
        _ => other(e),
    });
    handed.into_inner()
}

/// How far restore's read-aheads may run ahead of its rsync. Everything read ahead waits in
/// memory until rsync copies it; read too far ahead it is reclaimed first (memory pressure,
/// or a proactive reclaim such as DAMON's, which pages out what has not been touched for a
/// while) and then read again, one small request at a time. So the bulk read of the
/// container and the readers of the files both stay within a window of rsync's progress,
/// and run while rsync copies instead of before it. Positions are bytes of file data in the
/// order the walks meet the files, which is roughly the order rsync copies them in.
pub struct Pace {
    window: u64,
    /// File bytes rsync has copied so far (its `--info=progress2` reports).
    copied: std::sync::atomic::AtomicU64,
    /// File bytes whose container ranges the bulk read has read; `u64::MAX` without one, or
    /// once it is done.
    primed: std::sync::atomic::AtomicU64,
    /// Set when rsync has ended: nothing waits any more.
    over: std::sync::atomic::AtomicBool,
}

/// The most restore reads ahead of rsync: 128 MiB, or a quarter of the free memory if that
/// is less (but at least 8 MiB).
fn restore_window() -> u64 {
    let m = mem_available().map_or(0, |m| m / 4);
    m.clamp(8 << 20, 128 << 20)
}

impl Pace {
    /// A pace of `window` bytes; `bulk` says whether a bulk read will report what it primed.
    pub fn new(window: u64, bulk: bool) -> Pace {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        Pace {
            window,
            copied: AtomicU64::new(0),
            primed: AtomicU64::new(if bulk { 0 } else { u64::MAX }),
            over: AtomicBool::new(false),
        }
    }

    /// No pacing at all: everything may be read at once.
    pub fn unbounded() -> Pace {
        Pace::new(u64::MAX, false)
    }

    fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
        a.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// rsync has copied `bytes` of file data.
    pub fn copied(&self, bytes: u64) {
        self.copied
            .fetch_max(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The bulk read has primed the file data up to `bytes` (or all of it: `u64::MAX`).
    fn primed(&self, bytes: u64) {
        self.primed
            .fetch_max(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// rsync has ended.
    pub fn finish(&self) {
        self.over.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Wait until the file data at `at` is within the window of rsync's progress, and with
    /// `primed`, until the bulk read has read it too. `false` when rsync has ended or `halt`
    /// says so (read nothing more).
    fn wait(&self, at: u64, primed: bool, halt: &impl Fn() -> bool) -> bool {
        loop {
            if self.over.load(std::sync::atomic::Ordering::Relaxed) || halt() {
                return false;
            }
            if self.ready(at, primed) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Whether the file data at `at` may be read now ([`Pace::wait`]).
    fn ready(&self, at: u64, primed: bool) -> bool {
        at.saturating_sub(Pace::load(&self.copied)) <= self.window
            && (!primed || at < Pace::load(&self.primed))
    }
}

/// Copy a snapshot (or only `paths` in it, absolute as backed up) into `target` with rsync:
/// what `restore` does once the snapshot is mounted and chosen. While rsync copies, the
/// files are read ahead of it by several threads ([`read_ahead`]), and with `warm` their
/// data is first read from the server in bulk ([`warm_snapshot`]), both within a window of
/// rsync's progress ([`Pace`]). rsync's progress is shown as a backup's is.
pub fn copy_out(snap: &Path, paths: &[PathBuf], target: &Path, warm: Option<&Warm>) -> Result<()> {
    let mut c = Cmd::new("rsync")?.args([
        "-aHAX",
        "--sparse",
        "--numeric-ids",
        "--stats",
        "--info=progress2",
    ]);
    if paths.is_empty() {
        c = c.arg(format!("{}/", snap.display()));
    } else {
        c = c.arg("--relative");
        for q in paths {
            // "/./" marks where --relative starts the path it recreates under TARGET.
            c = c.arg(format!("{}/.{}", snap.display(), q.display()));
        }
    }
    let c = c.arg(format!("{}/", target.display()));
    let roots = roots_of(snap, paths);
    let pace = Pace::new(restore_window(), warm.is_some());
    let mut meter = crate::progress::Meter::new(std::time::Duration::from_secs(60));
    let done = std::thread::scope(|s| {
        let bulk = warm.map(|w| {
            s.spawn(|| {
                let t = std::time::Instant::now();
                let r = warm_snapshot(&roots, w, &pace);
                pace.primed(u64::MAX);
                (r, t.elapsed())
            })
        });
        let reader = s.spawn(|| read_ahead(&roots, READAHEAD_THREADS, &pace, &|| false));
        let done = c.run_streaming(|line| match crate::progress::parse(line) {
            Some(r) => {
                pace.copied(r.bytes);
                meter.update(r);
                false
            }
            None => true,
        });
        pace.finish();
        if let Some(Ok((r, took))) = bulk.map(|b| b.join()) {
            info!(
                "read {} files ({} MiB) ahead from the server in bulk, {:.1} s alongside the copy",
                r.files,
                r.bytes >> 20,
                took.as_secs_f64()
            );
            crate::debug!("bulk read-ahead: {r:?}");
        }
        if let Ok((files, bytes)) = reader.join() {
            crate::debug!("read ahead {files} files, {bytes} bytes");
        }
        done
    });
    meter.finish();
    done?;
    Ok(())
}

/// The snapshot directory `snap`, or the absolute `paths` (as backed up) inside it.
fn roots_of(snap: &Path, paths: &[PathBuf]) -> Vec<PathBuf> {
    if paths.is_empty() {
        vec![snap.to_path_buf()]
    } else {
        paths
            .iter()
            .map(|q| snap.join(q.strip_prefix("/").unwrap_or(q)))
            .collect()
    }
}

/// What reading a snapshot's file data in bulk needs, below the encryption: the container
/// file, opened read-only through sshfs (a read-only loop device is buffered and reads
/// through that file's page cache: [`crate::stack::loopdev`]), where the filesystem's bytes
/// start in it (the LUKS data offset), the filesystem's device (for its metadata), and the
/// snapshot's creation time (its directories are no older).
pub struct Warm {
    pub container: std::fs::File,
    pub offset: u64,
    pub device: PathBuf,
    pub since: u64,
}

/// What [`warm_snapshot`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Warmed {
    /// Files whose data was read.
    pub files: usize,
    /// Bytes of those files.
    pub bytes: u64,
    /// Read requests issued on the container file (at most [`crate::fsutil::BULK_CHUNK`] each).
    pub reads: usize,
}

/// Read the file data of the trees at `roots` (inside the filesystem on `w.device`) straight
/// from the container file, in large parallel reads, so that restore's rsync, reading one
/// small file after another, finds them in the page cache instead of paying a round trip
/// each. First the snapshot's metadata ([`crate::stack::ext4::read_metadata`]), then every
/// regular file's extents (FS_IOC_FIEMAP, walked in rsync's order), a batch at a time: each
/// batch sorted by place in the container, merged across small gaps and read once `pace`
/// lets it. Best effort: errors are skipped, a pending signal stops it; extents that point
/// outside the container are left out.
pub fn warm_snapshot(roots: &[PathBuf], w: &Warm, pace: &Pace) -> Warmed {
    use std::os::unix::fs::OpenOptionsExt;
    let halt = || crate::signals::pending().is_some();
    let beneath = crate::fsutil::Beneath {
        file: &w.container,
        offset: w.offset,
    };
    read_metadata_ahead(&w.device, || Some(w.since), Some(&beneath), &pace.over);
    // Batches of a few MiB: enough for near extents to merge into large reads, small
    // enough that the readers behind (rsync's and `read_ahead`'s) follow closely.
    let batch = (pace.window / 4).clamp(1 << 20, 4 << 20);
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<(u64, u64)>)>(1024);
    // Owns the sender: the channel closes when the walk (and with it `take`) is done.
    let take = move |p: &Path, _at: u64, len: u64| {
        if len == 0 {
            return;
        }
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(p)
        else {
            return;
        };
        if let Ok(extents) = crate::stack::ext4::file_extents(&f, len) {
            let _ = tx.send((len, extents));
        }
    };
    let mut warmed = Warmed::default();
    std::thread::scope(|s| {
        let walk = s.spawn(|| {
            let stop = || halt() || pace.over.load(std::sync::atomic::Ordering::Relaxed);
            files_within(roots, READAHEAD_THREADS, stop, take, |_| {});
        });
        // The next batch of extents in the walk's order, once the pace lets it be read.
        // When it is asked for, the batch before is queued for reading: count it primed.
        let (mut at, mut queued) = (0u64, 0u64);
        let mut files = rx.iter();
        let next = || {
            pace.primed(queued);
            at = queued;
            let (mut ranges, mut any) = (Vec::new(), false);
            for (len, extents) in files.by_ref() {
                any = true;
                ranges.extend(extents);
                warmed.files += 1;
                queued += len;
                if queued - at >= batch {
                    break;
                }
            }
            (any && pace.wait(at, false, &halt)).then_some(ranges)
        };
        warmed.reads = beneath.prime_batches(READAHEAD_THREADS, &halt, next);
        warmed.bytes = queued;
        // Whatever is still queued is dropped with the receiver; the walk then ends.
        drop(rx);
        let _ = walk.join();
    });
    warmed
}

/// Threads that read a snapshot's files ahead of restore's rsync.
const READAHEAD_THREADS: usize = 8;

/// Read the files of the trees at `roots` into the page cache with `threads` threads while
/// `restore`'s rsync copies them. rsync reads one file after another, and in a container
/// mounted over the network every small file is at least one round trip (ext4 -> dm-crypt
/// -> loop -> sshfs -> SSH) that read-ahead on the mapping cannot hide; parallel readers
/// keep several in flight (and decrypt on every core), so rsync finds most files in memory.
/// Each file is read once `pace` has it within rsync's window and, with a bulk read, once
/// that has read it; everything else has its inode read. Best effort: errors are ignored
/// (rsync reports what matters); a pending signal or `halt` stops it. Returns the files
/// read and their bytes.
fn read_ahead(
    roots: &[PathBuf],
    threads: usize,
    pace: &Pace,
    halt: &(impl Fn() -> bool + Sync),
) -> (usize, u64) {
    use std::io::Read;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    let files = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let halt = || halt() || crate::signals::pending().is_some();
    let read_file = |p: &Path, at: u64, _len: u64| {
        if !pace.wait(at, true, &halt) {
            return;
        }
        let Ok(mut f) = std::fs::File::open(p) else {
            return;
        };
        let mut buf = vec![0u8; 128 << 10];
        let mut n = 0u64;
        while !halt() {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        files.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(n, Ordering::Relaxed);
    };
    let stop = || halt() || pace.over.load(Ordering::Relaxed);
    files_within(roots, threads, stop, read_file, |e| drop(e.metadata()));
    (files.into_inner(), bytes.into_inner())
}

/// The id of a new snapshot taken at `now`, given the `existing` ones (oldest first), and
/// the snapshot to hard-link unchanged files to.
///
/// The id is the clock's time, bumped only past an id that exists (two runs within one
/// second). It is not bumped past the newest snapshot: after one run with a clock years
/// ahead, every later id would otherwise be "newest + 1", dated in that future for good
/// (retention stops while the newest is in the future, see retention::future). So after a
/// clock jump back, ids are no longer in the order the runs happened; the previous snapshot
/// is then the newest one not after `now` (the last run before the jump is the one taken
/// last by any clock that only jumped once), or the newest if all are later.
pub fn new_id(existing: &[SnapshotId], now: SnapshotId) -> (SnapshotId, Option<SnapshotId>) {
    let mut id = now;
    while existing.binary_search(&id).is_ok() {
        id = SnapshotId::from_unix(id.unix() + 1);
    }
    let prev = existing
        .iter()
        .rev()
        .find(|e| **e < id)
        .or(existing.last())
        .copied();
    (id, prev)
}

/// Threads that read the container's metadata ahead ([`crate::stack::ext4::read_metadata`]).
const METADATA_THREADS: usize = 8;

/// The most a metadata read-ahead reads: a quarter of the free memory, at most 1 GiB.
fn metadata_budget() -> u64 {
    mem_available().map_or(0, |m| m / 4).min(1 << 30)
}

/// The container's metadata read ahead ([`crate::stack::ext4::read_metadata`]) within
/// [`metadata_budget`], the directories of those created since what `since` returns;
/// stopped by a pending signal or `stop`; best effort, what it did in a debug line.
fn read_metadata_ahead(
    device: &Path,
    since: impl FnOnce() -> Option<u64>,
    beneath: Option<&crate::fsutil::Beneath>,
    stop: &std::sync::atomic::AtomicBool,
) {
    let t = std::time::Instant::now();
    match crate::stack::ext4::read_metadata(
        device,
        since,
        metadata_budget(),
        METADATA_THREADS,
        beneath,
        || stop.load(std::sync::atomic::Ordering::Relaxed) || crate::signals::pending().is_some(),
    ) {
        Ok(r) => crate::debug!(
            "metadata read ahead from {}: {} KiB of inode tables and bitmaps, {} KiB of directories, {} reads, {:.2} s",
            device.display(),
            r.table_bytes >> 10,
            r.directory_bytes >> 10,
            r.reads,
            t.elapsed().as_secs_f64()
        ),
        Err(e) => crate::debug!("metadata read-ahead skipped: {e:#}"),
    }
}

/// [`take`]'s metadata read-ahead, on a thread of its own from `take`'s first step: the
/// inode tables and bitmaps are read while `take` lists the snapshots and makes its
/// directory (cold reads of their own, one round trip each), and the previous snapshot's
/// directories once [`MetadataAhead::finish`] names its time. Dropped unfinished (an error
/// on the way) it stops and is joined: its open device would keep the teardown from
/// closing the mapping.
struct MetadataAhead {
    since: Option<std::sync::mpsc::Sender<Option<u64>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl MetadataAhead {
    fn start(device: &Path) -> MetadataAhead {
        let (tx, rx) = std::sync::mpsc::channel::<Option<u64>>();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let device = device.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("metadata-ahead".into())
            .spawn(move || read_metadata_ahead(&device, || rx.recv().ok().flatten(), None, &flag))
            .ok();
        MetadataAhead {
            since: Some(tx),
            stop,
            handle,
        }
    }

    /// Read the directories of those created at or after `since` (none for `None`), and
    /// wait for the read-ahead to end.
    fn finish(mut self, since: Option<u64>) {
        if let Some(tx) = self.since.take() {
            let _ = tx.send(since);
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for MetadataAhead {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            self.since.take();
            let _ = h.join();
        }
    }
}

/// While rsync copies, its file data is written to the server every this many bytes of
/// progress. Left to the kernel, nothing is written before the final syncfs: the dirty
/// limits are a share of the client's memory (10 % of it before background writeback
/// starts), and the dirty pages only expire after 30 s. So the network sat idle while rsync
/// copied and rsync sat idle while the network wrote. Measured on the host tier (20000 files,
/// 83 MiB, 25 ms each way; docs/benchmarks.md run 8), the full backup's step took
/// 8.3-8.5 s without this, half of it in the final syncfs; 7.4-7.5 s with a syncfs every
/// 4 MiB (1 MiB: 7.8, 8 MiB: 7.5-7.7). A syncfs every 0.5 s instead took 7.1-7.2 s, but
/// made the no-change run, which copies no data, slower (3.4-3.6 -> 3.8-3.9 s: each syncfs
/// forces a journal commit), so the syncs follow the bytes copied, not the clock.
const WRITE_BEHIND_EVERY: u64 = 4 << 20;

/// The write-behind thread of [`take`]: `flush` (a syncfs of the container) whenever rsync's
/// progress (bytes copied, newest first: reports that queued up while a flush ran count as
/// one) has grown by [`WRITE_BEHIND_EVERY`] since the last flush, until `progress` closes.
/// An error ends it quietly: the syncfs after rsync reports it. Returns the flushes made.
fn write_behind(
    progress: std::sync::mpsc::Receiver<u64>,
    mut flush: impl FnMut() -> Result<()>,
) -> usize {
    let (mut written, mut flushes) = (0, 0);
    while let Ok(mut copied) = progress.recv() {
        while let Ok(later) = progress.try_recv() {
            copied = later;
        }
        if copied >= written + WRITE_BEHIND_EVERY {
            if let Err(e) = flush() {
                crate::debug!("write-behind stopped: {e:#}");
                break;
            }
            (written, flushes) = (copied, flushes + 1);
        }
    }
    flushes
}

/// A file rsync named is retried this many times (once per later name) while it is not
/// yet in place, and at most this many such names wait: the rest are hashed by
/// `manifest::build`, as they were before.
const HASH_RETRIES: u32 = 256;
const HASH_WAITING: usize = 1024;

/// The hash-behind thread of [`take`]: hashes each file rsync names (below `dest`) into
/// `fresh` right after rsync wrote it, while its data is still in memory. rsync names a
/// file just before it renames it into place, so a name not there yet is tried again after
/// the next one, and once more when `names` closes.
fn hash_behind(names: std::sync::mpsc::Receiver<PathBuf>, dest: &Path) -> crate::manifest::Fresh {
    use crate::manifest::Hashed;
    let mut fresh = crate::manifest::Fresh::default();
    let mut waiting = std::collections::VecDeque::new();
    while let Ok(p) = names.recv() {
        for _ in 0..waiting.len() {
            let Some((w, tries)) = waiting.pop_front() else {
                break;
            };
            if fresh.hash(&dest.join(&w)) == Hashed::Missing && tries < HASH_RETRIES {
                waiting.push_back((w, tries + 1));
            }
        }
        if fresh.hash(&dest.join(&p)) == Hashed::Missing && waiting.len() < HASH_WAITING {
            waiting.push_back((p, 0));
        }
    }
    for (w, _) in waiting {
        fresh.hash(&dest.join(w));
    }
    fresh.seal()
}

/// Take a snapshot of the profile's sources into the mounted container at `root`, whose
/// filesystem is on `device` (for the metadata read-ahead; `None` goes without it).
pub fn take(profile: &Profile, root: &Path, device: Option<&Path>) -> Result<Taken> {
    let ahead = device.map(MetadataAhead::start);
    // The new snapshot's directories are born from now on (whole seconds, as ext4 keeps them).
    let started = SnapshotId::now().unix().max(0) as u64;
    for s in &profile.backup.sources {
        if !s.0.exists() {
            bail!("backup source {} does not exist", s.0.display());
        }
    }
    let existing = list(root)?;
    let (id, prev) = new_id(&existing, SnapshotId::now());
    let partial = root.join(PARTIAL).join(id.to_string());
    std::fs::create_dir_all(&partial)?;
    let link = prev.map(|l| path_of(root, l));
    info!(
        "snapshot {id}: rsync {} {}",
        profile
            .backup
            .sources
            .iter()
            .map(|s| s.0.display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        match &link {
            Some(l) => format!(
                "(unchanged files hard-linked to {})",
                l.file_name().unwrap_or_default().to_string_lossy()
            ),
            None => "(first snapshot: full copy)".into(),
        }
    );
    // The previous manifest's size bounds how much metadata the prefetch would pull into
    // memory; its hashes are reused below, read alongside, never held whole.
    let prev_files = match prev {
        Some(l) => crate::manifest::most_files(root, &l.to_string())?,
        None => None,
    };
    if let Some(ahead) = ahead {
        // Every inode (read meanwhile) and the previous snapshot's directories, in large
        // reads first; the walk below then finds most of what it reads in memory.
        ahead.finish(prev.map(|l| l.unix().max(0) as u64));
    }
    if let (Some(dir), Some(files)) = (&link, prev_files) {
        match mem_available() {
            Some(avail) if files * PREFETCH_BYTES_PER_FILE < avail / 2 => {
                let t = std::time::Instant::now();
                let n = prefetch_metadata(dir, PREFETCH_THREADS);
                crate::debug!("prefetched the metadata of {n} entries");
                crate::debug!(
                    "metadata of {} prefetched in {:.1} s",
                    dir.display(),
                    t.elapsed().as_secs_f64()
                );
            }
            _ => crate::debug!("metadata prefetch skipped ({files} files, memory)"),
        }
    }
    let mut meter = crate::progress::Meter::new(std::time::Duration::from_secs(60));
    let rsync = rsync_command(profile, &partial, link.as_deref())?;
    let t = std::time::Instant::now();
    let (done, fresh) = std::thread::scope(|scope| {
        // Bounded: while a syncfs waits on a slow server, rsync's reports (one per file) are
        // dropped rather than queued; the next one that fits carries the newer count.
        let (copied, progress) = std::sync::mpsc::sync_channel(64);
        scope.spawn(|| write_behind(progress, || mount::syncfs(root)));
        // Bounded too, and never waited on: a name dropped here is hashed by the manifest.
        let (wrote_tx, names) = std::sync::mpsc::sync_channel(4096);
        let hasher = scope.spawn(|| hash_behind(names, &partial));
        let done = rsync.run_streaming(|line| {
            if let Some(r) = crate::progress::parse(line) {
                let _ = copied.try_send(r.bytes);
                meter.update(r);
                return false;
            }
            if line.starts_with(WROTE) {
                if let Some(p) = wrote(line) {
                    let _ = wrote_tx.try_send(p);
                }
                return false;
            }
            true
        });
        drop((copied, wrote_tx));
        (done, hasher.join())
    });
    meter.finish();
    let done = done?;
    let fresh = fresh.unwrap_or_else(|_| {
        crate::debug!("the hash-behind thread panicked; every new file is hashed after rsync");
        Default::default()
    });
    crate::debug!(
        "rsync took {:.2} s; {} files hashed as it wrote them",
        t.elapsed().as_secs_f64(),
        fresh.len()
    );
    if let Some(device) = device {
        // The manifest walks the new snapshot. Its directories were written while rsync ran
        // and are clean since the write-behind's syncs, so reclaim may already have taken
        // them; each would come back in a round trip of its own (at 100000 files, 25 ms
        // each way: 7-39 s of the manifest's time, against 0.8 s with them in memory). So
        // they are read again in bulk first; what is still in memory costs a copy.
        let unstopped = std::sync::atomic::AtomicBool::new(false);
        read_metadata_ahead(device, || Some(started), None, &unstopped);
    }
    let t = std::time::Instant::now();
    let taken = Taken {
        id: id.to_string(),
        vanished_files: done.code == 24,
        files_transferred: stat_number(&done.stdout, "Number of regular files transferred"),
        bytes_transferred: stat_number(&done.stdout, "Total transferred file size"),
        link_dest: prev.map(|l| l.to_string()),
    };
    if taken.vanished_files {
        warn!("some files vanished while rsync copied them (rsync exit 24); the snapshot is committed");
    }
    // The manifest (content hashes for `verify`) is written before the snapshot is visible,
    // so every complete snapshot has one.
    let prev_manifest = match prev {
        Some(l) => crate::manifest::open(root, &l.to_string())?,
        None => None,
    };
    let prev_id = prev.map(|l| l.to_string());
    let manifest = crate::manifest::write(
        root,
        &id.to_string(),
        &partial,
        match (link.as_deref(), prev_id.as_deref(), prev_manifest) {
            (Some(l), Some(pid), Some(r)) => Some((l, pid, r)),
            _ => None,
        },
        &fresh,
    )?;
    drop(fresh);
    crate::debug!(
        "manifest of {} files {} in {:.2} s",
        manifest.files,
        if manifest.is_previous() {
            "built: the previous one again, linked"
        } else {
            "written"
        },
        t.elapsed().as_secs_f64()
    );
    let t = std::time::Instant::now();
    // Data first (the snapshot's files and its manifest, one sync), then the renames that
    // make them visible (the manifest first: a snapshot never lacks one). Under
    // data=ordered with delayed allocation a rename can reach the disk before the data it
    // names is even allocated: hence this sync. The renames themselves are made durable by
    // the generation commit that follows (`Session::commit_generation`): its fsync commits
    // the journal transaction they are in, and jbd2 commits transactions in order, so
    // nothing done after them (prune's removals) can reach the disk without them. One
    // journal commit, a few round trips to the server, less than a sync of its own.
    mount::syncfs(root)?;
    crate::signals::check()?;
    manifest.publish()?;
    let fin = path_of(root, id);
    std::fs::rename(&partial, &fin)
        .with_context(|| format!("committing {} as {}", partial.display(), fin.display()))?;
    crate::debug!("synced and renamed in {:.2} s", t.elapsed().as_secs_f64());
    Ok(taken)
}

impl Taken {
    /// Say that the snapshot is committed: once it is durable, after the generation commit.
    pub fn report_committed(&self) {
        let n = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_else(|| "?".into());
        info!(
            "snapshot {} committed ({} files, {} bytes transferred)",
            self.id,
            n(self.files_transferred),
            n(self.bytes_transferred)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_behind_follows_the_bytes_copied() {
        use std::sync::mpsc::channel;
        const M: u64 = 1 << 20;
        // No data copied (a no-change run reports 0 bytes throughout): never a flush.
        let (tx, rx) = channel();
        (0..1000).for_each(|_| tx.send(0).unwrap());
        drop(tx);
        assert_eq!(
            write_behind(rx, || panic!("flushed with nothing copied")),
            0
        );
        // Reports that queued up while a flush ran count as the newest one.
        let (tx, rx) = channel();
        for b in [M, 3 * M, WRITE_BEHIND_EVERY + M, 60 * M] {
            tx.send(b).unwrap();
        }
        drop(tx);
        assert_eq!(write_behind(rx, || Ok(())), 1);
        // One report at a time: a flush each time WRITE_BEHIND_EVERY more was copied.
        let (tx, rx) = channel();
        let feeder = std::thread::spawn(move || {
            for i in 1..=40 {
                tx.send(i * M).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        let seen = std::sync::Mutex::new(0);
        let n = write_behind(rx, || {
            *seen.lock().unwrap() += 1;
            Ok(())
        });
        feeder.join().unwrap();
        assert!(
            n >= 1 && n as u64 <= 40 * M / WRITE_BEHIND_EVERY,
            "{n} flushes"
        );
        assert_eq!(n, *seen.lock().unwrap());
        // A failed flush ends it; the rest of the progress is not waited for.
        let (tx, rx) = channel();
        tx.send(100 * M).unwrap();
        let n = write_behind(rx, || anyhow::bail!("EIO"));
        assert_eq!(n, 0);
        assert!(
            tx.send(200 * M).is_err(),
            "the receiver is gone once it stopped"
        );
    }

    #[test]
    fn rsync_names_decode_exactly_and_stay_below_the_destination() {
        let w = |l: &str| wrote(l).map(|p| p.into_os_string().into_vec());
        assert_eq!(w("e2ebackup-wrote:3:/src/a/x"), Some(b"src/a/x".to_vec()));
        assert_eq!(w("e2ebackup-wrote:3:a:b"), Some(b"a:b".to_vec()));
        assert_eq!(
            w("e2ebackup-wrote:1:new\\#012line"),
            Some(b"new\nline".to_vec())
        );
        assert_eq!(w("e2ebackup-wrote:1:caf\\#351"), Some(b"caf\xe9".to_vec()));
        // A literal backslash-hash is itself escaped; a bad escape is taken as it stands.
        assert_eq!(
            w("e2ebackup-wrote:0:b\\#134#056c"),
            Some(b"b\\#056c".to_vec())
        );
        assert_eq!(w("e2ebackup-wrote:0:b\\#9x"), Some(b"b\\#9x".to_vec()));
        for other in [
            "e2ebackup-wrote:0:/src/a/",
            "e2ebackup-wrote:0:/",
            "e2ebackup-wrote:0:/src/../../etc/shadow",
            "e2ebackup-wrote:0:\\#056\\#056/etc/shadow",
            "e2ebackup-wrote:0:a/\\#056/b",
            "e2ebackup-wrote:0:x\\#777",
            "e2ebackup-wrote:nocolon",
            "      1,234  45%   12.34MB/s    0:00:12 (xfr#12, to-chk=100/2000)",
        ] {
            assert_eq!(w(other), None, "{other}");
        }
    }

    /// rsync's own names, with the argv `take` gives it, for files whose names need
    /// escaping: each one decodes to the file rsync wrote, and `hash_behind` hashes it.
    #[test]
    fn every_file_rsync_names_is_hashed_as_written() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let dest = d.path().join("dest");
        std::fs::create_dir_all(src.join("sub dir")).unwrap();
        std::fs::create_dir(&dest).unwrap();
        let names: [&[u8]; 7] = [
            b"plain",
            b"new\nline",
            b"latin1-\xe9t\xe9",
            b"back\\#056slash",
            b"tab\tand:colon",
            b"sub dir/inner",
            b"sub dir/\\",
        ];
        for (i, n) in names.iter().enumerate() {
            let p = src.join(std::ffi::OsStr::from_bytes(n));
            std::fs::write(&p, format!("content {i}").repeat(i + 1)).unwrap();
        }
        std::os::unix::fs::symlink("plain", src.join("link")).unwrap();
        nix::unistd::mkfifo(&src.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let profile = crate::profile::Profile::parse(
            Path::new("t.yaml"),
            &format!(
                "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}}\n\
                 container: {{file: c.luks, size: 1G, keyfile: /key}}\n\
                 backup: {{sources: ['{}']}}\n",
                src.display()
            ),
        )
        .unwrap();
        let rsync = rsync_command_for(&profile, &dest, None, &[]).unwrap();
        let (tx, names_rx) = std::sync::mpsc::channel();
        let fresh = std::thread::scope(|scope| {
            let hasher = scope.spawn(|| hash_behind(names_rx, &dest));
            let mut seen = 0;
            rsync
                .run_streaming(|line| {
                    if let Some(p) = wrote(line) {
                        seen += 1;
                        tx.send(p).unwrap();
                    }
                    true
                })
                .unwrap();
            drop(tx);
            assert!(seen >= names.len(), "rsync named {seen} items");
            hasher.join().unwrap()
        });
        assert_eq!(fresh.len(), names.len(), "every regular file, nothing else");
        let copy = dest.join(src.strip_prefix("/").unwrap());
        let mut out = Vec::new();
        crate::manifest::build::<&[u8]>(&copy, None, &fresh, &mut out).unwrap();
        let mut none = Vec::new();
        crate::manifest::build::<&[u8]>(&copy, None, &Default::default(), &mut none).unwrap();
        assert_eq!(
            out, none,
            "the hashes taken as rsync wrote equal those read afterwards"
        );
    }

    #[test]
    fn prefetch_walks_a_whole_tree_and_returns() {
        // A tree wider than the thread count, deeper than one level, with a file where a
        // directory could be and a dangling symlink: every thread must finish.
        let d = tempfile::tempdir().unwrap();
        for a in 0..12 {
            let sub = d.path().join(format!("a{a}/b/c"));
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::write(sub.join("f"), b"x").unwrap();
            std::os::unix::fs::symlink("/nonexistent", sub.join("dangling")).unwrap();
        }
        // Per top-level entry: a{a}, b, c, f and dangling = 5 entries.
        for threads in [0, 1, 3, 32] {
            assert_eq!(
                prefetch_metadata(d.path(), threads),
                12 * 5,
                "{threads} threads"
            );
        }
        assert_eq!(prefetch_metadata(&d.path().join("missing"), 4), 0);
    }

    #[test]
    fn read_ahead_reads_every_file_and_keeps_to_the_pace() {
        let d = tempfile::tempdir().unwrap();
        for a in 0..10 {
            let sub = d.path().join(format!("a{a}/b"));
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::write(sub.join("f"), vec![7u8; 1000]).unwrap();
            std::fs::write(sub.join("g"), vec![7u8; 300 << 10]).unwrap();
            std::os::unix::fs::symlink("/nonexistent", sub.join("dangling")).unwrap();
        }
        let never = || false;
        let all = 10 * (1000 + (300 << 10));
        let root = vec![d.path().to_path_buf()];
        for threads in [0, 1, 3, 32] {
            let got = read_ahead(&root, threads, &Pace::unbounded(), &never);
            assert_eq!(got, (20, all), "{threads} threads");
        }
        // Files and directories as roots, and a root that is missing.
        let roots = vec![
            d.path().join("a0/b/f"),
            d.path().join("a1"),
            d.path().join("missing"),
        ];
        assert_eq!(
            read_ahead(&roots, 4, &Pace::unbounded(), &never),
            (3, 2000 + (300 << 10))
        );
        // Nothing copied yet and no window: only the file at position 0 may be read, the
        // rest wait until rsync ends (then they are left).
        let pace = Pace::new(0, false);
        let (n, b) = std::thread::scope(|s| {
            let r = s.spawn(|| read_ahead(&root, 4, &pace, &never));
            std::thread::sleep(std::time::Duration::from_millis(300));
            pace.finish();
            r.join().unwrap()
        });
        assert!(
            n <= 1 && b <= 300 << 10,
            "{n} files, {b} bytes read ahead of rsync"
        );
        // As rsync's progress moves on, the readers follow it to the end.
        let pace = Pace::new(0, false);
        let got = std::thread::scope(|s| {
            let r = s.spawn(|| read_ahead(&root, 4, &pace, &never));
            for k in 1..=10 {
                std::thread::sleep(std::time::Duration::from_millis(20));
                pace.copied(all * k / 10);
            }
            r.join().unwrap()
        });
        assert_eq!(got, (20, all));
        // Stopped before it starts: nothing is read.
        assert_eq!(read_ahead(&root, 4, &Pace::unbounded(), &|| true).1, 0);
    }

    #[test]
    fn the_pace_keeps_reads_within_the_window_and_behind_the_bulk_read() {
        let p = Pace::new(100, true);
        assert!(p.ready(0, false) && p.ready(100, false) && !p.ready(101, false));
        // With a bulk read, a file waits until that has read it.
        assert!(!p.ready(0, true));
        p.primed(60);
        assert!(p.ready(59, true) && !p.ready(60, true));
        p.copied(1000);
        p.copied(10); // reports only move forward
        assert!(p.ready(1100, false) && !p.ready(1101, false) && !p.ready(1100, true));
        p.primed(u64::MAX);
        assert!(p.ready(1100, true));
        // Without a bulk read nothing waits for one; unbounded nothing waits at all.
        assert!(Pace::new(0, false).ready(0, true));
        assert!(Pace::unbounded().ready(u64::MAX - 1, true));
        // Once rsync has ended, or on halt, waiting says stop.
        assert!(!p.wait(0, false, &|| true));
        p.finish();
        assert!(!p.wait(0, false, &|| false));
    }

    #[test]
    fn new_ids_follow_the_clock_not_a_future_snapshot() {
        let i = |s: &str| s.parse::<SnapshotId>().unwrap();
        let none: [SnapshotId; 0] = [];
        assert_eq!(
            new_id(&none, i("20260101T000000Z")),
            (i("20260101T000000Z"), None)
        );
        let ex = [i("20260101T000000Z"), i("20260102T000000Z")];
        assert_eq!(
            new_id(&ex, i("20260103T000000Z")),
            (i("20260103T000000Z"), Some(i("20260102T000000Z")))
        );
        // Same second as an existing one: bumped, linked to the one it collided with.
        assert_eq!(
            new_id(&ex, i("20260102T000000Z")),
            (i("20260102T000001Z"), Some(i("20260102T000000Z")))
        );
        // A snapshot ten years ahead, clock back: the id is the clock's, not 2036 + 1 s,
        // and unchanged files link to the newest snapshot before it.
        let ex = [
            i("20260101T000000Z"),
            i("20260102T000000Z"),
            i("20360102T000000Z"),
        ];
        assert_eq!(
            new_id(&ex, i("20260103T000000Z")),
            (i("20260103T000000Z"), Some(i("20260102T000000Z")))
        );
        // Every snapshot later than the clock: link to the newest.
        assert_eq!(
            new_id(&ex, i("20250101T000000Z")),
            (i("20250101T000000Z"), Some(i("20360102T000000Z")))
        );
        // Consecutive collisions.
        let ex = [i("20260101T000000Z"), i("20260101T000001Z")];
        assert_eq!(new_id(&ex, i("20260101T000000Z")).0, i("20260101T000002Z"));
    }

    #[test]
    fn parses_rsync_stats() {
        let s = "Number of files: 1,234 (reg: 1,000, dir: 234)\nNumber of regular files transferred: 1,017\nTotal file size: 9,999 bytes\nTotal transferred file size: 12,345,678 bytes\n";
        assert_eq!(
            stat_number(s, "Number of regular files transferred"),
            Some(1017)
        );
        assert_eq!(
            stat_number(s, "Total transferred file size"),
            Some(12_345_678)
        );
        assert_eq!(stat_number(s, "Nope"), None);
    }

    /// A machine with a server mounted by a run, the container open and also shown by
    /// `e2ebackup mount` at /home/me/browse, /proc bound into a chroot under /home, a tmpfs
    /// at /tmp and a path with a space and a wildcard.
    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw
24 22 0:22 / /sys rw,nosuid shared:3 - sysfs sysfs rw
25 22 0:5 / /dev rw,nosuid shared:4 - devtmpfs udev rw
26 25 0:23 / /dev/pts rw shared:5 - devpts devpts rw
27 22 0:24 / /run rw,nosuid shared:6 - tmpfs tmpfs rw
28 22 0:25 / /tmp rw shared:7 - tmpfs tmpfs rw
40 27 0:50 / /run/e2ebackup/home/server rw shared:20 - fuse.sshfs u@h:/srv rw
41 27 254:0 / /run/e2ebackup/home/mnt rw shared:21 - ext4 /dev/mapper/e2ebackup-home rw
42 22 254:0 /snapshots /home/me/browse ro shared:21 - ext4 /dev/mapper/e2ebackup-home ro
43 22 0:21 / /home/jail/proc rw shared:2 - proc proc rw
44 22 8:2 / /home/odd\\040[dir]* rw shared:9 - tmpfs tmpfs rw
45 22 8:3 / /data rw shared:10 - ext4 /dev/sdb1 rw
";

    fn argv_excludes(sources: &str) -> Vec<String> {
        let p = crate::profile::Profile::parse(
            Path::new("/etc/e2ebackup/profiles/t.yaml"),
            &format!(
                "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}}\n\
                 container: {{file: c.luks, size: 1G, keyfile: /key}}\n\
                 backup: {{sources: {sources}}}\n"
            ),
        )
        .unwrap();
        let c = rsync_command_for(
            &p,
            Path::new("/m/.partial/X"),
            None,
            &mount::parse_mountinfo(MOUNTINFO),
        )
        .unwrap();
        c.argv()
            .iter()
            .filter_map(|a| a.strip_prefix("--exclude=").map(str::to_string))
            .collect()
    }

    #[test]
    fn source_root_excludes_the_run_dir_our_mounts_and_pseudo_filesystems() {
        assert_eq!(
            argv_excludes("[/]"),
            [
                "/run/e2ebackup/*",
                "/proc/*",
                "/sys/*",
                "/dev/*",
                "/run/*",
                "/tmp/*",
                "/home/me/browse/*",
                "/home/jail/proc/*",
                "/home/odd \\[dir\\]\\*/*",
            ]
        );
        // /home: only what is under it.
        assert_eq!(
            argv_excludes("[/home]"),
            [
                "/home/me/browse/*",
                "/home/jail/proc/*",
                "/home/odd \\[dir\\]\\*/*"
            ]
        );
        // Nothing of the kind under /data or /etc.
        assert!(argv_excludes("[/data, /etc]").is_empty());
        // A pseudo dir named as a source is the user's wish, but the run dir is not.
        assert_eq!(argv_excludes("[/run]"), ["/run/e2ebackup/*"]);
        assert_eq!(argv_excludes("[/tmp, /dev/shm]"), Vec::<String>::new());
        assert_eq!(argv_excludes("[/run/e2ebackup/home]"), ["/run/e2ebackup/*"]);
    }

    #[test]
    fn mountinfo_parsing() {
        use mount::parse_mountinfo;
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 13);
        assert_eq!(
            (
                m[11].target.as_path(),
                m[11].fstype.as_str(),
                m[11].source.as_str()
            ),
            (Path::new("/home/odd [dir]*"), "tmpfs", "tmpfs")
        );
        assert_eq!(m[7].fstype, "fuse.sshfs");
        assert_eq!(m[8].source, "/dev/mapper/e2ebackup-home");
        assert!(parse_mountinfo("garbage\n\n").is_empty());
        // This machine's own table parses, and / is in it.
        let own = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap());
        assert!(own.iter().any(|m| m.target == Path::new("/")));
    }

    #[test]
    fn rsync_argv() {
        let p = crate::profile::Profile::parse(
            Path::new("/etc/e2ebackup/profiles/t.yaml"),
            "server: {host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}\n\
             container: {file: c.luks, size: 1G, keyfile: /key}\n\
             backup: {sources: [/home, /etc], excludes: ['*.tmp', '/home/*/.cache'], one_file_system: true}\n",
        )
        .unwrap();
        let c = rsync_command_for(
            &p,
            Path::new("/m/.partial/X"),
            Some(Path::new("/m/snapshots/W")),
            &mount::parse_mountinfo(MOUNTINFO),
        )
        .unwrap();
        let argv = c.argv();
        assert!(argv[0].ends_with("/rsync"));
        assert_eq!(
            &argv[1..],
            &[
                "-aHAX",
                "--numeric-ids",
                "--delete",
                "--relative",
                "--stats",
                "--info=progress2",
                "--out-format=e2ebackup-wrote:%b:%n",
                "--one-file-system",
                "--link-dest=/m/snapshots/W",
                "--exclude=/home/me/browse/*",
                "--exclude=/home/jail/proc/*",
                "--exclude=/home/odd \\[dir\\]\\*/*",
                "--exclude=*.tmp",
                "--exclude=/home/*/.cache",
                "/home",
                "/etc",
                "/m/.partial/X/"
            ]
        );
    }

    #[test]
    fn layout_listing_and_partials() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        create_layout(r).unwrap();
        check_layout(r).unwrap();
        for id in ["20260101T000000Z", "20251231T235959Z"] {
            std::fs::create_dir(r.join(SNAPSHOTS).join(id)).unwrap();
        }
        std::fs::create_dir(r.join(SNAPSHOTS).join("junk")).unwrap();
        let l = list(r).unwrap();
        assert_eq!(
            l.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            ["20251231T235959Z", "20260101T000000Z"]
        );
        std::fs::create_dir_all(r.join(PARTIAL).join("20260102T000000Z/etc")).unwrap();
        // The manifest that run wrote but never put in place goes with it; the others stay.
        let manifests = r.join(crate::manifest::MANIFESTS);
        std::fs::write(manifests.join(".20260102T000000Z.tmp-4242"), b"x").unwrap();
        std::fs::write(manifests.join("20260101T000000Z"), b"kept").unwrap();
        assert_eq!(remove_partials(r).unwrap(), 1);
        assert_eq!(std::fs::read_dir(r.join(PARTIAL)).unwrap().count(), 0);
        let left: Vec<_> = std::fs::read_dir(&manifests)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["20260101T000000Z"]);
        std::fs::remove_file(r.join("FORMAT")).unwrap();
        assert!(check_layout(r).is_err());
    }
}
