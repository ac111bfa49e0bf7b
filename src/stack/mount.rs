//! Mounting and unmounting, and reading the kernel's mount table.
//!
//! Unmounting is idempotent (nothing mounted = done) and retries on EBUSY for a while,
//! because a just-exited rsync or a process that still has a file open keeps the mount
//! busy for a moment. It never unmounts lazily: a lazy unmount would let us close the
//! LUKS mapping under a filesystem that still has dirty data. It never removes a mount
//! point recursively either.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sys_mount::{Mount, MountFlags, UnmountFlags};

use crate::teardown::{Stack, Undo};

/// One line of /proc/self/mountinfo, the fields we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
    pub options: String,
    /// The filesystem's own options (after the source): a FUSE mount's `user_id=` is its owner.
    pub super_options: String,
}

/// Undo the octal escapes (`\040` for space) of /proc/self/mountinfo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some(MountEntry {
                target: PathBuf::from(unescape(pre.get(4)?)),
                options: pre.get(5)?.to_string(),
                fstype: post.first()?.to_string(),
                source: unescape(post.get(1)?),
                super_options: post.get(2).map(|o| o.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

pub fn mounts() -> Result<Vec<MountEntry>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at exactly `target`, if any.
pub fn mounted_at(target: &Path) -> Result<Option<MountEntry>> {
    Ok(mounts()?.into_iter().rev().find(|m| m.target == target))
}

/// The device number (`major:minor` of /proc/self/mountinfo) of the topmost mount at
/// `target`, if any: a FUSE mount's fusectl directory is named by it.
pub fn device_of(target: &Path) -> Result<Option<(u32, u32)>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text.lines().rev().find_map(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        if Path::new(&unescape(f.get(4)?)) != target {
            return None;
        }
        let (ma, mi) = f.get(2)?.split_once(':')?;
        Some((ma.parse().ok()?, mi.parse().ok()?))
    }))
}

/// Mount an ext4 filesystem at `target` (created if missing), recorded in `stack`.
/// `nodev,nosuid,noexec`: the container's content is only ever data to copy, never
/// something to execute or a device to open. `noinit_itable`: after a grow, do not let
/// ext4lazyinit zero new inode tables across the network in the background.
pub fn mount_ext4(stack: &mut Stack, device: &Path, target: &Path, read_only: bool) -> Result<()> {
    mount_ext4_with(stack, device, target, read_only, false)
}

const EXT4_FLAGS: MountFlags = MountFlags::NODEV
    .union(MountFlags::NOSUID)
    .union(MountFlags::NOEXEC)
    .union(MountFlags::NOATIME);
const EXT4_DATA: &str = "noinit_itable,errors=remount-ro";

/// [`mount_ext4`], read-only with `noload` when asked: the journal is neither replayed nor
/// read, so a filesystem whose journal needs recovery mounts on a read-only device (without
/// it the kernel refuses: "cannot mount read-only", EROFS). What the unreplayed journal holds
/// (the interrupted run's last transactions) is not visible.
pub fn mount_ext4_with(
    stack: &mut Stack,
    device: &Path,
    target: &Path,
    read_only: bool,
    noload: bool,
) -> Result<()> {
    std::fs::create_dir_all(target)
        .with_context(|| format!("creating the mount point {}", target.display()))?;
    stack.push(Undo::Unmount {
        target: target.to_path_buf(),
    })?;
    let mut flags = EXT4_FLAGS;
    if read_only || noload {
        flags |= MountFlags::RDONLY;
    }
    let data = if noload {
        format!("noload,{EXT4_DATA}")
    } else {
        EXT4_DATA.to_string()
    };
    Mount::builder()
        .fstype("ext4")
        .flags(flags)
        .data(&data)
        .mount(device, target)
        .with_context(|| {
            format!(
                "mounting {} on {}{}",
                device.display(),
                target.display(),
                if noload { " (ro,noload)" } else { "" }
            )
        })?;
    Ok(())
}

