//! Loop devices, attached by ioctl: read-write with direct I/O, read-only buffered.
//!
//! Why not let cryptsetup attach the file itself: its automatic loop device is buffered, and
//! a buffered loop over a FUSE (sshfs) file degenerates into one 4 KiB FUSE write per page:
//! mkfs of 2 GiB took 280 s, against 15 s with LO_FLAGS_DIRECT_IO (FACTS.md, measured under
//! TCG). So a read-write device is attached with `LOOP_CONFIGURE` (Linux 5.8+) and
//! `LO_FLAGS_DIRECT_IO`, and sysfs is checked for the kernel having kept direct I/O on (it
//! silently drops it when unsupported).
//!
//! A read-only device (restore, mount, verify, snapshots) writes nothing, so the write
//! problem does not arise, and it is attached buffered: its reads go through the page cache
//! of the container file on sshfs. That is what lets a restore read the snapshot's file data
//! ahead in a few large parallel requests ([`crate::snapshots::Warm`]) instead of one round
//! trip per small file (docs/benchmarks.md, run 6). The cache belongs to this session's sshfs
//! mount and goes with it; what it holds is what the server sent during this session.
//!
//! `LO_FLAGS_AUTOCLEAR` is set as a backstop: if this process dies, the loop device detaches
//! itself as soon as its last user (the dm-crypt mapping, closed by `cleanup`) lets go. We
//! keep our own descriptor open for as long as the [`Loop`] lives so the device does not
//! vanish between libcryptsetup calls.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::teardown::{Stack, Undo};
use crate::warn;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device. Dropping it closes our descriptor only; detaching is the
/// teardown's job (`ensure_detached`), or autoclear's after a crash.
#[derive(Debug)]
pub struct Loop {
    pub device: PathBuf,
    /// Attached read-only, and so buffered (see the module documentation).
    pub read_only: bool,
    _fd: File,
}

fn sysfs_dir(device: &Path) -> PathBuf {
    let name = device
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    Path::new("/sys/block").join(name)
}

/// The file a loop device is attached to, if it is attached.
pub fn backing_file(device: &Path) -> Option<PathBuf> {
    let s = std::fs::read_to_string(sysfs_dir(device).join("loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n')))
}

/// Whether the kernel kept direct I/O on.
pub fn direct_io(device: &Path) -> bool {
    std::fs::read_to_string(sysfs_dir(device).join("loop/dio"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

/// Attach the open container `file` (read-write unless `read_only`), recorded in `stack`;
/// `backing` is its path, recorded as the loop's name. The file is opened by the caller
/// (beneath the server directory, without following links: [`crate::fsutil::ServerDir`])
/// and LOOP_CONFIGURE takes its descriptor, so no path is resolved here. `DetachLoop` is
/// pushed right after the kernel names the device; autoclear covers the instant in between.
pub fn attach(stack: &mut Stack, file: &File, backing: &Path, read_only: bool) -> Result<Loop> {
    let l = configure(file, backing, read_only)?;
    stack.push(Undo::DetachLoop {
        device: l.device.clone(),
        backing: backing.to_path_buf(),
    })?;
    Ok(l)
}

fn configure(file: &File, backing: &Path, read_only: bool) -> Result<Loop> {
    let ctl = File::open("/dev/loop-control")
        .context("opening /dev/loop-control (is the loop module loaded?)")?;
    for _attempt in 0..20 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("LOOP_CTL_GET_FREE");
        }
        let device = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(&device)
        {
            Ok(f) => f,
            // Without udev (minimal systems) the node may lag behind; try the next one.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", device.display())),
        };
        let mut name = [0u8; 64];
        let b = backing.as_os_str().as_encoded_bytes();
        let l = b.len().min(63);
        name[..l].copy_from_slice(&b[..l]);
        let flags = LO_FLAGS_AUTOCLEAR
            | if read_only {
                LO_FLAGS_READ_ONLY
            } else {
                LO_FLAGS_DIRECT_IO
            };
        let cfg = LoopConfig {
            fd: file.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: flags,
                lo_file_name: name,
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads a struct loop_config that outlives the call.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // Another process took this device between GET_FREE and CONFIGURE: retry.
            if e.raw_os_error() == Some(libc::EBUSY) {
                continue;
            }
            return Err(e).with_context(|| {
                format!(
                    "LOOP_CONFIGURE {} over {}",
                    device.display(),
                    backing.display()
                )
            });
        }
        if !read_only && !direct_io(&device) {
            warn!(
                "{}: the kernel refused direct I/O on {}; expect slow, buffered writes",
                device.display(),
                backing.display()
            );
        }
        return Ok(Loop {
            device,
            read_only,
            _fd: dev,
        });
    }
    bail!("no free loop device after 20 attempts (all busy)")
}

impl Loop {
    /// Re-read the backing file's size (after the container file grew).
    pub fn refresh_capacity(&self) -> Result<()> {
        // SAFETY: LOOP_SET_CAPACITY takes no argument.
        let r = unsafe { libc::ioctl(self._fd.as_raw_fd(), LOOP_SET_CAPACITY, 0) };
        if r < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("LOOP_SET_CAPACITY {}", self.device.display()));
        }
        Ok(())
    }
}

/// Ensure `device` no longer serves `backing`. A device now attached to another file was
/// reused by someone else after ours went away: not ours to touch.
pub fn ensure_detached(device: &Path, backing: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match backing_file(device) {
            None => return Ok(()),
            Some(b) if b != backing => return Ok(()),
            Some(_) => {}
        }
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(device)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", device.display())),
        };
        // SAFETY: LOOP_CLR_FD takes no argument.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD, 0) };
        drop(f);
        if r == 0 {
            // With other openers left, the kernel defers the detach (autoclear); wait for it.
            std::thread::sleep(Duration::from_millis(50));
            if backing_file(device).is_none() || Instant::now() > deadline {
                return match backing_file(device) {
                    None => Ok(()),
                    Some(_) => bail!(
                        "{} is still attached (held open by another process?)",
                        device.display()
                    ),
                };
            }
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => return Ok(()),
            Some(libc::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            _ => return Err(e).with_context(|| format!("detaching {}", device.display())),
        }
    }
}

/// All loop devices currently attached to `backing`.
pub fn devices_for(backing: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("loop") {
                let dev = PathBuf::from(format!("/dev/{name}"));
                if backing_file(&dev).as_deref() == Some(backing) {
                    v.push(dev);
                }
            }
        }
    }
    v
}
