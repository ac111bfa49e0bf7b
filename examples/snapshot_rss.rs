//! Peak memory of the snapshot step at scale, on the host, without a VM.
//!
//! `run`'s memory grows with the file count only in the snapshot step: rsync's own memory
//! is a child's, and every layer of the stack (sshfs, loop, LUKS, mount) holds a fixed amount.
//! This runs that step, e2ebackup's own `snapshots::take` (the metadata prefetch, rsync
//! --link-dest, the manifest), against a local directory standing in for the mounted
//! container, and prints the process's peak RSS after each backup.
//!
//!   cargo run --release --example snapshot_rss -- [FILES] [WORKDIR]
//!
//! FILES defaults to 100000 (100 B - 1 KiB each, 20 per directory); WORKDIR (default
//! target/snapshot-rss) is emptied first and removed at the end. Run as root, like `run`.

use std::path::{Path, PathBuf};
use std::time::Instant;

fn peak_rss_kib() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_maxrss
}

fn make_tree(root: &Path, n: usize) -> std::io::Result<()> {
    for i in 0..n {
        let d = root.join(format!("d{:03}/s{:02}", i / 200, i / 20 % 10));
        if i % 20 == 0 {
            std::fs::create_dir_all(&d)?;
        }
        let len = 100 + (i * 7919) % 924;
        std::fs::write(d.join(format!("f{i:06}.bin")), vec![(i % 251) as u8; len])?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let work = PathBuf::from(args.next().unwrap_or_else(|| "target/snapshot-rss".into()));
    let _ = std::fs::remove_dir_all(&work);
    let (src, root) = (work.join("src"), work.join("container"));
    std::fs::create_dir_all(&root)?;
    let t = Instant::now();
    make_tree(&src, n)?;
    println!(
        "{n} files made in {:.1} s; peak RSS so far {} KiB",
        t.elapsed().as_secs_f64(),
        peak_rss_kib()
    );
    // Absolute, as the real mount point is: rsync reads a relative --link-dest against the
    // destination.
    let (src, root) = (std::fs::canonicalize(&src)?, std::fs::canonicalize(&root)?);
    let profile = e2ebackup::profile::Profile::parse(
        Path::new("snapshot-rss.yaml"),
        &format!(
            "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}}\n\
             container: {{file: c.luks, size: 1G, keyfile: /key}}\n\
             backup: {{sources: [{}]}}\n",
            src.display()
        ),
    )?;
    e2ebackup::snapshots::create_layout(&root)?;
    for step in ["full", "no-change", "1%-changed"] {
        if step == "1%-changed" {
            for i in (0..n).step_by(100) {
                let f = src.join(format!("d{:03}/s{:02}/f{i:06}.bin", i / 200, i / 20 % 10));
                std::fs::write(f, b"changed")?;
            }
        }
        // Distinct snapshot ids: they are whole seconds.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let t = Instant::now();
        let taken = e2ebackup::snapshots::take(&profile, &root)?;
        println!(
            "{step:>10}: snapshot {} in {:.1} s, {} files transferred; peak RSS {} KiB",
            taken.id,
            t.elapsed().as_secs_f64(),
            taken.files_transferred.unwrap_or(0),
            peak_rss_kib()
        );
    }
    if std::env::var_os("SNAPSHOT_RSS_KEEP").is_none() {
        std::fs::remove_dir_all(&work)?;
    }
    Ok(())
}
