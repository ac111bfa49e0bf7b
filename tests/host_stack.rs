//! Host-level tests of the real stack minus LUKS (this host's kernel has no device-mapper):
//! a private sshd on 127.0.0.1, ssh2 host-key pinning, sshfs, the server lock over sshfs, a
//! direct-I/O loop device over the FUSE file (buffered when read-only, with restore's bulk
//! read-ahead), ext4, rsync --link-dest snapshots, and the
//! undo journal, including the recovery of a process killed with SIGKILL; `run` through the
//! binary up to its LUKS step (the preflight and the sshfs mount made at once).
//!
//! Privileged (root): the names start with `host_`; run with `--test-threads=1`. Every test
//! records what it acquires in an undo journal guarded by [`common::Recover`], so a failed
//! assertion still unmounts and detaches everything.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Recover, Sshd};
use e2ebackup::error::{exit_for, Exit};
use e2ebackup::fsutil::ServerDir;
use e2ebackup::profile::Profile;
use e2ebackup::snapshots;
use e2ebackup::stack::lock::{self, ServerLock};
use e2ebackup::stack::{self, ext4, loopdev, mount, ssh, sshfs};
use e2ebackup::teardown::{Journal, Stack, Undo};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// A sparse file of `size` bytes (created through whatever file system `p` is on).
fn sparse(p: &Path, size: u64) {
    std::fs::File::create(p).unwrap().set_len(size).unwrap();
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe {
        libc::lsetxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// All extended attributes of `p` (ACLs included: system.posix_acl_access).
fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = cpath(p);
    let mut out = BTreeMap::new();
    // SAFETY: a NULL buffer of size 0 asks for the size of the list.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(n >= 0, "listxattr {}", p.display());
    let mut names = vec![0u8; n as usize];
    // SAFETY: the buffer has the length passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "listxattr {}", p.display());
    names.truncate(n as usize);
    for name in names.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let cn = CString::new(name).unwrap();
        // SAFETY: as above.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
        assert!(len >= 0, "getxattr {}", p.display());
        let mut val = vec![0u8; len as usize];
        // SAFETY: as above.
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        assert!(len >= 0, "getxattr {}", p.display());
        val.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), val);
    }
    out
}

/// Assert that `copy` is an exact copy of `src`: same names, types, modes, owners, mtimes,
/// contents, symlink targets, extended attributes and ACLs, and the same hard-link structure.
fn assert_same_tree(src: &Path, copy: &Path) {
    let mut links = HashMap::new();
    let mut back = HashMap::new();
    compare(src, copy, Path::new("."), &mut links, &mut back);
}

fn compare(
    src: &Path,
    copy: &Path,
    rel: &Path,
    links: &mut HashMap<u64, u64>,
    back: &mut HashMap<u64, u64>,
) {
    let s = std::fs::symlink_metadata(src).unwrap();
    let c = std::fs::symlink_metadata(copy)
        .unwrap_or_else(|e| panic!("{} missing from the snapshot: {e}", rel.display()));
    let what = rel.display();
    assert_eq!(s.file_type(), c.file_type(), "{what}: file type differs");
    assert_eq!(
        s.permissions().mode(),
        c.permissions().mode(),
        "{what}: mode differs"
    );
    assert_eq!(
        (s.uid(), s.gid()),
        (c.uid(), c.gid()),
        "{what}: owner differs"
    );
    if s.file_type().is_symlink() {
        assert_eq!(
            std::fs::read_link(src).unwrap(),
            std::fs::read_link(copy).unwrap(),
            "{what}: symlink target differs"
        );
        return;
    }
    assert_eq!(xattrs(src), xattrs(copy), "{what}: xattrs/ACLs differ");
    assert_eq!(s.mtime(), c.mtime(), "{what}: mtime differs");
    if s.is_file() {
        assert_eq!(s.len(), c.len(), "{what}: size differs");
        assert!(
            std::fs::read(src).unwrap() == std::fs::read(copy).unwrap(),
            "{what}: content differs"
        );
        // Hard links: one source inode <-> one copy inode.
        let a = *links.entry(s.ino()).or_insert(c.ino());
        let b = *back.entry(c.ino()).or_insert(s.ino());
        assert_eq!(a, c.ino(), "{what}: a hard link of the source was split");
        assert_eq!(b, s.ino(), "{what}: files that are not links were merged");
    } else if s.is_dir() {
        let names = |d: &Path| -> BTreeSet<std::ffi::OsString> {
            std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect()
        };
        let (sn, cn) = (names(src), names(copy));
        assert_eq!(sn, cn, "{what}: directory entries differ");
        for n in sn {
            compare(&src.join(&n), &copy.join(&n), &rel.join(&n), links, back);
        }
    }
}

fn ino(p: &Path) -> u64 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .ino()
}

/// Mount the server directory at `mnt`, recording the undo first (as the session does).
fn mount_server(stack: &mut Stack, p: &Profile, mnt: &Path) {
    let d = sshfs::mount(stack, &p.server, mnt).unwrap_or_else(|e| panic!("sshfs mount: {e:#}"));
    assert!(d.is_running(), "the recorded sshfs daemon {d:?} runs");
    assert_eq!(
        stack.records().last(),
        Some(&Undo::UnmountSshfs {
            target: mnt.to_path_buf(),
            daemon: Some(d),
        }),
        "the daemon is recorded"
    );
    let m = mount::mounted_at(mnt).unwrap().expect("sshfs mounted");
    assert_eq!(m.fstype, "fuse.sshfs");
    // Restore's buffered reads through the mount get a 1 MiB read-ahead window.
    let (major, minor) = mount::device_of(mnt).unwrap().expect("a device number");
    let ra = std::fs::read_to_string(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"));
    assert_eq!(ra.unwrap().trim(), sshfs::READ_AHEAD_KIB.to_string());
}

/// The records with the sshfs daemon's identity (pid, start) left out, to compare.
fn no_daemon(records: &[Undo]) -> Vec<Undo> {
    records
        .iter()
        .map(|u| match u {
            Undo::UnmountSshfs { target, .. } => Undo::UnmountSshfs {
                target: target.clone(),
                daemon: None,
            },
            u => u.clone(),
        })
        .collect()
}

/// Regular files under `dir` (each name: hard links count once per name).
fn regular_files(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            n += regular_files(&e.path());
        } else if t.is_file() {
            n += 1;
        }
    }
    n
}