/// What tells one mount from another, whatever path it is reached by: the kernel's mount
/// id (reused once the mount is gone) with the device and inode of the mount's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountIdentity {
    pub mnt_id: u64,
    pub dev: u64,
    pub ino: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_EMPTY_PATH: libc::c_uint = 0x1000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x01;
const MOUNT_ATTR_NOSUID: u64 = 0x02;
const MOUNT_ATTR_NODEV: u64 = 0x04;
const MOUNT_ATTR_NOEXEC: u64 = 0x08;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn sys_result(r: libc::c_long, what: impl FnOnce() -> String) -> Result<libc::c_long> {
    if r < 0 {
        return Err(std::io::Error::last_os_error()).with_context(what);
    }
    Ok(r)
}

/// The identity of the mount `fd` lies on, and of the inode it names (statx).
pub fn identity_of(fd: BorrowedFd<'_>) -> Result<MountIdentity> {
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx writes into a struct statx that outlives the call.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_INO | libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("statx");
    }
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        bail!("the kernel does not report mount ids (statx STATX_MNT_ID, Linux 5.8+)");
    }
    Ok(MountIdentity {
        mnt_id: stx.stx_mnt_id,
        dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
    })
}

/// Bind `source` read-only (`nodev,nosuid,noexec`) onto the directory `target` holds,
/// recorded in `stack` by the mount's identity: how `e2ebackup mount` shows the snapshots.
/// The new mount API acts on descriptors: `open_tree(OPEN_TREE_CLONE)` makes a detached
/// copy of `source`, `mount_setattr` makes it read-only before anyone can see it, and
/// `move_mount(MOVE_MOUNT_T_EMPTY_PATH)` attaches it to the held directory itself, so no
/// path is resolved after the target was opened (a swap of DIR for a link changes nothing).
pub fn bind_readonly_held(
    stack: &mut Stack,
    source: &Path,
    target: &crate::fsutil::HeldDir,
) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let src = std::ffi::CString::new(source.as_os_str().as_bytes())?;
    // SAFETY: open_tree reads a NUL-terminated path and returns a new descriptor.
    let tree = sys_result(
        unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                src.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            )
        },
        || format!("open_tree {} (Linux 5.2+)", source.display()),
    )?;
    // SAFETY: the kernel just returned this descriptor, and nothing else owns it; dropping it
    // unmounts the detached copy if it was never attached.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as RawFd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr reads a struct mount_attr of the size given.
    sys_result(
        unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                c"".as_ptr(),
                AT_EMPTY_PATH,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        },
        || {
            format!(
                "making the bind of {} read-only (mount_setattr, Linux 5.12+)",
                source.display()
            )
        },
    )?;
    let id = identity_of(tree.as_fd())?;
    stack.push(Undo::UnmountHeld {
        target: target.shown().to_path_buf(),
        id,
    })?;
    // SAFETY: move_mount takes two descriptors and two empty NUL-terminated paths.
    sys_result(
        unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                c"".as_ptr(),
                target.fd().as_raw_fd(),
                c"".as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
            )
        },
        || {
            format!(
                "attaching the snapshots at {} (move_mount)",
                target.shown().display()
            )
        },
    )?;
    Ok(())
}

/// Where the mount with id `mnt_id` is now (its line of /proc/self/mountinfo), if it exists.
pub fn path_of_mount_id(mnt_id: u64) -> Result<Option<PathBuf>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(' ').collect();
        if f.first()?.parse::<u64>().ok()? != mnt_id {
            return None;
        }
        Some(PathBuf::from(unescape(f.get(4)?)))
    }))
}

