//! A crash between the generation commit and the unmount, read with `ro,noload` (issue 14).
//!
//! `generation::commit` writes STATE with `generation::store`: the file synced, renamed,
//! then one `syncfs` of the container.
//! A read-only command on a crash image mounts `ro,noload`, which reads only the home
//! locations of the metadata, never the journal. If the renamed STATE lived only in the
//! journal until a checkpoint, such a mount would show the generation before the client's
//! record and be refused as a rollback (exit 6). It does not: syncfs commits the journal
//! and then writes the block device's dirty buffers, which after the commit include the
//! journaled metadata at home (jbd2 marks them dirty for the checkpoint), so the image has
//! the new STATE at home while its journal still needs recovery. This test holds that, and
//! the contrast: with write_atomic's fsyncs alone (no syncfs) the image shows the old STATE.
//!
//! Also here, on the same kind of local image: the unmount makes a read-write ext4
//! read-only first, which reaches the device with fewer flushes.
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

/// A 64 MiB image file at `img` with a fresh ext4 of 4 KiB blocks (as `init` makes the
/// container's), its inode tables and journal written at once.
fn new_ext4(img: &Path) {
    File::create(img).unwrap().set_len(64 << 20).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096"])
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(img)
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 {}", img.display());
}

#[test]
#[ignore = "needs root (loop devices, mount); run as root with --include-ignored, as CI does"]
fn host_crash_image_after_commit_shows_the_new_generation_under_noload() {
    let work = common::private_tempdir();
    let img = work.path().join("c.img");
    let copy = work.path().join("crash.img");
    let (m, c) = (work.path().join("m"), work.path().join("c"));
    new_ext4(&img);

    // Generation 4, cleanly unmounted (every session starts from a checkpointed journal).
    let l = mounted(&img, &m, false, false);
    write_atomic(&m.join("STATE"), b"generation 4\n").unwrap();
    mount::syncfs(&m).unwrap();
    unmounted(l);

    // Generation 5 committed by generation::commit's own writer, then the "crash": the
    // image is copied while still mounted, before the unmount's checkpoint.
    let l = mounted(&img, &m, false, false);
    e2ebackup::generation::store(&m, b"generation 5\n").unwrap();
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

/// Writes and flushes completed by the block device `dev` so far (/sys/block/X/stat).
fn device_io(dev: &Path) -> (u64, u64) {
    let name = dev.file_name().unwrap().to_string_lossy();
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
    let v: Vec<u64> = stat
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(v.len() >= 17, "no flush counters in /sys/block/{name}/stat");
    (v[4], v[15])
}

/// `mount::ensure_unmounted` (the teardown's unmount) remounts a read-write ext4
/// read-only before it unmounts it: the same sync and journal checkpoint with fewer flushes
/// and writes on the device, each of them a round trip to the server on the container.
/// Counted on the loop device, against umount(2) of the same filesystem in the same state;
/// both leave a clean filesystem.
#[test]
#[ignore = "needs root (loop devices, mount); run as root with --include-ignored, as CI does"]
fn host_unmount_goes_read_only_first_and_flushes_less() {
    let work = common::private_tempdir();
    let mut seen = Vec::new();
    for ours in [false, true] {
        let img = work.path().join(format!("u{ours}.img"));
        let m = work.path().join(format!("m{ours}"));
        new_ext4(&img);
        let l = mounted(&img, &m, false, false);
        let dev = l._loop.device.clone();
        std::fs::create_dir(m.join("d")).unwrap();
        for i in 0..200 {
            std::fs::write(m.join("d").join(i.to_string()), b"x").unwrap();
        }
        mount::syncfs(&m).unwrap();
        let before = device_io(&dev);
        if ours {
            mount::ensure_unmounted(&m).unwrap();
        } else {
            nix::mount::umount(&m).unwrap();
        }
        let after = device_io(&dev);
        assert_eq!(mount::mounted_at(&m).unwrap(), None);
        unmounted(l);
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck -fn {}: {}",
            img.display(),
            String::from_utf8_lossy(&fsck.stdout)
        );
        let (writes, flushes) = (after.0 - before.0, after.1 - before.1);
        eprintln!(
            "{}: {writes} writes, {flushes} flushes",
            if ours {
                "ensure_unmounted"
            } else {
                "umount(2)"
            }
        );
        seen.push(flushes);
    }
    assert!(
        seen[1] < seen[0],
        "going read-only first should save flushes ({} against {}; it saves ext4's \
         per-quota-type syncs, which a kernel built without CONFIG_QUOTA does not make)",
        seen[1],
        seen[0]
    );
}
