//! Host tests of a snapshot that cannot be completed in one go, on a real ext4 over a loop
//! device (no sshd, no LUKS: this host has no device-mapper):
//! - the container's backing store fails under writeback (a loop device over a file on a
//!   small tmpfs that runs out of space): `take` fails naming the write, nothing committed;
//! - the container's filesystem fills up mid-snapshot: `take` fails saying so (with what it
//!   still needed), the next run resumes what it left, after a grow, sending only the rest;
//!   a leftover whose content changed on the server is sent again, a file deleted from the
//!   source between the attempts is gone, and the manifest covers every file.
//!
//! Privileged (root): run with `--include-ignored --test-threads=1`.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::Recover;
use e2ebackup::fsutil::ServerDir;
use e2ebackup::profile::Profile;
use e2ebackup::snapshots;
use e2ebackup::stack::{ext4, loopdev, mount};
use e2ebackup::teardown::{Stack, Undo};

fn profile(src: &Path) -> Profile {
    Profile::parse(
        Path::new("resume-test.yaml"),
        &format!(
            "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}}\n\
             container: {{file: c.luks, size: 1G, keyfile: /key}}\n\
             backup: {{sources: ['{}']}}\n",
            src.display()
        ),
    )
    .unwrap()
}

/// A container's filesystem at `fs`: ext4 (journal 4 MiB) on a loop device over the sparse
/// file `file` of `size` bytes, recorded in `stack`.
fn container(stack: &mut Stack, file: &Path, size: u64, fs: &Path) -> loopdev::Loop {
    std::fs::File::create(file).unwrap().set_len(size).unwrap();
    let dir = ServerDir::open(file.parent().unwrap(), "server").unwrap();
    let f = dir
        .open_file(&file.file_name().unwrap().to_string_lossy(), false)
        .unwrap();
    let l = loopdev::attach(stack, &f, file, false).unwrap_or_else(|e| panic!("attach: {e:#}"));
    ext4::mkfs(&l.device, "resume", 4096, 4 << 20).unwrap_or_else(|e| panic!("mkfs: {e:#}"));
    mount::mount_ext4(stack, &l.device, fs, false).unwrap_or_else(|e| panic!("mount: {e:#}"));
    snapshots::create_layout(fs).unwrap();
    l
}

fn files_under(d: &Path) -> Vec<(PathBuf, u64)> {
    let mut v = Vec::new();
    let mut dirs = vec![d.to_path_buf()];
    while let Some(x) = dirs.pop() {
        for e in std::fs::read_dir(&x).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                dirs.push(e.path());
            } else {
                v.push((e.path().strip_prefix(d).unwrap().to_path_buf(), m.len()));
            }
        }
    }
    v.sort();
    v
}

#[test]
#[ignore = "needs root (tmpfs, loop devices, mount); run as root with --include-ignored, as CI does"]
fn host_writeback_error_fails_the_snapshot() {
    let run = common::private_tempdir();
    let journal = run.path().join("undo.json");
    let _guard = Recover::new(&journal);
    let mut stack = Stack::persistent(journal.clone(), "test").unwrap();
    // The "server": a 40 MiB tmpfs holding a 256 MiB sparse container file. It runs out of
    // space while the snapshot's data is written back, and the loop device fails the writes.
    let small = run.path().join("small");
    let fs = run.path().join("fs");
    std::fs::create_dir_all(&small).unwrap();
    std::fs::create_dir_all(&fs).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=40m,mode=0700", "e2e-resume-test"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs: {st:?}");
    stack
        .push(Undo::Unmount {
            target: small.clone(),
        })
        .unwrap();
    let l = container(&mut stack, &small.join("c.img"), 256 << 20, &fs);
    let src = run.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..16u64 {
        std::fs::write(src.join(format!("f{i:02}")), common::noise(4 << 20, i + 1)).unwrap();
    }
    let p = profile(&src);
    let e = snapshots::take(&p, &fs, Some(&l.device), None, &[])
        .expect_err("a snapshot whose data could not be written must fail");
    let msg = format!("{e:#}");
    eprintln!("take failed as it must: {msg}");
    assert!(
        msg.contains("writing to the server failed"),
        "the error names the failed write: {msg}"
    );
    assert!(
        snapshots::list(&fs).map(|l| l.is_empty()).unwrap_or(true),
        "nothing was committed"
    );
    drop(l);
    let r = stack.unwind(&mut e2ebackup::stack::Real);
    assert!(r.complete(), "teardown: {:?}", r.failed);
}