/// Attach a loop device over `file` (opened beneath its directory, as the session does) and
/// record it.
fn attach(stack: &mut Stack, file: &Path, read_only: bool) -> loopdev::Loop {
    let dir = ServerDir::open(file.parent().unwrap(), "server").unwrap();
    let f = dir
        .open_file(&file.file_name().unwrap().to_string_lossy(), read_only)
        .unwrap_or_else(|e| panic!("open: {e:#}"));
    loopdev::attach(stack, &f, file, read_only).unwrap_or_else(|e| panic!("attach: {e:#}"))
}

/// Mount the ext4 on `dev` at `fs` and record it.
fn mount_fs(stack: &mut Stack, dev: &Path, fs: &Path, read_only: bool) {
    mount::mount_ext4(stack, dev, fs, read_only).unwrap_or_else(|e| panic!("mount: {e:#}"));
}

/// Nothing of the stack is left: no mounts, no loop device, no sshfs process, no journal.
fn assert_all_gone(mnt: &Path, fs: &Path, dev: &Path, journal: &Path) {
    assert_eq!(mount::mounted_at(fs).unwrap(), None, "ext4 still mounted");
    assert_eq!(mount::mounted_at(mnt).unwrap(), None, "sshfs still mounted");
    assert_eq!(
        loopdev::backing_file(dev),
        None,
        "{} still attached",
        dev.display()
    );
    assert_eq!(
        sshfs::sshfs_process_for(mnt),
        None,
        "an sshfs process for {} is still running",
        mnt.display()
    );
    assert!(!journal.exists(), "journal {} left", journal.display());
}

fn free_blocks_used(fs: &Path) -> u64 {
    let v = nix::sys::statvfs::statvfs(fs).unwrap();
    (v.blocks() - v.blocks_free()) as u64 * v.fragment_size() as u64
}

// ---------------------------------------------------------------------------------------
// SSH preflight and host key pinning
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_ssh_preflight() {
    let sshd = Sshd::start();
    let p = sshd.load_profile("preflight", &[Path::new("/etc")]);
    let r = ssh::Remote::connect(&p.server)
        .unwrap_or_else(|e| panic!("connect: {e:#}\nsshd log:\n{}", sshd.log()));
    assert_eq!(r.label, format!("root@127.0.0.1:{}", sshd.port));

    let f = r
        .facts(&p.server.path, &p.remote_container())
        .unwrap_or_else(|e| panic!("facts: {e:#}"));
    assert!(
        f.fsync_supported,
        "OpenSSH internal-sftp advertises fsync@openssh.com"
    );
    let free = f
        .free_bytes
        .expect("free space from statvfs@openssh.com over SFTP");
    assert!(free > 0);
    // The same file system seen locally: within 10 % (other processes write meanwhile).
    let v = nix::sys::statvfs::statvfs(&sshd.server_dir()).unwrap();
    let local = v.blocks_available() as u64 * v.fragment_size() as u64;
    assert!(
        free.abs_diff(local) <= (local / 10).max(64 << 20),
        "statvfs@openssh.com says {free} bytes free, statvfs {local}"
    );
    assert_eq!(f.container_size, None, "no container yet");

    // The container appears (sparse, 5 MiB apparent size).
    sparse(&sshd.server_dir().join("test.luks"), 5 << 20);
    let f = r.facts(&p.server.path, &p.remote_container()).unwrap();
    assert_eq!(f.container_size, Some(5 << 20));
    let alloc = r
        .allocated_bytes(&p.remote_container())
        .expect("stat over ssh");
    assert!(alloc < 1 << 20, "sparse file allocated {alloc} bytes");

    // Remote commands run as the profile's user.
    let (code, out, _) = r.exec("id -u").unwrap();
    assert_eq!((code, out.trim()), (0, "0"));

    // A missing directory, and a file where the directory should be, are refused.
    let e = r
        .facts(&format!("{}/nope", p.server.path), "x")
        .expect_err("a missing server.path must fail");
    assert!(format!("{e:#}").contains("server directory"), "{e:#}");
    let e = r
        .facts(&p.remote_container(), "x")
        .expect_err("a file as server.path must fail");
    assert!(format!("{e:#}").contains("not a directory"), "{e:#}");
}

/// Issue 27 item 6: a remote command's output is read up to a bound (trim's probes), so a
/// server that answers with an endless stream is an error, not a client out of memory.
#[test]
#[ignore = "needs root (sshd on 127.0.0.1); run as root with --include-ignored, as CI does"]
fn host_remote_command_output_is_bounded() {
    let sshd = Sshd::start();
    let p = sshd.load_profile("bounded", &[Path::new("/etc")]);
    let r = ssh::Remote::connect(&p.server).unwrap();
    let (code, out, _) = r.exec("echo hello").unwrap();
    assert_eq!((code, out.as_str()), (0, "hello\n"));
    let e = r
        .exec(&format!("head -c {} /dev/zero", ssh::EXEC_OUTPUT_MAX + 1))
        .unwrap_err();
    assert!(format!("{e:#}").contains("wrote more than"), "{e:#}");
    // A flood on stderr is discarded, and stalls nothing.
    let (code, out, _) = r.exec("head -c 4000000 /dev/zero 1>&2; echo done").unwrap();
    assert_eq!((code, out.as_str()), (0, "done\n"));
}