/// Ensure the mount `id` (made by [`bind_readonly_held`], shown at `shown`) is gone: found
/// by its id in the mount table, wherever it is now. The directory holding its mount point
/// is opened without following a link, the mount point's identity is read beneath it
/// (statx: mount id, device, inode of the mount's root), and only if it is ours is it
/// unmounted, through `/proc/self/fd/PARENT/NAME` with `UMOUNT_NOFOLLOW`: a mount point
/// can be neither renamed nor removed, so that name is the mount that was checked. (A
/// descriptor of the mount itself would keep it busy.) A mount of that id that is
/// something else (the id was reused after ours went) is not ours: done. One mounted over
/// ours is an error naming it.
pub fn ensure_unmounted_held(shown: &Path, id: &MountIdentity) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let Some(at) = path_of_mount_id(id.mnt_id)? else {
            return Ok(());
        };
        let (Some(parent), Some(name)) = (at.parent(), at.file_name()) else {
            bail!(
                "mount {} is at {}: not ours to unmount",
                id.mnt_id,
                at.display()
            );
        };
        let how = nix::fcntl::OpenHow::new()
            .flags(
                nix::fcntl::OFlag::O_PATH
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_CLOEXEC,
            )
            .resolve(
                nix::fcntl::ResolveFlag::RESOLVE_NO_SYMLINKS
                    | nix::fcntl::ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        let dir = match nix::fcntl::openat2(nix::fcntl::AT_FDCWD, parent, how) {
            Ok(fd) => fd,
            // Moved meanwhile: look it up again.
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ELOOP)
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "opening {} (where mount {} is)",
                        parent.display(),
                        id.mnt_id
                    )
                })
            }
        };
        let cname = std::ffi::CString::new(name.as_bytes())?;
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: statx writes into a struct statx that outlives the call.
        let r = unsafe {
            libc::statx(
                dir.as_raw_fd(),
                cname.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                libc::STATX_INO | libc::STATX_MNT_ID,
                &mut stx,
            )
        };
        if r < 0 {
            if Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("examining {}", at.display()));
        }
        let found = MountIdentity {
            mnt_id: stx.stx_mnt_id,
            dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
            ino: stx.stx_ino,
        };
        if found.mnt_id != id.mnt_id {
            if path_of_mount_id(id.mnt_id)?.as_deref() != Some(at.as_path()) {
                continue; // moved between the two looks
            }
            bail!(
                "{} (the snapshots shown at {}) has another mount over it (id {}); unmount that \
                 first",
                at.display(),
                shown.display(),
                found.mnt_id
            );
        }
        if found != *id {
            // The id was given to another mount after ours went away.
            return Ok(());
        }
        let mut via = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        via.extend_from_slice(name.as_bytes());
        let via = std::ffi::CString::new(via)?;
        // UMOUNT_NOFOLLOW from libc: sys-mount's UnmountFlags::NOFOLLOW is O_NOFOLLOW, which
        // umount2 refuses (EINVAL).
        // SAFETY: umount2 reads a NUL-terminated path.
        let r = unsafe { libc::umount2(via.as_ptr(), libc::UMOUNT_NOFOLLOW) };
        let r = if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        };
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => bail!(
                "unmounting {}: {e} (see `fuser -vm {}`)",
                at.display(),
                at.display()
            ),
        }
    }
}

/// Remount the ext4 at `target` with the options it was mounted with, read-only or
/// read-write: read-write after the read-only checks; read-only as the last step before its
/// unmount ([`ensure_unmounted`]).
///
/// Read-only before the unmount: the remount syncs and checkpoints the journal once, and
/// the unmount of the read-only filesystem then writes nothing. umount(2) of a read-write
/// ext4 does the same work with 9-11 flushes and 8-10 writes on its device, where this
/// takes 5-7 and 5-7 (a loop device, kernel 6.18; tests/host_crash_noload.rs counts them):
/// ext4's unmount syncs the filesystem once more for each of the three quota types, quota
/// or not. On the container each flush is a round trip to the server and its fsync.
pub fn remount_ext4(target: &Path, read_only: bool) -> Result<()> {
    let mut flags = EXT4_FLAGS | MountFlags::REMOUNT;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    Mount::builder()
        .fstype("ext4")
        .flags(flags)
        .data(EXT4_DATA)
        .mount("none", target)
        .with_context(|| {
            format!(
                "remounting {} {}",
                target.display(),
                if read_only { "read-only" } else { "read-write" }
            )
        })?;
    Ok(())
}

