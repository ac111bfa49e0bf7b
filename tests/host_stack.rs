//! Host-level tests of the real stack minus LUKS (this host kernel has no device-mapper):
//! a private sshd on 127.0.0.1, ssh2 host-key pinning, sshfs, a direct-I/O loop device, ext4,
//! rsync --link-dest snapshots and the undo journal. Privileged: names start with `host_`,
//! run with --test-threads=1 (CI runs as root).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use e2ebackup::error::{exit_for, Exit};
use e2ebackup::profile::Profile;
use e2ebackup::stack::{ext4, loopdev, mount, ssh, sshfs};
use e2ebackup::teardown::{Journal, Stack, Undo};

#[test]
fn host_ssh_pinned_key_facts_and_refusals() {
    if common::skip_unless_root("host_ssh_pinned_key_facts_and_refusals") {
        return;
    }
    let sshd = common::Sshd::start();
    let src = tempfile::tempdir().unwrap();
    let p = Profile::load(&sshd.profile("ssh", &[src.path()])).unwrap();
    let r = ssh::Remote::connect(&p.server).unwrap();
    let f = r.facts(&p.server.path, &p.remote_container()).unwrap();
    assert!(
        f.fsync_supported,
        "internal-sftp advertises fsync@openssh.com"
    );
    assert!(f.free_bytes.unwrap() > 0);
    assert!(f.container_size.is_none());
    std::fs::write(sshd.server_dir().join("test.luks"), b"x").unwrap();
    let f = r.facts(&p.server.path, &p.remote_container()).unwrap();
    assert_eq!(f.container_size, Some(1));

    // Another key pinned for this host:port = a changed host key.
    let other = sshd.path("other_key");
    std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    let pubkey = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let kt: Vec<&str> = pubkey.split_whitespace().take(2).collect();
    std::fs::write(
        sshd.path("known_hosts"),
        format!("[127.0.0.1]:{} {} {}\n", sshd.port, kt[0], kt[1]),
    )
    .unwrap();
    let e = ssh::Remote::connect(&p.server)
        .err()
        .expect("changed key must be refused");
    assert_eq!(exit_for(&e), Exit::Security);
    assert!(format!("{e:#}").contains("CHANGED"), "{e:#}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_e2ebackup"))
        .args(["validate", "--connect"])
        .arg(&p.source_file)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing pinned for this host:port = unknown: refused too (no trust on first use).
    std::fs::write(sshd.path("known_hosts"), "# empty\n").unwrap();
    let e = ssh::Remote::connect(&p.server)
        .err()
        .expect("unknown key must be refused");
    assert_eq!(exit_for(&e), Exit::Security);
    assert!(format!("{e:#}").contains("not pinned"), "{e:#}");
}

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

#[test]
fn host_sshfs_loop_ext4_snapshots_and_teardown() {
    if common::skip_unless_root("host_sshfs_loop_ext4_snapshots_and_teardown") {
        return;
    }
    let sshd = common::Sshd::start();
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    write(&s.join("a/keep.txt"), b"unchanged");
    write(&s.join("a/change.txt"), b"version 1");
    write(&s.join("a/delete.txt"), b"going away");
    std::fs::hard_link(s.join("a/keep.txt"), s.join("a/keep-link.txt")).unwrap();
    std::os::unix::fs::symlink("keep.txt", s.join("a/sym")).unwrap();
    std::fs::create_dir(s.join("empty")).unwrap();
    write(&s.join("owned"), b"owner");
    nix::unistd::chown(&s.join("owned"), Some(1234.into()), Some(5678.into())).unwrap();
    let p = Profile::load(&sshd.profile("stack", &[s])).unwrap();

    let run = tempfile::tempdir().unwrap();
    let journal = run.path().join("undo.json");
    let mnt = run.path().join("server");
    let fs = run.path().join("fs");
    std::fs::create_dir_all(&fs).unwrap();
    let mut stack = Stack::persistent(journal.clone(), "test").unwrap();
    stack
        .push(Undo::UnmountSshfs {
            target: mnt.clone(),
        })
        .unwrap();
    sshfs::mount(&p.server, &mnt).unwrap();
    let file = mnt.join("test.luks");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let l = loopdev::attach(&file, false).unwrap();
    let dev = l.device.clone();
    stack
        .push(Undo::DetachLoop {
            device: dev.clone(),
            backing: file.clone(),
        })
        .unwrap();
    assert!(
        loopdev::direct_io(&dev),
        "the kernel dropped direct I/O on the FUSE file"
    );
    ext4::mkfs(&dev, "hosttest", 16384).unwrap();
    stack.push(Undo::Unmount { target: fs.clone() }).unwrap();
    mount::mount_ext4(&dev, &fs, false).unwrap();
    e2ebackup::snapshots::create_layout(&fs).unwrap();

    let t1 = e2ebackup::snapshots::take(&p, &fs).unwrap();
    write(&s.join("a/change.txt"), b"version 2, longer");
    std::fs::remove_file(s.join("a/delete.txt")).unwrap();
    write(&s.join("a/new.txt"), b"new");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let t2 = e2ebackup::snapshots::take(&p, &fs).unwrap();
    assert!(t2.link_dest.as_deref() == Some(t1.id.as_str()));
    let ids = e2ebackup::snapshots::list(&fs).unwrap();
    assert_eq!(ids.len(), 2);
    let in_snap = |id: &e2ebackup::snapid::SnapshotId, rel: &str| {
        e2ebackup::snapshots::path_of(&fs, *id)
            .join(s.strip_prefix("/").unwrap())
            .join(rel)
    };
    let ino = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(in_snap(&ids[0], "a/keep.txt")),
        ino(in_snap(&ids[1], "a/keep.txt"))
    );
    assert_ne!(
        ino(in_snap(&ids[0], "a/change.txt")),
        ino(in_snap(&ids[1], "a/change.txt"))
    );
    assert!(!in_snap(&ids[1], "a/delete.txt").exists());
    assert_eq!(
        std::fs::read(in_snap(&ids[1], "a/change.txt")).unwrap(),
        b"version 2, longer"
    );
    assert_eq!(
        ino(in_snap(&ids[1], "a/keep.txt")),
        ino(in_snap(&ids[1], "a/keep-link.txt"))
    );
    assert_eq!(
        std::fs::read_link(in_snap(&ids[1], "a/sym")).unwrap(),
        Path::new("keep.txt")
    );
    let m = std::fs::metadata(in_snap(&ids[1], "owned")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    assert!(in_snap(&ids[1], "empty").is_dir());
    let alloc = std::fs::metadata(sshd.server_dir().join("test.luks"))
        .unwrap()
        .blocks()
        * 512;
    assert!(
        alloc < 128 << 20,
        "container should stay sparse, allocated {alloc}"
    );

    // Simulate a killed process: drop our in-memory state, recover from the journal alone.
    drop(l);
    std::mem::forget(stack);
    let j = Journal::read(&journal)
        .unwrap()
        .expect("journal written before each step");
    assert_eq!(j.records.len(), 3);
    let mut recovered = Stack::adopt(journal.clone(), j);
    let report = recovered.unwind(&mut e2ebackup::stack::Real);
    assert!(report.complete(), "{:?}", report.failed);
    assert!(mount::mounted_at(&fs).unwrap().is_none());
    assert!(mount::mounted_at(&mnt).unwrap().is_none());
    assert!(
        loopdev::backing_file(&dev).is_none(),
        "{} still attached",
        dev.display()
    );
    assert!(sshfs::sshfs_process_for(&mnt).is_none());
    assert!(!journal.exists());
}
