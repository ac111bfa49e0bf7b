//! Taking a snapshot: rsync into `.partial/`, with its helper threads (the metadata
//! read-ahead before it, the write-behind and hash-behind alongside it), the manifest, and
//! the rename that makes it visible.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::profile::Profile;
use crate::snapid::SnapshotId;
use crate::{info, warn};

use super::guard::{self, Guard};
use super::layout::{list, new_id, path_of, PARTIAL};
use super::resume::Resumable;
use super::rsync::{complaints, over_max_size, rsync_command, stat_number, wrote, WROTE};
use super::walk::{
    mem_available, prefetch_metadata, read_metadata_ahead, PREFETCH_BYTES_PER_FILE,
    PREFETCH_THREADS,
};

/// How a snapshot went.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Taken {
    pub id: String,
    /// rsync exit 24: some files vanished while being copied (committed, with a warning).
    pub vanished_files: bool,
    pub files_transferred: Option<u64>,
    pub bytes_transferred: Option<u64>,
    pub link_dest: Option<String>,
    /// Entries rsync counted in the sources (`Number of files:`), for the next run's
    /// shrink check ([`guard::shrink`]).
    pub entries: Option<u64>,
    /// Source files rsync could not read (rsync exit 23 with only the sender's read
    /// errors, at most `backup.max_unreadable`), as rsync names them: committed, exit 3.
    pub unread: Vec<String>,
    /// Files skipped for `backup.max_file_size`, as rsync names them: committed, exit 3.
    pub skipped_large: Vec<String>,
    /// Set when this run completed an interrupted snapshot (snapshots::resume).
    pub resumed: Option<Resumed>,
}

/// The context of a snapshot that failed because the container's filesystem is full
/// (rsync: "No space left on device"): what rsync had copied, and what it still had to
/// copy by the estimate of its progress line (its percentage is of the files found so far,
/// so this can fall short; `auto_grow` grows again after the next such run).
#[derive(Debug, Clone, Copy)]
pub struct ContainerFull {
    pub copied: u64,
    pub still_needed: Option<u64>,
}

impl std::fmt::Display for ContainerFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::profile::Size;
        write!(
            f,
            "the container's filesystem is full ({} copied by this run",
            Size(self.copied)
        )?;
        if let Some(n) = self.still_needed {
            write!(f, ", about {} more needed", Size(n))?;
        }
        write!(
            f,
            "); what was copied is kept and the next run resumes it. Fix: grow the container \
             (`e2ebackup grow`, or container.auto_grow, which then grows by what is needed)"
        )
    }
}

/// What rsync still had to copy when it stopped, from its last progress line.
fn still_needed(last: Option<(u64, u8)>) -> Option<u64> {
    match last {
        Some((bytes, pct)) if (1..100).contains(&pct) => {
            Some((bytes as u128 * 100 / pct as u128) as u64 - bytes)
        }
        _ => None,
    }
}

/// What a resumed snapshot found already there.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Resumed {
    /// The id the first attempt gave it, and the runs before this one that wrote to it.
    pub first_id: String,
    pub attempts: u32,
    /// Files and bytes already there, the same as the source.
    pub files: u64,
    pub bytes: u64,
    /// The size of every file of the sources (rsync's count at the end).
    pub total_bytes: Option<u64>,
}