/// Ensure nothing is mounted at `target`: unmount (retrying while busy), no-op if not
/// mounted. A read-write ext4 is made read-only first ([`remount_ext4`]); if that fails
/// (a file still open for writing), the unmount does the same work itself.
pub fn ensure_unmounted(target: &Path) -> Result<()> {
    if let Some(m) = mounted_at(target)? {
        if m.fstype == "ext4" && m.options.split(',').any(|o| o == "rw") {
            if let Err(e) = remount_ext4(target, true) {
                crate::debug!("{e:#}; unmounting it read-write");
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if mounted_at(target)?.is_none() {
            return Ok(());
        }
        match sys_mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    || e.raw_os_error() == Some(libc::ENOENT) =>
            {
                if mounted_at(target)?.is_none() {
                    return Ok(());
                }
                bail!("unmounting {}: {e}", target.display());
            }
            Err(e) => bail!(
                "unmounting {}: {e} (see `fuser -vm {}`)",
                target.display(),
                target.display()
            ),
        }
    }
}

/// Flush a mounted filesystem's dirty data and metadata to its device (syncfs(2)).
pub fn syncfs(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    nix::unistd::syncfs(&f).with_context(|| format!("syncfs {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let t = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext4 /dev/mapper/x\\040y rw,errors=continue\n\
                 40 35 0:44 / /run/e2ebackup/demo/server rw,nosuid,nodev shared:2 - fuse.sshfs backupuser@127.0.0.1:/srv/backup rw,user_id=0\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].target, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].source, "/dev/mapper/x y");
        assert_eq!(m[0].fstype, "ext4");
        assert_eq!(m[1].fstype, "fuse.sshfs");
        assert_eq!(m[1].source, "backupuser@127.0.0.1:/srv/backup");
    }

    /// `mount`'s bind by descriptor: the target is held, then swapped for a link to a victim
    /// directory; the snapshots appear in the original directory, read-only, the victim is
    /// untouched, and the undo finds the mount by its identity at its new path.
    #[test]
    #[ignore = "needs root: mounts (cargo test --release --lib -- --ignored bind_by_descriptor)"]
    fn bind_by_descriptor_ignores_a_swapped_path_and_unmounts_by_identity() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("snapshots");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), b"snap").unwrap();
        let target = d.path().join("mnt");
        std::fs::create_dir(&target).unwrap();
        let victim = d.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let held = crate::fsutil::HeldDir::open(&target, false, true).unwrap();
        std::fs::rename(&target, d.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        let mut stack = Stack::in_memory();
        bind_readonly_held(&mut stack, &src, &held).unwrap();
        let Some(Undo::UnmountHeld { id, .. }) = stack.records().last().cloned() else {
            panic!("{:?}", stack.records());
        };
        let moved = d.path().join("moved");
        assert_eq!(std::fs::read(moved.join("f")).unwrap(), b"snap");
        assert!(std::fs::read_dir(&victim).unwrap().next().is_none());
        assert!(mounted_at(&victim).unwrap().is_none());
        let m = mounted_at(&moved).unwrap().unwrap();
        assert!(m.options.split(',').any(|o| o == "ro"), "{m:?}");
        assert!(std::fs::write(moved.join("g"), b"x").is_err(), "read-only");
        assert_eq!(path_of_mount_id(id.mnt_id).unwrap(), Some(moved.clone()));
        // A mount point cannot be renamed (EBUSY), but a directory above it can: the undo
        // finds the mount where it is now, by its id.
        std::fs::rename(d.path(), d.path().with_extension("again")).unwrap();
        let again = d.path().with_extension("again").join("moved");
        assert_eq!(path_of_mount_id(id.mnt_id).unwrap(), Some(again.clone()));
        ensure_unmounted_held(&target, &id).unwrap();
        assert!(mounted_at(&again).unwrap().is_none());
        std::fs::rename(d.path().with_extension("again"), d.path()).unwrap();
        assert_eq!(path_of_mount_id(id.mnt_id).unwrap(), None);
        ensure_unmounted_held(&target, &id).unwrap();
        stack.unwind(&mut crate::stack::Real);
    }

    #[test]
    fn not_mounted_is_already_unmounted() {
        let d = tempfile::tempdir().unwrap();
        ensure_unmounted(d.path()).unwrap();
    }
}
