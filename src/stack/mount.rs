//! Mounting and unmounting, and reading the kernel's mount table.
//!
//! Unmounting is idempotent (nothing mounted = done) and retries on EBUSY for a while,
//! because a just-exited rsync or a process that still has a file open keeps the mount
//! busy for a moment. It never unmounts lazily: a lazy unmount would let us close the
//! LUKS mapping under a filesystem that still has dirty data. It never removes a mount
//! point recursively either.

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

/// Bind `source` at `target` read-only (`nodev,nosuid,noexec`), recorded in `stack`: how
/// `e2ebackup mount` shows the snapshots.
pub fn bind_readonly(stack: &mut Stack, source: &Path, target: &Path) -> Result<()> {
    stack.push(Undo::Unmount {
        target: target.to_path_buf(),
    })?;
    Mount::builder()
        .flags(MountFlags::BIND)
        .mount(source, target)
        .with_context(|| format!("bind-mounting {} at {}", source.display(), target.display()))?;
    // A bind mount takes its flags only from a second, remounting call.
    Mount::builder()
        .flags(
            MountFlags::BIND
                | MountFlags::REMOUNT
                | MountFlags::RDONLY
                | MountFlags::NODEV
                | MountFlags::NOSUID
                | MountFlags::NOEXEC,
        )
        .mount("none", target)
        .with_context(|| format!("making {} read-only", target.display()))?;
    Ok(())
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

    #[test]
    fn not_mounted_is_already_unmounted() {
        let d = tempfile::tempdir().unwrap();
        ensure_unmounted(d.path()).unwrap();
    }
}