impl Taken {
    /// Whether the snapshot is committed with warnings (exit 3).
    pub fn has_warnings(&self) -> bool {
        self.vanished_files || !self.unread.is_empty() || !self.skipped_large.is_empty()
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
/// A failed flush ends it with that error, which fails the snapshot: the kernel reports a
/// writeback error once to each open file description (errseq), so the final syncfs on the
/// same descriptor would not see it again. Returns the flushes made.
fn write_behind(
    progress: std::sync::mpsc::Receiver<u64>,
    mut flush: impl FnMut() -> Result<()>,
) -> Result<usize> {
    let (mut written, mut flushes) = (0, 0);
    while let Ok(mut copied) = progress.recv() {
        while let Ok(later) = progress.try_recv() {
            copied = later;
        }
        if copied >= written + WRITE_BEHIND_EVERY {
            flush()?;
            (written, flushes) = (copied, flushes + 1);
        }
    }
    Ok(flushes)
}

/// A file rsync named is retried this many times (once per later name) while it is not
/// yet in place, and at most this many such names wait: the rest are hashed by
/// `manifest::build` from the source.
const HASH_RETRIES: u32 = 256;
const HASH_WAITING: usize = 1024;

/// The hash-behind thread of [`take`]: files the checksum rsync reports for each file it
/// wrote (below `dest`), computed over what it read from the source, under the inode it
/// wrote ([`crate::manifest::Fresh`]); no file is read. rsync names a file just before it
/// renames it into place, so a name not there yet is tried again after the next one, and
/// once more when `names` closes.
pub(super) fn hash_behind(
    names: std::sync::mpsc::Receiver<(PathBuf, [u8; crate::manifest::DIGEST_LEN])>,
    dest: &Path,
    mut fresh: crate::manifest::Fresh,
) -> crate::manifest::Fresh {
    use crate::manifest::Hashed;
    let mut waiting = std::collections::VecDeque::new();
    while let Ok((p, digest)) = names.recv() {
        for _ in 0..waiting.len() {
            let Some((w, d, tries)) = waiting.pop_front() else {
                break;
            };
            if fresh.record(&dest.join(&w), d) == Hashed::Missing && tries < HASH_RETRIES {
                waiting.push_back((w, d, tries + 1));
            }
        }
        if fresh.record(&dest.join(&p), digest) == Hashed::Missing && waiting.len() < HASH_WAITING {
            waiting.push_back((p, digest, 0));
        }
    }
    for (w, d, _) in waiting {
        fresh.record(&dest.join(w), d);
    }
    fresh.seal()
}

/// Take a snapshot of the profile's sources into the mounted container at `root`, whose
/// filesystem is on `device` (for the metadata read-ahead; `None` goes without it), or
/// complete the interrupted one `resume` (from [`super::resume::settle`]).
/// `committed`: the authenticated snapshots in commit order (the last one is the link target).
pub fn take(
    profile: &Profile,
    root: &Path,
    device: Option<&Path>,
    resume: Option<Resumable>,
    committed: &[SnapshotId],
) -> Result<Taken> {
    take_guarded(profile, root, device, resume, committed, &Guard::default())
}

/// [`take`], refusing (before anything is committed) what [`guard`] refuses.
pub fn take_guarded(
    profile: &Profile,
    root: &Path,
    device: Option<&Path>,
    resume: Option<Resumable>,
    committed: &[SnapshotId],
    guard: &Guard,
) -> Result<Taken> {
    // One descriptor on the container's filesystem for every syncfs of this snapshot,
    // opened before anything is written: a writeback error is reported once to each open
    // file description, so a descriptor opened per syncfs could miss one that an earlier
    // syncfs (or the kernel's own writeback) already consumed.
    let fs = std::fs::File::open(root).with_context(|| format!("opening {}", root.display()))?;
    let ahead = device.map(MetadataAhead::start);
    // The new snapshot's directories are born from now on (whole seconds, as ext4 keeps them).
    let started = SnapshotId::now().unix().max(0) as u64;
    guard::mounted(profile, &crate::stack::mount::mounts().unwrap_or_default())?;
    for s in &profile.backup.sources {
        if !s.0.exists() {
            bail!("backup source {} does not exist", s.0.display());
        }
    }
    let existing = list(root)?;
    let (id, prev) = new_id(&existing, committed, SnapshotId::now());
    let (prev_name, prev_dir) = (prev.map(|l| l.to_string()), prev.map(|l| path_of(root, l)));
    let previous = prev_name.as_deref().zip(prev_dir.as_deref());
    guard::before(profile, previous, guard)?;
    let partial = match &resume {
        Some(r) => r.dir.clone(),
        None => root.join(PARTIAL).join(id.to_string()),
    };
    std::fs::create_dir_all(&partial)?;
    super::resume::mark(profile, &partial, resume.as_ref())?;
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
    if resume.is_some() {
        info!(
            "snapshot {id} continues the interrupted {} (what is there is not sent again)",
            partial.display()
        );
    }
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
    // What earlier attempts left is checked against the sources before rsync looks at it.
    let (start_fresh, mut resumed) = match &resume {
        Some(r) => {
            let t = std::time::Instant::now();
            info!(
                "resuming an interrupted backup (snapshot {} first started; {} earlier run{}): \
                 checking what is already there against the sources",
                r.first_id,
                r.attempts,
                if r.attempts == 1 { "" } else { "s" }
            );
            let l = super::resume::check_leftovers(&partial, link.as_deref())?;
            info!(
                "resuming an interrupted backup: {} (checked in {:.1} s)",
                l.describe(),
                t.elapsed().as_secs_f64()
            );
            let resumed = Resumed {
                first_id: r.first_id.clone(),
                attempts: r.attempts,
                files: l.files,
                bytes: l.bytes,
                total_bytes: None,
            };
            (l.fresh, Some(resumed))
        }
        None => (Default::default(), None),
    };
    let mut meter = crate::progress::Meter::new(std::time::Duration::from_secs(60));
    let mut skipped_large = Vec::new();
    let rsync = rsync_command(profile, &partial, link.as_deref())?;
    let t = std::time::Instant::now();
    let mut last = None;
    let (done, fresh, behind) = std::thread::scope(|scope| {
        // Bounded: while a syncfs waits on a slow server, rsync's reports (one per file) are
        // dropped rather than queued; the next one that fits carries the newer count.
        let (copied, progress) = std::sync::mpsc::sync_channel(64);
        let writer = scope.spawn(|| write_behind(progress, || syncfs(&fs, root)));
        // Bounded too, and never waited on: a name dropped here is hashed by the manifest.
        let (wrote_tx, names) = std::sync::mpsc::sync_channel(4096);
        let hasher = scope.spawn(|| hash_behind(names, &partial, start_fresh));
        let done = rsync.run_streaming(|line| {
            if let Some(r) = crate::progress::parse(line) {
                let _ = copied.try_send(r.bytes);
                last = Some((r.bytes, r.percent));
                meter.update(r);
                return false;
            }
            if line.starts_with(WROTE) {
                if let Some((p, Some(digest))) = wrote(line) {
                    let _ = wrote_tx.try_send((p, digest));
                }
                return false;
            }
            if let Some(big) = over_max_size(line) {
                skipped_large.push(big);
                return false;
            }
            true
        });
        drop((copied, wrote_tx));
        let behind = writer
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the write-behind thread panicked")));
        (done, hasher.join(), behind)
    });
    meter.finish();
    // A write that never reached the server fails the snapshot, whatever rsync says.
    if let Err(e) = behind {
        return Err(e.context("writing to the server failed (nothing is committed)"));
    }
    // The container's filesystem ran full: say so, with what is still needed (auto_grow).
    let full = |e: anyhow::Error, said: &str| {
        if said.contains("No space left on device") {
            let (copied, _) = last.unwrap_or_default();
            let still_needed = still_needed(last);
            e.context(ContainerFull {
                copied,
                still_needed,
            })
        } else {
            e
        }
    };
    let done = done.map_err(|e| {
        let said = format!("{e:#}");
        full(e, &said)
    })?;
    let said = if done.code == 0 {
        Default::default()
    } else {
        complaints(&done.stderr)
    };
    if done.code == 23 && (!said.other.is_empty() || said.unread.is_empty()) {
        return Err(full(
            anyhow::anyhow!(
                "rsync failed with exit status 23 (some files or attributes not written into the \
                 container): {}",
                crate::cmd::tail(&done.stderr, 12)
            ),
            &done.stderr,
        ));
    }
    let max_unread = profile.backup.max_unreadable;
    if said.unread.len() as u64 > max_unread {
        bail!(
            "rsync could not read {} source files, more than backup.max_unreadable {max_unread} \
             (first: {}); nothing was committed",
            said.unread.len(),
            said.unread
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let entries = stat_number(&done.stdout, "Number of files");
    guard::shrink(profile, entries, guard)?;
    let fresh = fresh.unwrap_or_else(|_| {
        crate::debug!("the hash-behind thread panicked; every new file is hashed after rsync");
        Default::default()
    });
    crate::debug!(
        "rsync took {:.2} s; rsync's checksums of {} files kept",
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
        vanished_files: done.code == 24 || said.vanished > 0,
        files_transferred: stat_number(&done.stdout, "Number of regular files transferred"),
        bytes_transferred: stat_number(&done.stdout, "Total transferred file size"),
        link_dest: prev.map(|l| l.to_string()),
        resumed: resumed.take().map(|mut r| {
            r.total_bytes = stat_number(&done.stdout, "Total file size");
            r
        }),
        entries,
        unread: said.unread,
        skipped_large,
    };
    if let Some(r) = &taken.resumed {
        info!(
            "resumed an interrupted backup: {} of {} already there; {} sent by this run",
            crate::profile::Size(r.bytes),
            r.total_bytes
                .map(|b| crate::profile::Size(b).to_string())
                .unwrap_or_else(|| "?".into()),
            taken
                .bytes_transferred
                .map(|b| crate::profile::Size(b).to_string())
                .unwrap_or_else(|| "?".into()),
        );
    }
    if taken.vanished_files {
        warn!("some files vanished while rsync copied them (rsync exit 24); the snapshot is committed");
    }
    for f in &taken.unread {
        warn!("not read (rsync could not read it; not in this snapshot): {f}");
    }
    for f in &taken.skipped_large {
        warn!(
            "skipped, larger than backup.max_file_size {}: {f}",
            profile
                .backup
                .max_file_size
                .map(|m| m.to_string())
                .unwrap_or_default()
        );
    }
    // The manifest (content hashes for `verify` and `restore`) is written before the
    // snapshot is visible, so every complete snapshot has one.
    let prev_id = prev.map(|l| l.to_string());
    let write_manifest = |fresh: &crate::manifest::Fresh| -> Result<crate::manifest::Written> {
        let prev_manifest = match prev_id.as_deref() {
            Some(l) => crate::manifest::open(root, l)?,
            None => None,
        };
        crate::manifest::write(
            root,
            &id.to_string(),
            &partial,
            Some(Path::new("/")),
            match (link.as_deref(), prev_id.as_deref(), prev_manifest) {
                (Some(l), Some(pid), Some(r)) => Some((l, pid, r)),
                _ => None,
            },
            fresh,
        )
    };
    let mut manifest = write_manifest(&fresh)?;
    let mut fresh = fresh;
    if !manifest.merged.is_empty() {
        // --link-dest joined names that the source keeps apart (or split a group): those
        // are copied again, as the source has them, and the manifest is written anew.
        let merged = std::mem::take(&mut manifest.merged);
        manifest.discard()?;
        warn!(
            "{} file(s) were hard-linked by --link-dest unlike in the source (e.g. {}): copied again",
            merged.len(),
            merged[0].display()
        );
        let again = super::links::copy_again(profile, &partial, &merged)?;
        fresh = fresh.merge(again);
        manifest = write_manifest(&fresh)?;
        if !manifest.merged.is_empty() {
            warn!(
                "{} file(s) still do not follow the source's hard links (the source changed meanwhile?), e.g. {}",
                manifest.merged.len(),
                manifest.merged[0].display()
            );
        }
    }
    if manifest.unhashed > 0 {
        warn!(
            "{} file(s) changed in the source after rsync copied them: no hash in the manifest, verify and restore cannot check them",
            manifest.unhashed
        );
    }
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
    syncfs(&fs, root).context("writing to the server failed (nothing is committed)")?;
    crate::signals::check()?;
    manifest.publish()?;
    // The client notes the snapshot it is about to put in place: after a crash before the
    // commit, it is recognised as this client's own (crate::generation::reconcile).
    crate::generation::note_pending(profile, Some(id), &[])?;
    let fin = path_of(root, id);
    std::fs::rename(&partial, &fin)
        .with_context(|| format!("committing {} as {}", partial.display(), fin.display()))?;
    super::resume::unmark(&partial);
    crate::debug!("synced and renamed in {:.2} s", t.elapsed().as_secs_f64());
    Ok(taken)
}

/// syncfs through the snapshot's one descriptor `fs` on the filesystem at `root`.
fn syncfs(fs: &std::fs::File, root: &Path) -> Result<()> {
    nix::unistd::syncfs(fs).with_context(|| format!("syncfs {}", root.display()))
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
    use crate::snapshots::rsync::rsync_command_for;

    #[test]
    fn write_behind_follows_the_bytes_copied() {
        use std::sync::mpsc::channel;
        const M: u64 = 1 << 20;
        // No data copied (a no-change run reports 0 bytes throughout): never a flush.
        let (tx, rx) = channel();
        (0..1000).for_each(|_| tx.send(0).unwrap());
        drop(tx);
        assert_eq!(
            write_behind(rx, || panic!("flushed with nothing copied")).unwrap(),
            0
        );
        // Reports that queued up while a flush ran count as the newest one.
        let (tx, rx) = channel();
        for b in [M, 3 * M, WRITE_BEHIND_EVERY + M, 60 * M] {
            tx.send(b).unwrap();
        }
        drop(tx);
        assert_eq!(write_behind(rx, || Ok(())).unwrap(), 1);
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
        })
        .unwrap();
        feeder.join().unwrap();
        assert!(
            n >= 1 && n as u64 <= 40 * M / WRITE_BEHIND_EVERY,
            "{n} flushes"
        );
        assert_eq!(n, *seen.lock().unwrap());
        // A failed flush ends it with its error; the rest of the progress is not waited for.
        let (tx, rx) = channel();
        tx.send(100 * M).unwrap();
        let e = write_behind(rx, || anyhow::bail!("EIO")).unwrap_err();
        assert_eq!(format!("{e}"), "EIO");
        assert!(
            tx.send(200 * M).is_err(),
            "the receiver is gone once it stopped"
        );
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
            let hasher = scope.spawn(|| hash_behind(names_rx, &dest, Default::default()));
            let mut seen = 0;
            rsync
                .run_streaming(|line| {
                    if let Some((p, digest)) = wrote(line) {
                        seen += 1;
                        if let Some(d) = digest {
                            tx.send((p, d)).unwrap();
                        }
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
        let built = crate::manifest::build::<&[u8]>(&copy, None, None, &fresh, &mut out).unwrap();
        assert_eq!(built.unhashed, 0, "rsync's checksums cover every file");
        // The same hashes read from the source files themselves.
        let mut none = Vec::new();
        let from_source = crate::manifest::build::<&[u8]>(
            &copy,
            Some(&src),
            None,
            &Default::default(),
            &mut none,
        )
        .unwrap();
        assert_eq!(from_source.unhashed, 0);
        assert_eq!(
            out, none,
            "rsync's checksums equal the hashes of the source files"
        );
    }
}