#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_changed_host_key_refused() {
    let sshd = Sshd::start();
    // With a keyfile, so that `run` gets as far as the SSH preflight.
    let (_name, profile_path, p, _state) = sshd.keyed_profile("hostkey");

    // Sanity: the pinned key is accepted.
    ssh::Remote::connect(&p.server)
        .unwrap_or_else(|e| panic!("connect with the right key: {e:#}\n{}", sshd.log()));

    // ANOTHER ed25519 key pinned for this host:port = the server's key changed.
    let other = common::keygen(&sshd.path("other_key"), "impostor");
    std::fs::write(
        sshd.known_hosts(),
        format!("[127.0.0.1]:{} {other}\n", sshd.port),
    )
    .unwrap();
    let e = ssh::Remote::connect(&p.server)
        .err()
        .expect("a changed host key must be refused");
    assert_eq!(exit_for(&e), Exit::Security, "{e:#}");
    assert!(format!("{e:#}").contains("CHANGED"), "{e:#}");

    // Through the binary: validate --connect exits 6.
    let out = common::bin()
        .args(["validate", "--connect"])
        .arg(&profile_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", common::show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CHANGED"),
        "{}",
        common::show(&out)
    );

    // `run` refuses too (exit 6) and touches nothing on the server.
    let out = common::bin()
        .arg("run")
        .arg(&profile_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", common::show(&out));
    assert_eq!(
        std::fs::read_dir(sshd.server_dir()).unwrap().count(),
        0,
        "server directory touched"
    );
    assert!(!p.journal_path().exists());
    let last = e2ebackup::state::read_last_run(&p).expect("last run recorded");
    assert_eq!(last.exit_code, 6);
    assert_eq!(last.result, "refused for security");

    // sshfs (OpenSSH, StrictHostKeyChecking=yes) checks the same pin: no mount.
    let run = common::private_tempdir();
    let journal = run.path().join("undo.json");
    let mnt = run.path().join("server");
    let _guard = Recover::new(&journal);
    let mut stack = Stack::persistent(journal.clone(), "test").unwrap();
    // (sshfs only reports "read: Connection reset by peer": ssh's own message is lost,
    // which is why the session runs the libssh2 preflight first.)
    sshfs::mount(&mut stack, &p.server, &mnt).expect_err("sshfs must refuse a changed host key");
    assert_eq!(mount::mounted_at(&mnt).unwrap(), None);
    assert!(stack.unwind(&mut stack::Real).complete());

    // Nothing pinned for this host:port (the right key for another port does not count)
    // = unknown: refused as well, no trust on first use.
    for kh in [
        String::new(),
        "# nothing pinned\n".to_string(),
        format!(
            "[127.0.0.1]:{} {}\n",
            sshd.port.wrapping_add(1),
            sshd.host_key
        ),
    ] {
        std::fs::write(sshd.known_hosts(), &kh).unwrap();
        let e = ssh::Remote::connect(&p.server)
            .err()
            .unwrap_or_else(|| panic!("an unpinned key must be refused (known_hosts {kh:?})"));
        assert_eq!(exit_for(&e), Exit::Security, "{e:#}");
        assert!(format!("{e:#}").contains("not pinned"), "{e:#}");
    }
    let out = common::bin()
        .arg("run")
        .arg(&profile_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", common::show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not pinned"),
        "{}",
        common::show(&out)
    );
    assert_eq!(std::fs::read_dir(sshd.server_dir()).unwrap().count(), 0);
}

/// Issue 28, traps 3 and 4: an unpinned key is reported with the fingerprint `ssh-keygen -lf`
/// prints (`SHA256:base64`, not hex), and a plain `host` entry for a server on another port
/// than 22 is refused by `run` as by `validate` (OpenSSH's rule; libssh2's `check_port`
/// accepted it, and sshfs then failed).
#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_fingerprint_is_sha256_base64_and_port_rule_is_one() {
    let sshd = Sshd::start();
    let (_name, profile_path, p, _state) = sshd.keyed_profile("fprule");
    let keygen_fp = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(sshd.path("host_key.pub"))
        .output()
        .unwrap();
    let keygen_fp = String::from_utf8_lossy(&keygen_fp.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    assert!(keygen_fp.starts_with("SHA256:"), "{keygen_fp}");

    std::fs::write(sshd.known_hosts(), "# nothing\n").unwrap();
    let e = ssh::Remote::connect(&p.server).err().unwrap();
    assert!(
        format!("{e:#}").contains(&keygen_fp),
        "{e:#} lacks {keygen_fp}"
    );

    // The right key, but without the port.
    std::fs::write(sshd.known_hosts(), format!("127.0.0.1 {}\n", sshd.host_key)).unwrap();
    let e = ssh::Remote::connect(&p.server)
        .err()
        .expect("a plain entry for a non-22 port must be refused");
    assert_eq!(exit_for(&e), Exit::Security, "{e:#}");
    let want = format!("[127.0.0.1]:{}", sshd.port);
    assert!(format!("{e:#}").contains(&want), "{e:#}");
    let out = common::bin()
        .arg("validate")
        .arg(&profile_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", common::show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&want),
        "{}",
        common::show(&out)
    );
    let out = common::bin()
        .arg("run")
        .arg(&profile_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", common::show(&out));
    assert_eq!(std::fs::read_dir(sshd.server_dir()).unwrap().count(), 0);
}

/// A known_hosts file as Debian writes it (HashKnownHosts yes): hashed entries, one of them
/// for another host with an ECDSA key, and the backup server (which, like a stock server,
/// also has an ECDSA host key) pinned by its Ed25519 key. OpenSSH (and so sshfs) accepts
/// this; the libssh2 preflight must too (it once offered ECDSA first, the type of the OTHER
/// host's hashed line, got the server's ECDSA key and refused it as "CHANGED").
#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_hashed_known_hosts_of_other_hosts_do_not_break_pinning() {
    let sshd = Sshd::start_with(&["ecdsa"]);
    let p = sshd.load_profile("hashed", &[Path::new("/etc")]);
    let other = common::keygen_type(&sshd.path("other_ecdsa"), "ecdsa", "other");
    let plain = format!("otherhost.example {other}\n{}\n", sshd.known_hosts_line());
    let hashed_file = sshd.path("hashed_known_hosts");
    std::fs::write(&hashed_file, &plain).unwrap();
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-H", "-f"])
        .arg(&hashed_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::show(&out));
    let hashed = std::fs::read_to_string(&hashed_file).unwrap();
    assert!(hashed.lines().all(|l| l.starts_with("|1|")), "{hashed}");
    let other_hashed = hashed.lines().next().unwrap();

    // Sanity: OpenSSH accepts both files (sshfs would mount).
    for (what, kh) in [
        ("all hashed", hashed.clone()),
        (
            "another host hashed, ours plain",
            format!("{other_hashed}\n{}\n", sshd.known_hosts_line()),
        ),
    ] {
        std::fs::write(sshd.known_hosts(), &kh).unwrap();
        let out = std::process::Command::new("ssh")
            .args(["-F", "/dev/null", "-p", &sshd.port.to_string(), "-i"])
            .arg(sshd.path("client_key"))
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                sshd.known_hosts().display()
            ))
            .args([
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "root@127.0.0.1",
                "true",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "OpenSSH, {what}: {}",
            common::show(&out)
        );
        ssh::Remote::connect(&p.server)
            .unwrap_or_else(|e| panic!("libssh2 preflight, {what}: {e:#}"));
    }
}

// ---------------------------------------------------------------------------------------
// The stack: sshfs -> loop (direct I/O) -> ext4 -> snapshots
// ---------------------------------------------------------------------------------------

