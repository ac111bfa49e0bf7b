//! Restore's copy: rsync out of a snapshot, with the files read ahead of it by several
//! threads and, given the container, their data read from the server in bulk, both within
//! a window of rsync's progress.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::cmd::Cmd;
use crate::info;

use super::walk::{files_within, mem_available, read_metadata_ahead};

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
/// rsync's progress ([`Pace`]). rsync's progress is shown as a backup's is. With `delete`
/// (`restore --delete`), what `target` holds beside the snapshot's files is deleted too, but
/// only inside the `paths` copied (rsync deletes only in directories it copies whole, never
/// in the implied directories above them).
pub fn copy_out(
    snap: &Path,
    paths: &[PathBuf],
    target: &Path,
    warm: Option<&Warm>,
    delete: bool,
) -> Result<()> {
    let mut c = Cmd::new("rsync")?.args([
        "-aHAX",
        "--sparse",
        "--numeric-ids",
        "--stats",
        "--info=progress2",
    ]);
    if delete {
        anyhow::ensure!(
            !paths.is_empty(),
            "restore --delete needs --path: it deletes only within the restored paths"
        );
        c = c.arg("--delete");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
