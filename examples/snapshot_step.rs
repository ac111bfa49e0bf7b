//! One snapshot step of `run`, on the host, without LUKS: e2ebackup's own
//! `snapshots::take` (the metadata read-ahead when DEVICE is given, the parallel walk of the
//! previous snapshot, rsync --link-dest, the streamed manifest) from SOURCE into the container
//! root ROOT, in a process of its own, as `run` would. Prints the time and the process's peak
//! RSS. `run`'s memory grows with the file count only in this step: rsync is a child, and
//! each layer of the stack holds a fixed amount.
//!
//!   cargo run --release --example snapshot_step -- SOURCE ROOT [DEVICE]
//!   cargo run --release --example snapshot_step -- --restore ROOT TARGET [DEVICE CONTAINER]
//!
//! The second form is restore's copy (`snapshots::copy_out`: rsync with the files read
//! ahead by 8 threads) of the newest snapshot in ROOT into the empty directory TARGET; with
//! DEVICE (a read-only, buffered loop device, where ROOT is mounted) and CONTAINER (the file
//! it is attached to, on sshfs) the snapshot's data is also read from CONTAINER in bulk, a
//! window ahead of rsync, as `restore` does (`snapshots::Warm`; offset 0: no LUKS here).
//!
//!   cargo run --release --example snapshot_step -- --mkfs IMAGE
//!
//! The third form makes the ext4 on IMAGE (a file or device of the container's size) as
//! `init` does: the same mkfs options, inode count and journal (`ext4::chosen_journal_bytes`),
//! so that the benchmark measures the filesystem users get.
//!
//! SNAPSHOT_STEP_DEBUG=1 shows the debug lines (what the read-ahead and the walk took).
//! ROOT is a directory (made a container root on first use); for the read-ahead it is
//! where the ext4 on DEVICE is mounted. scripts/bench-host.sh drives it over a link with
//! round-trip delay; at 100k files on a local directory it is the memory benchmark
//! (docs/benchmarks.md). Run as root, like `run`.

use std::path::{Path, PathBuf};
use std::time::Instant;

fn peak_rss_kib() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_maxrss
}

/// A profile with a container of `size` backing up `source`; nothing but the container's
/// size and the sources is used here.
fn profile(size: &str, source: &Path) -> anyhow::Result<e2ebackup::profile::Profile> {
    e2ebackup::profile::Profile::parse(
        Path::new("snapshot-step.yaml"),
        &format!(
            "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}}\n\
             container: {{file: c.luks, size: {size}, keyfile: /key}}\n\
             backup: {{sources: [{}]}}\n",
            source.display()
        ),
    )
}

fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if args.first().is_some_and(|a| a.as_os_str() == "--mkfs") {
        let Some(image) = args.get(1) else {
            anyhow::bail!("usage: snapshot_step --mkfs IMAGE");
        };
        let size = std::fs::metadata(image)?.len();
        let inodes = profile(&size.to_string(), Path::new("/"))?.inode_count();
        let journal = e2ebackup::stack::ext4::chosen_journal_bytes(size);
        e2ebackup::stack::ext4::mkfs(image, "bench", inodes, journal)?;
        println!(
            "ext4 on {}: {inodes} inodes, {} MiB journal",
            image.display(),
            journal >> 20
        );
        return Ok(());
    }
    if args.first().is_some_and(|a| a.as_os_str() == "--restore") {
        let (Some(root), Some(target)) = (args.get(1), args.get(2)) else {
            anyhow::bail!("usage: snapshot_step --restore ROOT TARGET [DEVICE CONTAINER]");
        };
        let root = std::fs::canonicalize(root)?;
        let newest = *e2ebackup::snapshots::list(&root)?
            .last()
            .ok_or_else(|| anyhow::anyhow!("no snapshot in {}", root.display()))?;
        let warm = match (args.get(3), args.get(4)) {
            (Some(device), Some(container)) => Some(e2ebackup::snapshots::Warm {
                container: std::fs::File::open(container)?,
                offset: 0,
                device: device.clone(),
                since: newest.unix().max(0) as u64,
            }),
            _ => None,
        };
        if std::env::var_os("SNAPSHOT_STEP_DEBUG").is_some() {
            e2ebackup::logging::set_level(2);
        }
        let t = Instant::now();
        let snap = e2ebackup::snapshots::path_of(&root, newest);
        e2ebackup::snapshots::copy_out(&snap, &[], target, warm.as_ref(), false)?;
        println!(
            "restore of {newest}: {:.2} s, peak RSS {} KiB",
            t.elapsed().as_secs_f64(),
            peak_rss_kib()
        );
        return Ok(());
    }
    let (Some(src), Some(root)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: snapshot_step SOURCE ROOT [DEVICE]");
    };
    // Absolute, as the real mount point is: rsync reads a relative --link-dest against the
    // destination.
    let (src, root) = (std::fs::canonicalize(src)?, std::fs::canonicalize(root)?);
    let profile = profile("1G", &src)?;
    if !root.join("FORMAT").exists() {
        e2ebackup::snapshots::create_layout(&root)?;
    }
    if std::env::var_os("SNAPSHOT_STEP_DEBUG").is_some() {
        e2ebackup::logging::set_level(2);
    }
    let t = Instant::now();
    // No STATE here: the directory's snapshots, by date, stand in for the committed list.
    let committed = e2ebackup::snapshots::list(&root)?;
    let taken = e2ebackup::snapshots::take(
        &profile,
        &root,
        args.get(2).map(PathBuf::as_path),
        None,
        &committed,
    )?;
    // `run` makes the renames durable with its generation commit; one sync stands in for it.
    e2ebackup::stack::mount::syncfs(&root)?;
    println!(
        "snapshot {}: {:.2} s, {} files transferred, peak RSS {} KiB",
        taken.id,
        t.elapsed().as_secs_f64(),
        taken.files_transferred.unwrap_or(0),
        peak_rss_kib()
    );
    Ok(())
}