/// Regular files that the test leaves unchanged between the two snapshots.
const UNCHANGED: &[&str] = &[
    "a/keep.txt",
    "a/keep-link.txt",
    "owned",
    "big.bin",
    "xattr.txt",
    "acl.txt",
    "name with spaces",
    "ünïcødé",
    "private/secret",
];

fn build_source(s: &Path) {
    write(&s.join("a/keep.txt"), b"unchanged\n");
    std::fs::hard_link(s.join("a/keep.txt"), s.join("a/keep-link.txt")).unwrap();
    write(&s.join("a/change.txt"), b"version 1\n");
    write(&s.join("a/delete.txt"), b"going away\n");
    std::os::unix::fs::symlink("keep.txt", s.join("a/sym")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", s.join("dangling")).unwrap();
    std::fs::create_dir_all(s.join("empty")).unwrap();
    write(&s.join("owned"), b"owned by 1234:5678\n");
    nix::unistd::chown(&s.join("owned"), Some(1234.into()), Some(5678.into())).unwrap();
    // Several MiB that do not compress and cross many blocks of the loop device.
    write(
        &s.join("big.bin"),
        &common::noise(3 << 20, 0x9e37_79b9_7f4a_7c15),
    );
    write(&s.join("xattr.txt"), b"with an extended attribute\n");
    set_xattr(
        &s.join("xattr.txt"),
        "user.e2ebackup.test",
        b"value \x00\xff",
    );
    write(&s.join("acl.txt"), b"with an ACL\n");
    let out = std::process::Command::new("setfacl")
        .args(["-m", "u:1234:rw"])
        .arg(s.join("acl.txt"))
        .output()
        .expect("setfacl (package acl)");
    assert!(out.status.success(), "{}", common::show(&out));
    write(&s.join("name with spaces"), b"spaces\n");
    write(&s.join("ünïcødé"), b"utf-8 name\n");
    write(
        &s.join("private/secret"),
        b"mode 0600 in a 0700 directory\n",
    );
    std::fs::set_permissions(
        s.join("private/secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(s.join("private"), std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&s.join("private"), Some(1234.into()), Some(5678.into())).unwrap();
    // An old mtime, which rsync must keep.
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(s.join("a/keep.txt"))
        .unwrap()
        .set_modified(old)
        .unwrap();
}

#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_sshfs_loop_ext4_snapshots() {
    let sshd = Sshd::start();
    let src_dir = tempfile::tempdir().unwrap();
    let s = src_dir.path().join("src");
    build_source(&s);
    let p = sshd.load_profile("stack", &[&s]);

    let run = common::private_tempdir();
    let journal = run.path().join("undo.json");
    let mnt = run.path().join("server");
    let fs = run.path().join("fs");
    let _guard = Recover::new(&journal);
    let mut stack = Stack::persistent(journal.clone(), "test").unwrap();

    mount_server(&mut stack, &p, &mnt);
    let file = mnt.join(&p.container.file.0);
    sparse(&file, 256 << 20);
    let l = attach(&mut stack, &file, false);
    let dev = l.device.clone();
    assert_eq!(loopdev::backing_file(&dev).as_deref(), Some(file.as_path()));
    assert!(
        loopdev::direct_io(&dev),
        "the kernel refused direct I/O for the loop device over the sshfs (FUSE) file"
    );
    ext4::mkfs(&dev, "hosttest", 16384, 4 << 20).unwrap_or_else(|e| panic!("mkfs: {e:#}"));
    mount_fs(&mut stack, &dev, &fs, false);
    let m = mount::mounted_at(&fs).unwrap().expect("ext4 mounted");
    assert_eq!(
        (m.fstype.as_str(), m.source.as_str()),
        ("ext4", &*dev.to_string_lossy())
    );
    for opt in ["nodev", "nosuid", "noexec"] {
        assert!(
            m.options.split(',').any(|o| o == opt),
            "{opt} missing: {m:?}"
        );
    }
    snapshots::create_layout(&fs).unwrap();
    snapshots::check_layout(&fs).unwrap();
    assert_eq!(
        stack.records(),
        Journal::read(&journal).unwrap().unwrap().records.as_slice(),
        "the journal on disk mirrors the stack"
    );

    // First snapshot: a full copy.
    let t1 = snapshots::take(&p, &fs, Some(&dev), None, &[])
        .unwrap_or_else(|e| panic!("snapshot 1: {e:#}"));
    assert_eq!(t1.link_dest, None);
    assert!(!t1.vanished_files);
    let in_snap = |id: &str| {
        fs.join(snapshots::SNAPSHOTS)
            .join(id)
            .join(s.strip_prefix("/").unwrap())
    };
    let s1 = in_snap(&t1.id);
    assert_same_tree(&s, &s1);
    // The metadata read-ahead on the mounted filesystem's device (over sshfs): it finds the
    // inode tables and the snapshot's directories, and leaves the filesystem as it was.
    let ra = e2ebackup::stack::ext4::read_metadata(&dev, || Some(0), 1 << 30, 4, None, || false)
        .unwrap_or_else(|e| panic!("read_metadata: {e:#}"));
    assert!(ra.table_bytes > 0 && ra.directory_bytes > 0, "{ra:?}");
    assert_same_tree(&s, &s1);

    // Change one file, add one, delete one.
    write(&s.join("a/change.txt"), b"version 2, longer\n");
    write(&s.join("a/new.txt"), b"new\n");
    std::fs::remove_file(s.join("a/delete.txt")).unwrap();
    let used_before = free_blocks_used(&fs);
    let t2 = snapshots::take(&p, &fs, Some(&dev), None, &[t1.id.parse().unwrap()])
        .unwrap_or_else(|e| panic!("snapshot 2: {e:#}"));
    let used_after = free_blocks_used(&fs);
    assert_eq!(t2.link_dest.as_deref(), Some(t1.id.as_str()));
    assert_eq!(
        t2.files_transferred,
        Some(2),
        "only the changed and the new file are copied"
    );
    let s2 = in_snap(&t2.id);

    let ids: Vec<String> = snapshots::list(&fs)
        .unwrap()
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(ids, vec![t1.id.clone(), t2.id.clone()]);
    assert_eq!(
        std::fs::read_dir(fs.join(snapshots::PARTIAL))
            .unwrap()
            .count(),
        0,
        "nothing left under .partial"
    );
    // Both snapshots are complete trees; the second one equals the source now.
    assert_same_tree(&s, &s2);
    for rel in UNCHANGED {
        assert_eq!(
            ino(&s1.join(rel)),
            ino(&s2.join(rel)),
            "{rel}: unchanged, must be a hard link to the previous snapshot"
        );
    }
    assert_eq!(
        ino(&s2.join("a/keep.txt")),
        ino(&s2.join("a/keep-link.txt"))
    );
    assert_ne!(ino(&s1.join("a/change.txt")), ino(&s2.join("a/change.txt")));
    assert_eq!(
        std::fs::read(s1.join("a/change.txt")).unwrap(),
        b"version 1\n"
    );
    assert_eq!(
        std::fs::read(s2.join("a/change.txt")).unwrap(),
        b"version 2, longer\n"
    );
    assert!(s1.join("a/delete.txt").exists());
    assert!(!s2.join("a/delete.txt").exists());
    assert!(!s1.join("a/new.txt").exists());
    assert!(s2.join("a/new.txt").exists());
    let m = std::fs::metadata(s2.join("owned")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    assert!(
        used_after - used_before < 1 << 20,
        "the second snapshot used {} bytes; unchanged files must not be copied again",
        used_after - used_before
    );

    // The server stores a sparse file: its apparent size, far fewer allocated bytes.
    let server_file = sshd.server_dir().join(&p.container.file.0);
    let meta = std::fs::metadata(&server_file).unwrap();
    assert_eq!(meta.len(), 256 << 20);
    let alloc = meta.blocks() * 512;
    assert!(
        alloc < 64 << 20,
        "container must stay sparse: {alloc} bytes allocated of 256 MiB"
    );

    // Unwind: ext4, loop device, sshfs, in that order.
    drop(l);
    let report = stack.unwind(&mut stack::Real);
    assert!(report.complete(), "{:?}", report.failed);
    assert_eq!(
        no_daemon(&report.done),
        vec![
            Undo::Unmount { target: fs.clone() },
            Undo::DetachLoop {
                device: dev.clone(),
                backing: file.clone()
            },
            Undo::UnmountSshfs {
                target: mnt.clone(),
                daemon: None,
            },
        ]
    );
    assert_all_gone(&mnt, &fs, &dev, &journal);

    // What reached the server is a consistent file system holding both snapshots.
    let mut stack = Stack::persistent(journal.clone(), "test").unwrap();
    mount_server(&mut stack, &p, &mnt);
    let l = attach(&mut stack, &file, true);
    let dev = l.device.clone();
    assert_eq!(
        ext4::check_readonly(&dev).unwrap_or_else(|e| panic!("e2fsck: {e:#}")),
        ext4::Fsck::Clean,
        "e2fsck -fn found errors after the teardown"
    );
    mount_fs(&mut stack, &dev, &fs, true);
    snapshots::check_layout(&fs).unwrap();
    let again: Vec<String> = snapshots::list(&fs)
        .unwrap()
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(again, ids);
    assert_same_tree(&s, &in_snap(&t2.id));

    // Restore's bulk read-ahead. A read-only loop device is buffered: it reads through the
    // container file's page cache on sshfs, which reading the file ahead fills.
    assert!(
        !loopdev::direct_io(&dev),
        "a read-only loop device is buffered"
    );
    let container = std::fs::File::open(&file).unwrap();
    // FIEMAP says where each file's bytes lie on the device: read there from the container
    // file (no LUKS here: offset 0), they are the file's bytes.
    for rel in ["big.bin", "a/change.txt", "a/keep.txt", "owned"] {
        let p = in_snap(&t2.id).join(rel);
        let data = std::fs::read(&p).unwrap();
        let extents = ext4::file_extents(&std::fs::File::open(&p).unwrap(), data.len() as u64)
            .unwrap_or_else(|e| panic!("FIEMAP {rel}: {e:#}"));
        let mut got = Vec::new();
        for (at, n) in extents {
            let mut b = vec![0u8; n as usize];
            std::os::unix::fs::FileExt::read_exact_at(&container, &mut b, at).unwrap();
            got.extend(b);
        }
        assert!(
            got == data,
            "{rel}: the bytes at its extents differ from the file"
        );
    }
    let snap2 = fs.join(snapshots::SNAPSHOTS).join(&t2.id);
    let warm = snapshots::Warm {
        container,
        offset: 0,
        device: dev.clone(),
        since: 0,
    };
    let roots = std::slice::from_ref(&snap2);
    let r = snapshots::warm_snapshot(roots, &warm, &snapshots::Pace::unbounded());
    assert_eq!(r.files, regular_files(&s), "{r:?}");
    assert!(r.bytes >= 3 << 20 && r.reads >= 1, "{r:?}");
    // Once rsync has ended nothing more is read.
    let over = snapshots::Pace::new(1 << 20, true);
    over.finish();
    assert_eq!(
        snapshots::warm_snapshot(roots, &warm, &over),
        snapshots::Warmed::default()
    );
    let target = tempfile::tempdir().unwrap();
    snapshots::copy_out(&snap2, &[], target.path(), Some(&warm), false)
        .unwrap_or_else(|e| panic!("copy_out: {e:#}"));
    assert_same_tree(&s, &target.path().join(s.strip_prefix("/").unwrap()));
    // restore's check: every restored file equals the manifest (rsync's checksums of what
    // it read from the source at backup time, or the previous manifest's for a link).
    e2ebackup::manifest::check_restore(&fs, &t2.id, target.path(), target.path(), &[])
        .unwrap_or_else(|e| panic!("check of a clean restore: {e:#}"));
    // Where big.bin's data lies in the container file (no LUKS here: the device's offset).
    let victim = in_snap(&t2.id).join("big.bin");
    let len = std::fs::metadata(&victim).unwrap().len();
    let extents = ext4::file_extents(&std::fs::File::open(&victim).unwrap(), len).unwrap();
    let at = extents[0].0 + 4321;
    drop(warm);
    drop(l);
    let report = stack.unwind(&mut stack::Real);
    assert!(report.complete(), "{:?}", report.failed);
    assert_all_gone(&mnt, &fs, &dev, &journal);

    // The server flips one byte of big.bin's data after its hash was taken.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&server_file)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 1], at).unwrap();
        f.sync_all().unwrap();
    }
    let mut stack = Stack::persistent(journal.clone(), "test").unwrap();
    mount_server(&mut stack, &p, &mnt);
    let l = attach(&mut stack, &file, true);
    let dev = l.device.clone();
    mount_fs(&mut stack, &dev, &fs, true);
    let target = tempfile::tempdir().unwrap();
    snapshots::copy_out(&snap2, &[], target.path(), None, false)
        .unwrap_or_else(|e| panic!("copy_out: {e:#}"));
    let err = e2ebackup::manifest::check_restore(&fs, &t2.id, target.path(), target.path(), &[])
        .expect_err("a flipped byte must be found");
    assert_eq!(exit_for(&err), Exit::Security, "{err:#}");
    assert!(format!("{err:#}").contains("1 file(s)"), "{err:#}");
    let r = e2ebackup::manifest::check_restored(
        target.path(),
        e2ebackup::manifest::open(&fs, &t2.id).unwrap().unwrap(),
        &[],
        4,
    )
    .unwrap();
    let rel = s.strip_prefix("/").unwrap().join("big.bin");
    assert_eq!(
        r.bad,
        vec![format!(
            "{}: content differs from the manifest",
            rel.display()
        )]
    );
    assert_eq!(r.checked as usize, regular_files(&s));
    // A subset without it checks clean.
    e2ebackup::manifest::check_restore(&fs, &t2.id, target.path(), target.path(), &[s.join("a")])
        .unwrap_or_else(|e| panic!("check of a subset: {e:#}"));
    drop(l);
    let report = stack.unwind(&mut stack::Real);
    assert!(report.complete(), "{:?}", report.failed);
    assert_all_gone(&mnt, &fs, &dev, &journal);
}

// ---------------------------------------------------------------------------------------
// The server lock, through sshfs
// ---------------------------------------------------------------------------------------

/// The sshfs mount is nosuid,nodev,noexec, refuses a server symlink out of the directory,
/// and its teardown waits for the daemon we recorded, not for a local user's look-alike.
#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_sshfs_options_and_a_look_alike_process() {
    let sshd = Sshd::start();
    let p = sshd.load_profile("sshfsopts", &[Path::new("/etc")]);
    let run = common::private_tempdir();
    let journal = run.path().join("undo.json");
    let mnt = run.path().join("server");
    let _guard = Recover::new(&journal);
    std::os::unix::fs::symlink("/etc/hostname", sshd.server_dir().join("planted")).unwrap();
    let mut stack = Stack::persistent(journal.clone(), "test").unwrap();
    mount_server(&mut stack, &p, &mnt);

    let m = mount::mounted_at(&mnt).unwrap().expect("mounted");
    let opts: Vec<&str> = m.options.split(',').collect();
    for o in ["nosuid", "nodev", "noexec"] {
        assert!(opts.contains(&o), "{o} missing from {}", m.options);
    }
    // contain_symlinks: the absolute link is refused, not resolved on the client.
    let e = std::fs::read(mnt.join("planted")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");

    // A look-alike: argv[0] "sshfs" and our mount point in its arguments.
    let mut fake = std::process::Command::new("bash")
        .args([
            "-c",
            &format!(
                "exec -a sshfs bash -c 'while :; do sleep 1; done' x {}",
                mnt.display()
            ),
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let Undo::UnmountSshfs {
        daemon: Some(daemon),
        ..
    } = stack.records()[0]
    else {
        panic!("no daemon recorded: {:?}", stack.records())
    };
    assert_ne!(daemon.pid, fake.id());
    let t = Instant::now();
    let report = stack.unwind(&mut stack::Real);
    assert!(report.complete(), "{:?}", report.failed);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    assert!(!daemon.is_running(), "sshfs {daemon:?} still runs");
    assert_eq!(mount::mounted_at(&mnt).unwrap(), None);
    assert_eq!(
        fake.try_wait().unwrap(),
        None,
        "the look-alike was signalled"
    );
    fake.kill().unwrap();
    fake.wait().unwrap();
}

#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_server_lock_over_sshfs() {
    let sshd = Sshd::start();
    let p = sshd.load_profile("lock", &[Path::new("/etc")]);
    let run = common::private_tempdir();
    let journal = run.path().join("undo.json");
    let mnt = run.path().join("server");
    let _guard = Recover::new(&journal);
    let mut stack = Stack::persistent(journal.clone(), "test").unwrap();
    mount_server(&mut stack, &p, &mnt);

    let n = p.server_lock_name();
    let sd = ServerDir::open(&mnt, "server").unwrap();
    let path = sd.local_path(&n);
    let on_server = sshd.server_dir().join(&n);
    let server_side = ServerDir::open(&sshd.server_dir(), "server's own view").unwrap();
    let read_on_server = || lock::read_server_lock(&server_side, &n).unwrap();

    // Taken: the file exists on the server with our record, readable only by its owner.
    let me = ServerLock::mine("run");
    lock::take_server_lock(&mut stack, &sd, &n, &me).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(read_on_server().as_ref(), Some(&me));
    let mode = std::fs::metadata(&on_server).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "lock file mode {mode:o}");

    // Another host's run is refused (exit 4), naming who holds it; the lock is unchanged.
    let mut other = ServerLock::mine("run");
    other.host = "other-host.example".into();
    let e = lock::acquire_server_lock(&sd, &n, &other).unwrap_err();
    assert_eq!(exit_for(&e), Exit::Locked, "{e:#}");
    let msg = format!("{e:#}");
    assert!(msg.contains(&lock::hostname()), "{msg}");
    assert!(msg.contains(&format!("pid {}", me.pid)), "{msg}");
    assert_eq!(read_on_server().as_ref(), Some(&me));

    // A second run on this host while ours is alive: not stale, refused as well.
    let e = lock::acquire_server_lock(&sd, &n, &ServerLock::mine("run")).unwrap_err();
    assert_eq!(exit_for(&e), Exit::Locked, "{e:#}");

    // Release with somebody else's token leaves the lock; with ours removes it; idempotent.
    lock::ensure_server_lock_released(&path, &other.token).unwrap();
    assert_eq!(read_on_server().as_ref(), Some(&me));
    lock::ensure_server_lock_released(&path, &me.token).unwrap();
    assert!(!on_server.exists());
    lock::ensure_server_lock_released(&path, &me.token).unwrap();

    // A stale lock of this host (the pid's start time differs: a recycled pid) is taken over.
    let mut stale = ServerLock::mine("run");
    stale.pid_start += 1;
    lock::acquire_server_lock(&sd, &n, &stale).unwrap();
    let fresh = ServerLock::mine("run");
    lock::take_server_lock(&mut stack, &sd, &n, &fresh)
        .unwrap_or_else(|e| panic!("takeover: {e:#}"));
    assert_eq!(read_on_server().as_ref(), Some(&fresh));
    // So is one from an earlier boot of this host.
    lock::ensure_server_lock_released(&path, &fresh.token).unwrap();
    let mut rebooted = ServerLock::mine("run");
    rebooted.boot_id = "00000000-0000-0000-0000-000000000000".into();
    lock::acquire_server_lock(&sd, &n, &rebooted).unwrap();
    lock::acquire_server_lock(&sd, &n, &fresh).unwrap_or_else(|e| panic!("takeover: {e:#}"));
    assert_eq!(read_on_server().as_ref(), Some(&fresh));
    lock::ensure_server_lock_released(&path, &fresh.token).unwrap();

    // Another host's lock is never broken, even when its pid means nothing here.
    let mut foreign = ServerLock::mine("run");
    foreign.host = "elsewhere.example".into();
    foreign.machine_id = "elsewhere-machine-id".into();
    foreign.pid = 999_999;
    foreign.pid_start = 1;
    lock::acquire_server_lock(&sd, &n, &foreign).unwrap();
    let e = lock::acquire_server_lock(&sd, &n, &ServerLock::mine("run")).unwrap_err();
    assert_eq!(exit_for(&e), Exit::Locked, "{e:#}");
    assert!(format!("{e:#}").contains("elsewhere.example"), "{e:#}");
    assert_eq!(read_on_server().as_ref(), Some(&foreign));
    lock::ensure_server_lock_released(&path, &foreign.token).unwrap();
    assert!(!on_server.exists());

    // Several clients race for a free lock: O_EXCL over SFTP lets exactly one win, and
    // nobody else goes on as if it held the lock.
    for round in 0..5 {
        let racers: Vec<ServerLock> = (0..6)
            .map(|i| {
                let mut l = ServerLock::mine("run");
                l.host = format!("racer-{round}-{i}.example");
                l
            })
            .collect();
        let results: Vec<anyhow::Result<()>> = std::thread::scope(|sc| {
            let hs: Vec<_> = racers
                .iter()
                .map(|l| sc.spawn(|| lock::acquire_server_lock(&sd, &n, l)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<&ServerLock> = racers
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(l, _)| l)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert_eq!(read_on_server().as_ref(), Some(winners[0]));
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(
                exit_for(r),
                Exit::Locked,
                "round {round}: a loser got {r:#}"
            );
        }
        lock::ensure_server_lock_released(&path, &winners[0].token).unwrap();
    }

    drop(sd); // an open directory descriptor keeps the mount busy
    let report = stack.unwind(&mut stack::Real);
    assert!(report.complete(), "{:?}", report.failed);
    assert!(!on_server.exists());
    assert_eq!(mount::mounted_at(&mnt).unwrap(), None);
    assert_eq!(sshfs::sshfs_process_for(&mnt), None);
    assert!(!journal.exists());
}

/// Two clients (two sshfs mounts of one server directory). Client B looks the lock file up
/// in the instant after client A created it and before A wrote its record, as B's own
/// O_EXCL create does when both start together; sshfs then caches the size 0 and B reads an
/// empty file. B must still be told "in use" (exit 4) and its teardown must leave A's lock
/// alone without failing (it once failed with exit 1, "not an e2ebackup lock file", and its
/// ReleaseServerLock undo with exit 5).
#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_server_lock_second_client_sees_lock_being_written() {
    let sshd = Sshd::start();
    let p = sshd.load_profile("twoclients", &[Path::new("/etc")]);
    let run = common::private_tempdir();
    let journal = run.path().join("undo.json");
    let (ma, mb) = (run.path().join("a"), run.path().join("b"));
    let _guard = Recover::new(&journal);
    let mut stack = Stack::persistent(journal.clone(), "test").unwrap();
    mount_server(&mut stack, &p, &ma);
    mount_server(&mut stack, &p, &mb);
    let n = p.server_lock_name();
    let (da, db) = (
        ServerDir::open(&ma, "a").unwrap(),
        ServerDir::open(&mb, "b").unwrap(),
    );
    let (pa, pb) = (da.local_path(&n), db.local_path(&n));

    // A: created, not yet written. B: looks it up.
    let a = ServerLock::mine("run");
    let mut fa = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&pa)
        .unwrap();
    let _ = std::fs::metadata(&pb);
    // A: writes its record.
    std::io::Write::write_all(&mut fa, &serde_json::to_vec_pretty(&a).unwrap()).unwrap();
    fa.sync_all().unwrap();
    drop(fa);

    let mut b = ServerLock::mine("run");
    b.host = "client-b.example".into();
    b.machine_id = "client-b-machine-id".into();
    let r = lock::acquire_server_lock(&db, &n, &b);
    let released = lock::ensure_server_lock_released(&pb, &b.token);
    let after = lock::read_server_lock(&da, &n);
    let _ = lock::ensure_server_lock_released(&pa, &a.token);
    drop((da, db)); // open directory descriptors keep the mounts busy
    let report = stack.unwind(&mut stack::Real);
    assert!(report.complete(), "{:?}", report.failed);

    let e = r.expect_err("B must not get the lock");
    assert_eq!(exit_for(&e), Exit::Locked, "B: {e:#}");
    released.unwrap_or_else(|e| panic!("B's teardown: {e:#}"));
    assert_eq!(after.unwrap(), Some(a), "A's lock must survive B");
}

// ---------------------------------------------------------------------------------------
// A process killed with SIGKILL, recovered from its journal alone
// ---------------------------------------------------------------------------------------

const CHILD_RUN: &str = "E2EB_TEST_KILLED_RUN_DIR";
const CHILD_PROFILE: &str = "E2EB_TEST_KILLED_PROFILE";
const MARKER: &[u8] = b"written just before SIGKILL\n";

/// Not a test of its own: the process that `host_killed_run_journal_recovered` starts and
/// that kills itself with SIGKILL once the stack is up.
#[test]
#[ignore = "helper process of host_killed_run_journal_recovered"]
fn host_killed_run_child() {
    let (Some(run), Some(profile)) = (std::env::var_os(CHILD_RUN), std::env::var_os(CHILD_PROFILE))
    else {
        eprintln!("host_killed_run_child does nothing unless started by host_killed_run_journal_recovered");
        return;
    };
    let run = PathBuf::from(run);
    let p = Profile::load(Path::new(&profile)).unwrap();
    let (mnt, fs) = (run.join("server"), run.join("fs"));
    // Exactly what a session does: journal first, then each resource after its record.
    let mut stack = Stack::persistent(run.join("undo.json"), "run").unwrap();
    mount_server(&mut stack, &p, &mnt);
    let file = mnt.join(&p.container.file.0);
    sparse(&file, 128 << 20);
    let l = attach(&mut stack, &file, false);
    ext4::mkfs(&l.device, "killed", 16384, 4 << 20).unwrap();
    mount_fs(&mut stack, &l.device, &fs, false);
    snapshots::create_layout(&fs).unwrap();
    // Dirty data in the page cache: unmounting after the kill must still write it.
    std::fs::write(fs.join("marker"), MARKER).unwrap();
    std::fs::write(run.join("ready"), l.device.as_os_str().as_bytes()).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL).unwrap();
    unreachable!("SIGKILL");
}

#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_killed_run_journal_recovered() {
    let sshd = Sshd::start();
    let profile_path = sshd.profile("killed", &[Path::new("/etc")]);
    let p = Profile::load(&profile_path).unwrap();
    let run = common::private_tempdir();
    let journal = run.path().join("undo.json");
    let (mnt, fs) = (run.path().join("server"), run.path().join("fs"));
    let file = mnt.join(&p.container.file.0);
    let _guard = Recover::new(&journal);

    // The child builds the stack and dies by SIGKILL: no destructor, no unwinding.
    let log_path = run.path().join("child.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "host_killed_run_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_RUN, run.path())
        .env(CHILD_PROFILE, &profile_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let child_pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the child did not finish in time:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let child_log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "child: {status:?}\n{child_log}"
    );
    let dev = PathBuf::from(
        std::fs::read_to_string(run.path().join("ready"))
            .unwrap_or_else(|e| panic!("child not ready ({e}):\n{child_log}")),
    );

    // Everything outlived the process.
    let m = mount::mounted_at(&fs).unwrap().expect("ext4 still mounted");
    assert_eq!(
        (m.fstype.as_str(), m.source.as_str()),
        ("ext4", &*dev.to_string_lossy())
    );
    assert_eq!(
        mount::mounted_at(&mnt).unwrap().map(|m| m.fstype),
        Some("fuse.sshfs".to_string())
    );
    assert_eq!(loopdev::backing_file(&dev).as_deref(), Some(file.as_path()));
    assert!(sshfs::sshfs_process_for(&mnt).is_some());

    // The journal alone says what to undo.
    let j = Journal::read(&journal)
        .unwrap()
        .expect("journal written before each step");
    assert_eq!(j.pid, child_pid);
    assert_eq!(j.command, "run");
    assert!(!j.persistent);
    let Undo::UnmountSshfs {
        daemon: Some(daemon),
        ..
    } = j.records[0]
    else {
        panic!("the journal names the sshfs daemon: {:?}", j.records)
    };
    assert!(daemon.is_running(), "{daemon:?} outlived the killed run");
    let expected = vec![
        Undo::UnmountSshfs {
            target: mnt.clone(),
            daemon: Some(daemon),
        },
        Undo::DetachLoop {
            device: dev.clone(),
            backing: file.clone(),
        },
        Undo::Unmount { target: fs.clone() },
    ];
    assert_eq!(j.records, expected);
    let mut recovered = Stack::adopt(journal.clone(), j);
    let report = recovered.unwind(&mut stack::Real);
    assert!(report.complete(), "{:?}", report.failed);
    let mut reversed = expected;
    reversed.reverse();
    assert_eq!(report.done, reversed);
    assert_all_gone(&mnt, &fs, &dev, &journal);

    // Nothing was lost: the data written just before the kill is in the container.
    let mut stack = Stack::persistent(journal.clone(), "test").unwrap();
    mount_server(&mut stack, &p, &mnt);
    let l = attach(&mut stack, &file, true);
    let dev2 = l.device.clone();
    assert_eq!(
        ext4::check_readonly(&dev2).unwrap(),
        ext4::Fsck::Clean,
        "e2fsck -fn found errors"
    );
    mount_fs(&mut stack, &dev2, &fs, true);
    assert_eq!(std::fs::read(fs.join("marker")).unwrap(), MARKER);
    drop(l);
    let report = stack.unwind(&mut stack::Real);
    assert!(report.complete(), "{:?}", report.failed);
    assert_all_gone(&mnt, &fs, &dev2, &journal);
}