#[test]
#[ignore = "needs root (loop devices, mount); run as root with --include-ignored, as CI does"]
fn host_full_container_then_resume() {
    let run = common::private_tempdir();
    let journal = run.path().join("undo.json");
    let _guard = Recover::new(&journal);
    let mut stack = Stack::persistent(journal.clone(), "test").unwrap();
    let fs = run.path().join("fs");
    std::fs::create_dir_all(&fs).unwrap();
    let file = run.path().join("c.img");
    // About 40 MiB free for 64 MiB of source: the first attempt fills it. (A filler file
    // takes the rest; removing it stands for a grow, which this host's kernel refuses
    // online: resize2fs gets EPERM here, while the guest of vm-tests grows for real.)
    let l = container(&mut stack, &file, 96 << 20, &fs);
    std::fs::write(fs.join("filler"), common::noise(44 << 20, 99)).unwrap();
    let src = run.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..16u64 {
        std::fs::write(
            src.join(format!("d/f{i:02}")),
            common::noise(4 << 20, i + 7),
        )
        .unwrap();
    }
    std::fs::write(src.join("small"), b"small\n").unwrap();
    let p = profile(&src);

    let e = snapshots::take(&p, &fs, Some(&l.device), None, &[])
        .expect_err("the container is too small");
    let full = e
        .downcast_ref::<snapshots::ContainerFull>()
        .unwrap_or_else(|| panic!("not reported as a full container: {e:#}"));
    eprintln!("first attempt: {full}");
    assert!(full.copied > 16 << 20, "{full:?}");
    assert!(snapshots::list(&fs).unwrap().is_empty());

    // The next run finds the partial to resume. In between: the source loses a file, and
    // the server garbles one that is already there (same size and times).
    let resume = snapshots::settle_partials(&p, &fs)
        .unwrap()
        .expect("the interrupted snapshot is kept");
    let copy = resume.dir.join(src.strip_prefix("/").unwrap());
    let there: Vec<_> = files_under(&copy)
        .into_iter()
        .filter(|(_, n)| *n == 4 << 20)
        .map(|(p, _)| p)
        .collect();
    assert!(there.len() >= 4, "the first attempt left {there:?}");
    std::fs::remove_file(src.join(&there[0])).unwrap();
    let garbled = copy.join(&there[1]);
    let m = std::fs::metadata(&garbled).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&garbled)
            .unwrap();
        f.write_all_at(b"garbled by the server!", 1 << 20).unwrap();
        f.set_modified(m.modified().unwrap()).unwrap();
    }
    assert_eq!(std::fs::metadata(&garbled).unwrap().mtime(), m.mtime());

    // Room for the rest.
    std::fs::remove_file(fs.join("filler")).unwrap();

    let first_id = resume.first_id.clone();
    let t = snapshots::take(&p, &fs, Some(&l.device), Some(resume), &[])
        .unwrap_or_else(|e| panic!("resumed snapshot: {e:#}"));
    let r = t.resumed.as_ref().expect("the snapshot was resumed");
    eprintln!("resumed: {r:?}, transferred {:?}", t.bytes_transferred);
    assert_eq!(r.first_id, first_id);
    // What was there (less the deleted and the garbled file) was not sent again.
    let kept = (there.len() as u64 - 2) * (4 << 20);
    assert!(r.bytes >= kept, "{r:?}");
    let sent = t.bytes_transferred.unwrap();
    assert!(
        sent <= (15 << 22) - kept + 4096,
        "sent {sent} bytes; {kept} were already there"
    );
    // The snapshot is the source: the deleted file absent, the garbled one sent again.
    let snap = snapshots::path_of(&fs, t.id.parse().unwrap()).join(src.strip_prefix("/").unwrap());
    assert_eq!(files_under(&snap), files_under(&src));
    for (f, _) in files_under(&src) {
        assert!(
            std::fs::read(src.join(&f)).unwrap() == std::fs::read(snap.join(&f)).unwrap(),
            "{} differs from the source",
            f.display()
        );
    }
    assert!(!snap.join(&there[0]).exists());
    // Nothing left under .partial/, and the manifest holds the content of every file.
    assert_eq!(
        std::fs::read_dir(fs.join(snapshots::PARTIAL))
            .unwrap()
            .count(),
        0
    );
    let records = e2ebackup::manifest::open(&fs, &t.id).unwrap().unwrap();
    let algorithm = records.algorithm;
    let entries: Vec<_> = records.map(Result::unwrap).collect();
    assert_eq!(entries.len(), files_under(&src).len());
    for e in entries {
        let path = String::from_utf8_lossy(&e.path).into_owned();
        let want = e2ebackup::manifest::hash_file(
            &snapshots::path_of(&fs, t.id.parse().unwrap()).join(&path),
            algorithm,
        )
        .unwrap();
        assert_eq!(e.hash.as_deref(), Some(want.as_str()), "{path}");
    }
    drop(l);
    let r = stack.unwind(&mut e2ebackup::stack::Real);
    assert!(r.complete(), "teardown: {:?}", r.failed);
}
