//! Walking a tree with several threads, so that the kernel caches what a later reader
//! (rsync, the manifest) reads one entry after another: the parallel walker, the metadata
//! prefetch of the previous snapshot, and the read-ahead of the container's metadata.

use std::path::{Path, PathBuf};

/// Threads that walk the previous snapshot before rsync does.
pub(super) const PREFETCH_THREADS: usize = 8;
/// Kernel memory a prefetched file costs, about (inode, dentry, its share of inode-table and
/// directory blocks): the prefetch is skipped when it would take over half of the free memory
/// (cached metadata evicted before rsync reaches it would only be read twice).
pub(super) const PREFETCH_BYTES_PER_FILE: u64 = 2048;

pub(super) fn mem_available() -> Option<u64> {
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
pub(super) fn files_within(
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

/// Threads that read the container's metadata ahead ([`crate::stack::ext4::read_metadata`]).
const METADATA_THREADS: usize = 8;

/// The most a metadata read-ahead reads: a quarter of the free memory, at most 1 GiB.
fn metadata_budget() -> u64 {
    mem_available().map_or(0, |m| m / 4).min(1 << 30)
}

/// The container's metadata read ahead ([`crate::stack::ext4::read_metadata`]) within
/// [`metadata_budget`], the directories of those created since what `since` returns;
/// stopped by a pending signal or `stop`; best effort, what it did in a debug line.
pub(super) fn read_metadata_ahead(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