/// `run` through the binary up to the first step after the SSH preflight and the sshfs
/// mount, which the session does at the same time (two handshakes at once): with no
/// container the preflight's usage error comes after the mount was made (a client without
/// its pinned keys is refused before either starts), and with a
/// container that is not LUKS the error is the LUKS layer's, so both had succeeded. Either
/// way nothing stays mounted, the undo journal is gone and the server directory holds what
/// it held (the server lock is removed again).
#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_run_preflight_and_sshfs_together_leave_nothing() {
    let sshd = Sshd::start();
    let (_name, profile_path, p, _state) = sshd.keyed_profile("together");
    let run = || {
        let out = common::bin()
            .args(["-v", "run"])
            .arg(&profile_path)
            .output()
            .unwrap();
        assert_eq!(
            mount::mounted_at(&p.sshfs_dir()).unwrap(),
            None,
            "sshfs left mounted\n{}",
            common::show(&out)
        );
        assert!(!p.journal_path().exists(), "{}", common::show(&out));
        out
    };

    // No pinned keys on the client: a usage error before either handshake starts.
    let kh = sshd.known_hosts();
    let away = kh.with_extension("away");
    std::fs::rename(&kh, &away).unwrap();
    let out = run();
    std::fs::rename(&away, &kh).unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", common::show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.known_hosts") && !err.contains("with sshfs"),
        "{}",
        common::show(&out)
    );

    let out = run();
    assert_eq!(out.status.code(), Some(2), "{}", common::show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no container"), "{}", common::show(&out));
    assert!(
        err.contains("with sshfs"),
        "the mount ran beside the preflight\n{}",
        common::show(&out)
    );
    assert!(
        sshd.server_entries().is_empty(),
        "{:?}",
        sshd.server_entries()
    );

    sparse(&sshd.server_dir().join("test.luks"), 8 << 20);
    let out = run();
    assert_ne!(out.status.code(), Some(0), "{}", common::show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unlocking") && err.contains("LUKS"),
        "the run got past the preflight and the mount to the LUKS step\n{}",
        common::show(&out)
    );
    // A header that cannot be read pins nothing, and says nothing of pinning.
    assert!(!p.header_backup().exists(), "{}", common::show(&out));
    assert!(!err.contains("pinned it"), "{}", common::show(&out));
    assert_eq!(
        sshd.server_entries(),
        ["test.luks"],
        "the server lock is removed"
    );
}
