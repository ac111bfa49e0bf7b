//! A crash between the generation commit and the unmount, read with `ro,noload` (issue 14).
//!
//! `generation::commit` writes STATE with `fsutil::write_atomic` and then calls `syncfs`.
//! A read-only command on a crash image mounts `ro,noload`, which reads only the home
//! locations of the metadata, never the journal. If the renamed STATE lived only in the
//! journal until a checkpoint, such a mount would show the generation before the client's
//! record and be refused as a rollback (exit 6). It does not: syncfs commits the journal
//! and then writes the block device's dirty buffers, which after the commit include the
//! journaled metadata at home (jbd2 marks them dirty for the checkpoint), so the image has
//! the new STATE at home while its journal still needs recovery. This test holds that, and
//! the contrast: with write_atomic's fsyncs alone (no syncfs) the image shows the old STATE.
//!
//! Privileged (root, loop devices): run with `--test-threads=1`.

mod common;

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::Command;

use e2ebackup::fsutil::write_atomic;
use e2ebackup::stack::{ext4, loopdev, mount};
use e2ebackup::teardown::Stack;

/// The loop device and the mount, recorded as the session records them.
struct Mounted {
    stack: Stack,
    _loop: loopdev::Loop,
}

fn mounted(img: &Path, at: &Path, read_only: bool, noload: bool) -> Mounted {
    let f = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(img)
        .unwrap();
    let mut stack = Stack::in_memory();
    let l =
        loopdev::attach(&mut stack, &f, img, read_only).unwrap_or_else(|e| panic!("attach: {e:#}"));
    mount::mount_ext4_with(&mut stack, &l.device, at, read_only, noload)
        .unwrap_or_else(|e| panic!("mount {}: {e:#}", img.display()));
    Mounted { stack, _loop: l }
}

fn unmounted(m: Mounted) {
    let Mounted { mut stack, _loop } = m;
    drop(_loop);
    let r = stack.unwind(&mut e2ebackup::stack::Real);
    assert!(r.complete(), "{:?}", r.failed);
}

#[test]
#[ignore = "needs root (loop devices, mount); run as root with --include-ignored, as CI does"]
fn host_crash_image_after_commit_shows_the_new_generation_under_noload() {
    let work = common::private_tempdir();
    let img = work.path().join("c.img");
    let copy = work.path().join("crash.img");
    let (m, c) = (work.path().join("m"), work.path().join("c"));
    File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());

    // Generation 4, cleanly unmounted (every session starts from a checkpointed journal).
    let l = mounted(&img, &m, false, false);
    write_atomic(&m.join("STATE"), b"generation 4\n").unwrap();
    mount::syncfs(&m).unwrap();
    unmounted(l);

    // Generation 5 committed as generation::commit does, then the "crash": the image is
    // copied while still mounted, before the unmount's checkpoint.
    let l = mounted(&img, &m, false, false);
    write_atomic(&m.join("STATE"), b"generation 5\n").unwrap();
    mount::syncfs(&m).unwrap();
    std::fs::copy(&img, &copy).unwrap();
    unmounted(l);

    assert!(
        ext4::needs_recovery(&copy).unwrap(),
        "the copy is a crash image (journal needs recovery)"
    );
    let l = mounted(&copy, &c, true, true);
    let state = std::fs::read_to_string(c.join("STATE")).unwrap();
    unmounted(l);
    assert_eq!(
        state, "generation 5\n",
        "ro,noload shows the committed STATE"
    );

    // The contrast: write_atomic's fsyncs alone (file and directory) commit the journal
    // but leave the home blocks old; without the syncfs, noload shows the older STATE.
    let l = mounted(&img, &m, false, false);
    write_atomic(&m.join("STATE"), b"generation 6\n").unwrap();
    std::fs::copy(&img, &copy).unwrap();
    unmounted(l);
    let l = mounted(&copy, &c, true, true);
    let state = std::fs::read_to_string(c.join("STATE")).unwrap();
    unmounted(l);
    assert_eq!(
        state, "generation 5\n",
        "without syncfs the home blocks lag"
    );
}
