//! Files the tool touches, opened so that nobody else can choose what they are.
//!
//! Two kinds of directory are not ours alone:
//!
//! - **The server directory** (through sshfs). The server is an attacker: it can plant a
//!   symlink where the container, the lock or the escrow should be (`-> /etc/shadow`,
//!   `-> /dev/sda`), a FIFO (a read that never ends), or a device node. Debian's sshfs refuses
//!   links that leave the mount (`contain_symlinks`), but older builds resolve them against
//!   the CLIENT's root, and links that stay inside are followed by every build. So
//!   [`ServerDir`] holds a descriptor of the mounted directory and opens every name beneath
//!   it with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//!   RESOLVE_NO_XDEV)`, after an `fstatat(AT_SYMLINK_NOFOLLOW)` that names what was found;
//!   the descriptor is checked again with `fstat` (a regular file, nothing else). Names are
//!   single path components. Anything else is a [`Failure::Security`] (exit 6) that names the
//!   server path, raised before anything is written. Reads are bounded in size.
//! - **Local shared directories.** Our state lives only in root-owned 0700 directories
//!   ([`private_dir`]): created with mode 0700, or, when they exist, verified by owner and
//!   mode with `lstat` (a link is never followed); an ancestor that someone else could write
//!   without the sticky bit is refused too. Files in them are replaced atomically
//!   ([`write_atomic`]: temporary file, fsync, rename, fsync of the directory), so a crash
//!   leaves the old or the new content, never an empty file.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::error::Failure;

/// What a directory entry is, in words for a message.
pub fn kind_word(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => "regular file",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFLNK => "symbolic link",
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFSOCK => "socket",
        _ => "file of unknown type",
    }
}

fn is_regular(mode: u32) -> bool {
    mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits()
}

/// A name that must be one path component (no `/`, not `.` or `..`, not empty).
pub fn check_component(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        bail!("`{name}` is not a plain file name");
    }
    Ok(())
}

/// The server directory, held open: every name is resolved beneath this descriptor.
#[derive(Debug)]
pub struct ServerDir {
    fd: OwnedFd,
    /// Where it is mounted on the client (for paths handed to other programs).
    local: PathBuf,
    /// How a person names it on the server (`host:/path`).
    shown: String,
}

/// Flags every open beneath the server directory uses.
fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_NO_XDEV
}

impl ServerDir {
    /// Open the mounted server directory `local`, shown in messages as `shown`.
    pub fn open(local: &Path, shown: &str) -> Result<ServerDir> {
        let fd = nix::fcntl::open(
            local,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| {
            format!(
                "opening the server directory {shown} at {}",
                local.display()
            )
        })?;
        Ok(ServerDir {
            fd,
            local: local.to_path_buf(),
            shown: shown.trim_end_matches('/').to_string(),
        })
    }

    /// The client-side path of `name` (for messages and for programs that need a path).
    pub fn local_path(&self, name: &str) -> PathBuf {
        self.local.join(name)
    }

    /// `host:/dir/name`, as the server's administrator would look for it.
    pub fn shown(&self, name: &str) -> String {
        format!("{}/{name}", self.shown)
    }

    fn planted(&self, name: &str, what: &str) -> anyhow::Error {
        Failure::Security(format!(
            "{} on the server is a {what}, not a regular file: e2ebackup does not follow or open \
             such entries, and nothing was written. The server (or someone with access to it) \
             put it there; remove it on the server after finding out why",
            self.shown(name)
        ))
        .into()
    }

    /// `lstat` of `name`: None when absent; an error (exit 6) when it is anything but a
    /// regular file.
    pub fn stat(&self, name: &str) -> Result<Option<FileStat>> {
        check_component(name)?;
        match nix::sys::stat::fstatat(self.fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if is_regular(st.st_mode) => Ok(Some(st)),
            Ok(st) => Err(self.planted(name, kind_word(st.st_mode))),
            Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("examining {}", self.shown(name))),
        }
    }

    /// The size of the regular file `name`, None when absent.
    pub fn len(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.stat(name)?.map(|st| st.st_size as u64))
    }

    fn open_how(&self, name: &str, flags: OFlag, mode: u32) -> Result<File> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
            .mode(Mode::from_bits_truncate(mode))
            .resolve(beneath());
        let fd = match nix::fcntl::openat2(self.fd.as_fd(), name, how) {
            Ok(fd) => fd,
            // ELOOP: a link (RESOLVE_NO_SYMLINKS), EXDEV: a way out (RESOLVE_BENEATH).
            Err(nix::errno::Errno::ELOOP) => return Err(self.planted(name, "symbolic link")),
            Err(nix::errno::Errno::EXDEV) => {
                return Err(self.planted(name, "path leading outside the directory"))
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.shown(name))),
        };
        let f = File::from(fd);
        let md = f
            .metadata()
            .with_context(|| format!("examining {}", self.shown(name)))?;
        if !md.file_type().is_file() {
            return Err(self.planted(name, kind_word(md.mode())));
        }
        Ok(f)
    }

    /// Open the existing regular file `name` (read-write unless `read_only`).
    pub fn open_file(&self, name: &str, read_only: bool) -> Result<File> {
        self.stat(name)?;
        // O_NONBLOCK: should a FIFO appear between the check and the open, the open returns
        // at once instead of waiting for a writer; fstat then refuses it. (It has no effect
        // on regular files.)
        let rw = if read_only {
            OFlag::O_RDONLY
        } else {
            OFlag::O_RDWR
        };
        self.open_how(name, rw | OFlag::O_NONBLOCK, 0)
    }

    /// Create `name`, which must not exist (O_EXCL: never follows a planted link).
    pub fn create_new(&self, name: &str) -> Result<File> {
        if self.stat(name)?.is_some() {
            bail!("{} already exists on the server", self.shown(name));
        }
        self.open_how(
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NONBLOCK,
            0o600,
        )
    }

    /// Read the regular file `name`, at most `max` bytes (more is an error); None if absent.
    pub fn read_bounded(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        if self.stat(name)?.is_none() {
            return Ok(None);
        }
        let f = match self.open_file(name, true) {
            Ok(f) => f,
            Err(e) if e.downcast_ref::<nix::errno::Errno>() == Some(&nix::errno::Errno::ENOENT) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let mut buf = Vec::new();
        f.take(max + 1)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {}", self.shown(name)))?;
        if buf.len() as u64 > max {
            bail!(
                "{} on the server is larger than the {max} bytes such a file can hold; not read",
                self.shown(name)
            );
        }
        Ok(Some(buf))
    }

    /// Write `data` to `name` through a temporary name and a rename, so a reader sees the
    /// old or the new content. An existing `name` must be a regular file.
    pub fn replace(&self, name: &str, data: &[u8]) -> Result<()> {
        self.stat(name)?;
        let tmp = format!(".{name}.tmp-{}", std::process::id());
        self.remove(&tmp)?;
        let mut f = self.create_new(&tmp)?;
        f.write_all(data)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", self.shown(&tmp)))?;
        drop(f);
        self.rename(&tmp, name)
    }

    /// Rename `from` to `to` within the directory; `to` must be absent or a regular file
    /// (rename replaces a link itself, never what it points to, but a planted link is a sign
    /// worth stopping for).
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.stat(from)?;
        self.stat(to)?;
        nix::fcntl::renameat(self.fd.as_fd(), from, self.fd.as_fd(), to)
            .with_context(|| format!("renaming {} to {}", self.shown(from), self.shown(to)))
    }

    /// Hard-link `from` as `to` (fails with EEXIST when `to` exists: the atomic publish of a
    /// lock).
    pub fn link(&self, from: &str, to: &str) -> nix::Result<()> {
        nix::unistd::linkat(self.fd.as_fd(), from, self.fd.as_fd(), to, AtFlags::empty())
    }

    /// Remove `name` (the entry itself, whatever it is); false when it was absent.
    pub fn remove(&self, name: &str) -> Result<bool> {
        check_component(name)?;
        match nix::unistd::unlinkat(
            self.fd.as_fd(),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::ENOENT) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing {}", self.shown(name))),
        }
    }
}

/// Create `dir` (mode 0700, parents as needed) or verify the existing one: a real directory
/// (not a link), owned by this user (root), with no access for group or others. Every
/// ancestor must be owned by root or by us and not writable by others unless sticky (as
/// /tmp and /run/lock are). A wrong owner or mode is a [`Failure::Security`] (exit 6).
pub fn private_dir(dir: &Path) -> Result<()> {
    checked_dir(dir, true)
}

/// A directory for a secret the administrator places (keyfile, header copy): created with
/// mode 0700 when missing; an existing one (perhaps the administrator's own 0755
/// /etc/e2ebackup) only has to be safe from other users, like every ancestor.
pub fn secret_dir(dir: &Path) -> Result<()> {
    checked_dir(dir, false)
}

fn checked_dir(dir: &Path, strict: bool) -> Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    let mut at = PathBuf::new();
    let comps: Vec<_> = dir.components().collect();
    for (i, c) in comps.iter().enumerate() {
        at.push(c);
        let last = strict && i + 1 == comps.len();
        let md = match std::fs::symlink_metadata(&at) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::DirBuilder::new().mode(0o700).create(&at) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("creating directory {}", at.display()))
                    }
                }
                std::fs::symlink_metadata(&at)
                    .with_context(|| format!("examining {}", at.display()))?
            }
            Err(e) => return Err(e).with_context(|| format!("examining {}", at.display())),
        };
        // An ancestor may be a link that root made (/var/run -> /run); follow it, but check
        // what it leads to like any other ancestor.
        let md = if md.file_type().is_symlink() && !last {
            std::fs::metadata(&at).with_context(|| format!("examining {}", at.display()))?
        } else {
            md
        };
        let mode = md.permissions().mode();
        let owner_ok = md.uid() == me || md.uid() == 0;
        if last {
            if !md.file_type().is_dir() || md.file_type().is_symlink() {
                return Err(Failure::Security(format!(
                    "{} is a {}, not a directory: e2ebackup keeps its state only in directories \
                     it owns; someone else made it, remove it after finding out who",
                    at.display(),
                    kind_word(mode)
                ))
                .into());
            }
            if md.uid() != me || mode & 0o077 != 0 {
                return Err(Failure::Security(format!(
                    "{} is owned by uid {} with mode {:04o}: e2ebackup keeps its state only in \
                     directories owned by uid {me} with mode 0700; fix or remove it after finding \
                     out who made it",
                    at.display(),
                    md.uid(),
                    mode & 0o7777
                ))
                .into());
            }
        } else if !md.file_type().is_dir() || !owner_ok || (mode & 0o022 != 0 && mode & 0o1000 == 0)
        {
            return Err(Failure::Security(format!(
                "{} (owner uid {}, mode {:04o}) could be changed by another user, so nothing \
                 under it can be trusted as e2ebackup's state; make it root-owned and not \
                 group- or world-writable",
                at.display(),
                md.uid(),
                mode & 0o7777
            ))
            .into());
        }
    }
    Ok(())
}

/// Whether a directory (owner `uid`, `mode`) can be changed by nobody but root: root-owned
/// and not writable by group or others, unless `sticky_ok` and the sticky bit is set (then
/// others may add entries but not rename or remove root's).
fn root_only(uid: u32, mode: u32, sticky_ok: bool) -> bool {
    uid == 0 && (mode & 0o022 == 0 || (sticky_ok && mode & 0o1000 != 0))
}

/// The most symbolic links one path may lead through (as the kernel's own limit).
const MAX_LINKS: usize = 40;

/// A local directory that root writes into at a path a person gave (`restore` TARGET,
/// `mount` DIR, the textfile's directory), opened once and then used only through its
/// descriptor, so a later swap of any component of the path (for a link to /etc) changes
/// nothing.
///
/// The path is walked one component at a time from `/`, each opened `O_PATH | O_NOFOLLOW`
/// beneath the one before and examined with `fstat`. A symbolic link is followed only when
/// root made it in a directory only root can change (`/var/run -> /run`); any other link is
/// refused (exit 6): whoever planted it chooses where root writes. A directory that another
/// user could change (not root-owned, or writable by group or others without the sticky bit;
/// for the last component the sticky bit does not help) makes the directory *untrusted*:
/// refused with exit 6 unless the caller allows it (`--allow-untrusted-target`). A missing
/// tail is created (mode 0700, `mkdirat` beneath the held parent) when asked.
#[derive(Debug)]
pub struct HeldDir {
    fd: OwnedFd,
    /// The path as given, for messages.
    shown: PathBuf,
    /// The first component another user could change (path, owner, mode), if any.
    pub untrusted: Option<(PathBuf, u32, u32)>,
    /// How many components were created.
    pub created: usize,
}

impl HeldDir {
    /// Open `path` (absolute). `create`: make missing components. `allow_untrusted`: accept
    /// a directory another user could change (links are never followed through one).
    pub fn open(path: &Path, create: bool, allow_untrusted: bool) -> Result<HeldDir> {
        let h = HeldDir::walk(path, create, allow_untrusted)?;
        match &h.untrusted {
            Some(u) if !allow_untrusted => Err(untrusted_error(path, u)),
            _ => Ok(h),
        }
    }

    fn walk(path: &Path, create: bool, allow_untrusted: bool) -> Result<HeldDir> {
        use std::ffi::OsString;
        use std::path::Component;
        if !path.is_absolute() {
            bail!("{} is not an absolute path", path.display());
        }
        let dir_flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let root = nix::fcntl::open("/", dir_flags | OFlag::O_DIRECTORY, Mode::empty())
            .context("opening /")?;
        // The directories walked so far (a `..` steps back one), each with its trust.
        let mut chain: Vec<(OwnedFd, PathBuf, bool)> = Vec::new();
        let st = nix::sys::stat::fstat(&root).context("examining /")?;
        let mut untrusted = None;
        let trusted = root_only(st.st_uid, st.st_mode, true);
        if !trusted {
            untrusted = Some((PathBuf::from("/"), st.st_uid, st.st_mode));
        }
        chain.push((root, PathBuf::from("/"), trusted));
        let mut todo: std::collections::VecDeque<OsString> = path
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                _ => None,
            })
            .collect();
        let mut links = 0;
        let mut created = 0;
        while let Some(name) = todo.pop_front() {
            if name == ".." {
                if chain.len() > 1 {
                    chain.pop();
                }
                continue;
            }
            let (cur, cur_at, cur_trusted) = chain.last().expect("never empty");
            let at = cur_at.join(&name);
            let fd = match nix::fcntl::openat(cur, name.as_os_str(), dir_flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(nix::errno::Errno::ENOENT) if create => {
                    // Nothing is created below a directory that is refused.
                    if let Some(u) = untrusted.as_ref().filter(|_| !allow_untrusted) {
                        return Err(untrusted_error(path, u));
                    }
                    match nix::sys::stat::mkdirat(
                        cur,
                        name.as_os_str(),
                        Mode::from_bits_truncate(0o700),
                    ) {
                        Ok(()) => created += 1,
                        Err(nix::errno::Errno::EEXIST) => {}
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("creating directory {}", at.display()))
                        }
                    }
                    nix::fcntl::openat(cur, name.as_os_str(), dir_flags, Mode::empty())
                        .with_context(|| format!("opening {}", at.display()))?
                }
                Err(nix::errno::Errno::ENOENT) => {
                    return Err(crate::error::usage(format!(
                        "{} does not exist (in {})",
                        at.display(),
                        path.display()
                    )))
                }
                Err(e) => return Err(e).with_context(|| format!("opening {}", at.display())),
            };
            let st = nix::sys::stat::fstat(&fd)
                .with_context(|| format!("examining {}", at.display()))?;
            let kind = st.st_mode & SFlag::S_IFMT.bits();
            if kind == SFlag::S_IFLNK.bits() {
                // Followed only when nobody but root could have put it there or change it.
                if !(*cur_trusted && st.st_uid == 0) {
                    return Err(Failure::Security(format!(
                        "{} is a symbolic link (owner uid {}) in a directory another user can \
                         change: e2ebackup does not follow it, since whoever placed it chooses \
                         where root would write; give the directory it should lead to instead",
                        at.display(),
                        st.st_uid
                    ))
                    .into());
                }
                links += 1;
                if links > MAX_LINKS {
                    bail!("{}: too many levels of symbolic links", path.display());
                }
                let dest = nix::fcntl::readlinkat(cur, name.as_os_str())
                    .with_context(|| format!("reading the link {}", at.display()))?;
                let dest = PathBuf::from(dest);
                if dest.is_absolute() {
                    chain.truncate(1);
                }
                for c in dest.components().rev() {
                    match c {
                        Component::Normal(n) => todo.push_front(n.to_os_string()),
                        Component::ParentDir => todo.push_front(OsString::from("..")),
                        _ => {}
                    }
                }
                continue;
            }
            if kind != SFlag::S_IFDIR.bits() {
                return Err(crate::error::usage(format!(
                    "{} is a {}, not a directory",
                    at.display(),
                    kind_word(st.st_mode)
                )));
            }
            let last = todo.is_empty();
            let ok = *cur_trusted && root_only(st.st_uid, st.st_mode, !last);
            if !ok && untrusted.is_none() {
                untrusted = Some((at.clone(), st.st_uid, st.st_mode));
            }
            chain.push((fd, at, ok));
        }
        let (fd, _, _) = chain.pop().expect("never empty");
        Ok(HeldDir {
            fd,
            shown: path.to_path_buf(),
            untrusted,
            created,
        })
    }

    /// The held descriptor (O_PATH: for `*at` calls and the mount API).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The path as given (for messages).
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    /// A path that leads to the held directory itself, whatever happens to the path it was
    /// opened by: `/proc/PID/fd/N`, for a program started by this process (rsync), valid as
    /// long as this [`HeldDir`] lives.
    pub fn proc_path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.fd.as_raw_fd()
        ))
    }

    /// Whether the directory holds no entry.
    pub fn is_empty(&self) -> Result<bool> {
        let mut d = std::fs::read_dir(self.proc_path())
            .with_context(|| format!("reading {}", self.shown.display()))?;
        Ok(d.next().is_none())
    }

    /// Replace the file `name` in this directory with `data`, mode `mode`, never through a
    /// link: a new file under a random name (`O_CREAT | O_EXCL | O_NOFOLLOW`, so a link or
    /// anything else planted at that name makes the open fail instead of being written
    /// through), `fchmod`, fsync, then `renameat` over `name` (which replaces a planted link
    /// itself, never what it points to). On any error the temporary file is removed.
    pub fn replace_file(&self, name: &str, data: &[u8], mode: u32) -> Result<()> {
        check_component(name)?;
        let at = self.shown.join(name);
        // The O_PATH descriptor serves as the directory for *at calls.
        for _ in 0..8 {
            let tmp = format!(".{name}.{}{TEMP_MARK}{}", random_hex(8), std::process::id());
            let fd = match nix::fcntl::openat(
                self.fd.as_fd(),
                tmp.as_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC
                    | OFlag::O_NOCTTY
                    | OFlag::O_NONBLOCK,
                Mode::from_bits_truncate(0o600),
            ) {
                Ok(fd) => fd,
                Err(nix::errno::Errno::EEXIST) => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("creating a temporary file beside {}", at.display())
                    })
                }
            };
            let mut f = File::from(fd);
            let r = nix::sys::stat::fchmod(&f, Mode::from_bits_truncate(mode))
                .map_err(anyhow::Error::from)
                .and_then(|()| f.write_all(data).map_err(Into::into))
                .and_then(|()| f.sync_all().map_err(Into::into))
                .and_then(|()| {
                    nix::fcntl::renameat(self.fd.as_fd(), tmp.as_str(), self.fd.as_fd(), name)
                        .map_err(Into::into)
                })
                .with_context(|| format!("writing {}", at.display()));
            if r.is_err() {
                let _ = nix::unistd::unlinkat(
                    self.fd.as_fd(),
                    tmp.as_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
            }
            return r;
        }
        bail!("no free temporary name beside {}", at.display())
    }
}

/// The refusal of a directory another user could change (see [`HeldDir`]).
fn untrusted_error(path: &Path, (at, uid, mode): &(PathBuf, u32, u32)) -> anyhow::Error {
    Failure::Security(format!(
        "{} is not a safe place for root to write: {} (owner uid {uid}, mode {:04o}) can be \
         changed by another user, who could swap what lies below it (for a link to /etc) while \
         e2ebackup works; choose a directory whose every component is root-owned and not \
         group- or world-writable, or pass --allow-untrusted-target if you trust that user",
        path.display(),
        at.display(),
        mode & 0o7777
    ))
    .into()
}

/// `n` random bytes from the kernel, in hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Replace the local file `path` with `data` atomically: a temporary file in the same
/// directory (O_EXCL, mode 0600), fsync, rename over `path`, fsync of the directory. A crash
/// at any point leaves the old content or the new one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(data).map_err(Into::into))
}

/// [`write_atomic`] for contents produced as they are written: `fill` writes into a
/// buffered temporary file ([`write_temp_with`]), which is then synced and renamed.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<File>) -> Result<()>,
) -> Result<()> {
    replace_with(path, fill)?;
    let dir = parent_of(path);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// [`write_atomic_with`] without the directory's fsync, for a caller that syncs the whole
/// filesystem right after (the container's STATE: [`crate::generation::store`]): `fill`
/// writes a new temporary file ([`write_temp_with`]), which is synced and renamed over
/// `path`; on any error it is removed.
pub fn replace_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<File>) -> Result<()>,
) -> Result<()> {
    let (tmp, f) = write_temp_with(path, fill)?;
    let r = f
        .sync_all()
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The marker in the name of [`write_temp_with`]'s temporary files: `.NAME.tmp-PID`.
const TEMP_MARK: &str = ".tmp-";

/// Whether `name` is one of [`write_temp_with`]'s temporary files (left behind by a writer
/// that ended before it renamed it).
pub fn is_temp_name(name: &std::ffi::OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    b.starts_with(b".")
        && b.windows(TEMP_MARK.len())
            .any(|w| w == TEMP_MARK.as_bytes())
}

/// The first half of [`write_atomic_with`], for a caller that syncs more than this one file
/// at once (a snapshot and its manifest): `fill` writes into a new buffered temporary file
/// in `path`'s directory (O_EXCL, mode 0600), which is flushed but neither synced nor
/// renamed. Returns its path and the open file; on any error it is removed. Contents are
/// streamed, never held (a manifest of 10^5 files).
pub fn write_temp_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<File>) -> Result<()>,
) -> Result<(PathBuf, File)> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!("{TEMP_MARK}{}", std::process::id()));
    let tmp = parent_of(path).join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let r = (|| -> Result<File> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 16, f);
        fill(&mut w).with_context(|| format!("writing {}", tmp.display()))?;
        w.into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", tmp.display()))
    })();
    match r {
        Ok(f) => Ok((tmp, f)),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Open a regular local file for reading without waiting on a FIFO and with a size bound;
/// returns the open file's metadata too, for owner and mode checks.
pub fn read_local_bounded(path: &Path, max: u64) -> Result<(Vec<u8>, std::fs::Metadata)> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let md = f
        .metadata()
        .with_context(|| format!("examining {}", path.display()))?;
    if !md.file_type().is_file() {
        bail!(
            "{} is a {}, not a regular file",
            path.display(),
            kind_word(md.mode())
        );
    }
    let mut buf = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    if buf.len() as u64 > max {
        bail!("{} is larger than {max} bytes", path.display());
    }
    Ok((buf, md))
}

/// Make a server-supplied string safe to print or to pass in a hook's environment: control
/// characters (newlines, escape sequences) are escaped and the length is bounded.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() >= max {
            out.push('…');
            break;
        }
        if c.is_control() || c == '\u{7f}' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Sorted byte ranges with near neighbours merged (gaps up to `gap` read through), then cut
/// into reads of at most `chunk` bytes: how a read-ahead turns many small, scattered ranges
/// (inode tables, directory blocks, file extents) into few large requests.
pub fn plan_reads(mut ranges: Vec<(u64, u64)>, gap: u64, chunk: u64) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (off, len) in ranges {
        match merged.last_mut() {
            Some((o, l)) if off <= *o + *l + gap => *l = (*l).max(off + len - *o),
            _ => merged.push((off, len)),
        }
    }
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    for (off, len) in merged {
        let mut o = off;
        while o < off + len {
            let n = chunk.min(off + len - o);
            out.push((o, n));
            o += n;
        }
    }
    out
}

/// Have the kernel read only what is asked of `f`, this open file: no read-ahead window
/// around each read (`POSIX_FADV_RANDOM`). For the bulk readers, which ask for exactly the
/// ranges they want in large reads: behind them the window of a network-backed file or
/// device (megabytes, `sshfs::READ_AHEAD_KIB`, `luks::READ_AHEAD_KIB`) would fetch what
/// nobody asked for, and on a 25 ms link the metadata read-ahead of a 100000-file container
/// fetched 134 MiB for 69 MiB wanted (docs/benchmarks.md, run 11). Best effort: a failure
/// only costs speed.
pub fn read_exactly(f: &File) {
    let _ = nix::fcntl::posix_fadvise(f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM);
}

/// Read `reads` (each at most `chunk` bytes, as [`plan_reads`] cuts them) from `f` with
/// `threads` threads, handing each read's bytes to `visit`. Stops early when `halt` says
/// so; a failed or short read is skipped (this is read-ahead: whoever reads the data for
/// real reports the error).
pub fn read_ranges(
    f: &File,
    reads: &[(u64, u64)],
    threads: usize,
    chunk: u64,
    halt: &(impl Fn() -> bool + Sync),
    visit: &(impl Fn(&[u8]) + Sync),
) {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; chunk as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(off, len)) = reads.get(i) else {
                        return;
                    };
                    if halt() || len > chunk {
                        return;
                    }
                    let b = &mut buf[..len as usize];
                    if f.read_exact_at(b, off).is_ok() {
                        visit(b);
                    }
                }
            });
        }
    });
}

/// The largest single read of a bulk read from the container file.
pub const BULK_CHUNK: u64 = 1 << 20;
/// Ranges of the container file closer than this are read as one (the gap is read through).
const BULK_GAP: u64 = 16 << 10;

/// The file a buffered loop device reads from (restore's read-only stack: the container on
/// sshfs), and where the device's bytes begin in it (`offset`, the LUKS data offset). A
/// buffered loop reads its file through that file's page cache, and a buffered read on
/// FUSE goes out as small read-ahead requests, one after another; [`Beneath::prime`] reads
/// the same ranges from the file first in a few large parallel requests, so the device's
/// own reads find them in memory.
pub struct Beneath<'a> {
    pub file: &'a File,
    pub offset: u64,
}

impl Beneath<'_> {
    /// Read the device's byte ranges `ranges` from the file beneath (shifted by the offset,
    /// merged across small gaps, [`BULK_CHUNK`] at a time, `threads` at once); ranges that
    /// do not lie within the file are left out. Best effort, like every read-ahead. Returns
    /// the reads issued.
    pub fn prime(
        &self,
        ranges: impl IntoIterator<Item = (u64, u64)>,
        threads: usize,
        halt: &(impl Fn() -> bool + Sync),
    ) -> usize {
        let mut once = Some(ranges.into_iter().collect());
        self.prime_batches(threads, halt, || once.take())
    }

    /// Like [`Beneath::prime`] for ranges that come in batches: `next` hands over one batch
    /// after another (`None`: no more), each planned on its own, and `threads` readers take
    /// its reads as they are queued. `next` is asked for a batch once the reads of the one
    /// before are all queued, not done, so the readers never idle at a batch's end waiting
    /// for its slowest read. Returns the reads issued.
    pub fn prime_batches(
        &self,
        threads: usize,
        halt: &(impl Fn() -> bool + Sync),
        mut next: impl FnMut() -> Option<Vec<(u64, u64)>>,
    ) -> usize {
        use std::os::unix::fs::FileExt;
        read_exactly(self.file);
        let end = self.len();
        let threads = threads.max(1);
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, u64)>(threads);
        let rx = std::sync::Mutex::new(rx);
        let mut issued = 0;
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    let mut buf = vec![0u8; BULK_CHUNK as usize];
                    loop {
                        let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((off, len)) = next else {
                            return;
                        };
                        if !halt() && len <= BULK_CHUNK {
                            let _ = self.file.read_exact_at(&mut buf[..len as usize], off);
                        }
                    }
                });
            }
            'batches: while let Some(batch) = next() {
                for r in self.plan(batch, end) {
                    if halt() || tx.send(r).is_err() {
                        break 'batches;
                    }
                    issued += 1;
                }
            }
            drop(tx);
        });
        issued
    }

    fn len(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
    }

    /// The device's `ranges` as reads of the file beneath: shifted by the offset, those not
    /// within its `end` left out, merged and cut ([`plan_reads`]).
    fn plan(&self, ranges: impl IntoIterator<Item = (u64, u64)>, end: u64) -> Vec<(u64, u64)> {
        let shifted = ranges
            .into_iter()
            .filter_map(|(at, n)| {
                let at = at.checked_add(self.offset)?;
                (at.checked_add(n)? <= end).then_some((at, n))
            })
            .collect();
        plan_reads(shifted, BULK_GAP, BULK_CHUNK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{exit_for, Exit};

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "e2eb-fsutil-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The no-follow opens hold on a plain directory, without any help from sshfs: links
    /// (absolute, `..`, inside), a FIFO and a device node are refused with exit 6 and the
    /// name, and what they point to is untouched.
    #[test]
    fn reads_are_merged_across_small_gaps_and_cut_into_chunks() {
        const C: u64 = 256 << 10;
        let r = plan_reads(vec![(8192, 4096), (0, 4096), (4096, 100)], 0, C);
        assert_eq!(r, vec![(0, 4196), (8192, 4096)]);
        let r = plan_reads(vec![(8192, 4096), (0, 4096)], 4096, C);
        assert_eq!(r, vec![(0, 12288)]);
        let r = plan_reads(vec![(0, 2 * C + 5)], 0, C);
        assert_eq!(r, vec![(0, C), (C, C), (2 * C, 5)]);
        // Overlapping and contained ranges read once.
        assert_eq!(
            plan_reads(vec![(0, 100), (10, 20), (50, 100)], 0, C),
            vec![(0, 150)]
        );
    }

    #[test]
    fn ranges_are_read_whole_by_every_thread_count_and_stop_on_halt() {
        let d = tmp();
        let p = d.join("data");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let reads = plan_reads(
            vec![(0, 70_000), (100_000, 90_000), (199_990, 100)],
            0,
            4096,
        );
        for threads in [0, 1, 3, 16] {
            let got = std::sync::Mutex::new(0u64);
            read_ranges(&f, &reads, threads, 4096, &|| false, &|b: &[u8]| {
                *got.lock().unwrap() += b.len() as u64
            });
            // The last range runs past the end of the file: a short read is skipped.
            assert_eq!(*got.lock().unwrap(), 70_000 + 90_000, "{threads}");
        }
        let got = std::sync::Mutex::new(0u64);
        read_ranges(&f, &reads, 4, 4096, &|| true, &|b: &[u8]| {
            *got.lock().unwrap() += b.len() as u64
        });
        assert_eq!(*got.lock().unwrap(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn batches_are_planned_each_and_read_until_none_or_halt() {
        let d = tmp();
        let p = d.join("container");
        std::fs::write(&p, vec![1u8; (4 << 20) + 4096]).unwrap();
        let f = File::open(&p).unwrap();
        let b = Beneath {
            file: &f,
            offset: 4096,
        };
        let mut batches = vec![
            vec![(0, 100), (200, 100)],        // merged: one read
            vec![],                            // an empty batch does not end it
            vec![(1 << 20, 3 << 20)],          // 3 MiB: cut into three reads
            vec![(4 << 20, 10), (1 << 40, 1)], // both past the end: left out
        ]
        .into_iter();
        let mut asked = 0;
        let next = || {
            asked += 1;
            batches.next()
        };
        assert_eq!(b.prime_batches(3, &|| false, next), 4);
        assert_eq!(asked, 5, "asked until None");
        let mut once = Some(vec![(0u64, 100u64)]);
        assert_eq!(b.prime_batches(2, &|| true, || once.take()), 0, "halted");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// How many of the first `len` bytes' pages of `f` are in the page cache (mincore).
    fn resident_pages(f: &File, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mut v = vec![0u8; len.div_ceil(page)];
        unsafe {
            let m = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(m, libc::MAP_FAILED, "mmap");
            assert_eq!(libc::mincore(m, len, v.as_mut_ptr()), 0, "mincore");
            libc::munmap(m, len);
        }
        v.iter().filter(|b| **b & 1 != 0).count()
    }

    #[test]
    fn bulk_reads_bring_in_only_what_they_ask_for() {
        use std::os::unix::fs::FileExt;
        // Under the repository (a disk filesystem with read-ahead), not the temporary
        // directory, which may be tmpfs (always resident, no read-ahead).
        let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(format!("e2eb-exact-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("container");
        const LEN: usize = 8 << 20;
        std::fs::write(&p, vec![7u8; LEN]).unwrap();
        let f = File::open(&p).unwrap();
        f.sync_all().unwrap();
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let drop_cache = || {
            nix::fcntl::posix_fadvise(
                &f,
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .unwrap();
            assert_eq!(
                resident_pages(&f, LEN),
                0,
                "{}: pages not dropped",
                p.display()
            );
        };
        // A plain read of 64 KiB: the kernel reads a window beyond it.
        drop_cache();
        let plain = File::open(&p).unwrap();
        plain.read_exact_at(&mut vec![0u8; 64 << 10], 0).unwrap();
        let around = resident_pages(&f, LEN);
        assert!(
            around > (64 << 10) / page,
            "{}: no read-ahead here ({around} pages after a 64 KiB read), so this test shows nothing",
            p.display()
        );
        // The bulk read of the same 64 KiB and of 1 MiB further on: those pages, no more.
        drop_cache();
        let b = Beneath {
            file: &f,
            offset: 0,
        };
        assert_eq!(
            b.prime([(0, 64 << 10), (4 << 20, 1 << 20)], 2, &|| false),
            2
        );
        assert_eq!(resident_pages(&f, LEN), ((64 << 10) + (1 << 20)) / page);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn server_dir_refuses_links_fifos_devices() {
        let root = tmp();
        let srv = root.join("srv");
        std::fs::create_dir(&srv).unwrap();
        let victim = root.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::write(srv.join("inside-target"), b"x").unwrap();
        std::os::unix::fs::symlink(&victim, srv.join("abs")).unwrap();
        std::os::unix::fs::symlink("../victim", srv.join("dotdot")).unwrap();
        std::os::unix::fs::symlink("inside-target", srv.join("inside")).unwrap();
        nix::unistd::mkfifo(&srv.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let d = ServerDir::open(&srv, "host:/srv").unwrap();
        for name in ["abs", "dotdot", "inside", "fifo"] {
            for r in [
                d.open_file(name, false).map(|_| ()),
                d.open_file(name, true).map(|_| ()),
                d.read_bounded(name, 100).map(|_| ()),
                d.replace(name, b"evil"),
                d.len(name).map(|_| ()),
            ] {
                let e = r.unwrap_err();
                assert_eq!(exit_for(&e), Exit::Security, "{name}: {e:#}");
                assert!(
                    format!("{e:#}").contains(&format!("host:/srv/{name}")),
                    "{e:#}"
                );
            }
            assert!(d.create_new(name).is_err());
        }
        // A device node: only root may make one (CI runs as root).
        if nix::unistd::geteuid().is_root() {
            nix::sys::stat::mknod(
                &srv.join("dev"),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o600),
                nix::sys::stat::makedev(1, 3),
            )
            .unwrap();
            let e = d.open_file("dev", false).unwrap_err();
            assert_eq!(exit_for(&e), Exit::Security);
            assert!(format!("{e:#}").contains("character device"), "{e:#}");
        }
        assert!(d.open_file("../victim", false).is_err());
        assert!(d.open_file("/etc/passwd", true).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(srv.join("inside-target")).unwrap(), b"x");
        // Regular files work, and reads are bounded.
        d.replace("ok", b"hello").unwrap();
        assert_eq!(d.read_bounded("ok", 5).unwrap().unwrap(), b"hello");
        assert!(d.read_bounded("ok", 4).is_err());
        assert_eq!(d.read_bounded("absent", 4).unwrap(), None);
        assert_eq!(d.len("ok").unwrap(), Some(5));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn private_dir_creates_and_refuses_foreign_ones() {
        let root = tmp();
        let d = root.join("a/b");
        private_dir(&d).unwrap();
        let md = std::fs::symlink_metadata(&d).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o700);
        private_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(exit_for(&private_dir(&d).unwrap_err()), Exit::Security);
        let link = root.join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let e = private_dir(&link).unwrap_err();
        assert_eq!(exit_for(&e), Exit::Security);
        assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
        let open = root.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            exit_for(&private_dir(&open.join("x")).unwrap_err()),
            Exit::Security
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let root = tmp();
        let f = root.join("rec");
        write_atomic(&f, b"1\n").unwrap();
        write_atomic(&f, b"2\n").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"2\n");
        let names: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
        // The temporary file a writer leaves before its rename is known by its name; the
        // file it replaces is not.
        let (t, _) = write_temp_with(&f, |w| w.write_all(b"3\n").map_err(Into::into)).unwrap();
        assert!(is_temp_name(t.file_name().unwrap()), "{t:?}");
        assert!(!is_temp_name(f.file_name().unwrap()));
        assert_eq!(std::fs::read(&f).unwrap(), b"2\n", "not renamed");
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A directory that only root can change, for the HeldDir tests: under the repository's
    /// target/ (root-owned when tests run as root), not /tmp, whose sticky bit is fine for
    /// an ancestor but whose other entries belong to anyone.
    fn root_dir() -> PathBuf {
        let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(format!(
                "e2eb-held-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    /// Whether every ancestor of `d` is root-only (a checkout under a user's home is not:
    /// then the trust assertions below do not apply and are skipped).
    fn all_root_only(d: &Path) -> bool {
        HeldDir::walk(d, false, true).unwrap().untrusted.is_none()
    }

    const NOBODY: u32 = 65534;

    #[test]
    fn held_dir_refuses_untrusted_components_and_foreign_links() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (chown)");
            return;
        }
        let root = root_dir();
        if !all_root_only(&root) {
            eprintln!(
                "skipped: {} is under a directory others can change",
                root.display()
            );
            return;
        }
        // Created when missing, 0700, held.
        let t = root.join("a/b");
        let h = HeldDir::open(&t, true, false).unwrap();
        assert_eq!(h.created, 2);
        assert!(h.is_empty().unwrap());
        assert_eq!(
            std::fs::metadata(&t).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Without create, a missing one is a usage error.
        assert_eq!(
            exit_for(&HeldDir::open(&root.join("nope"), false, false).unwrap_err()),
            Exit::Usage
        );
        // A component owned by another user: refused (exit 6, naming it) unless allowed.
        let user = root.join("user");
        std::fs::create_dir(&user).unwrap();
        std::os::unix::fs::chown(&user, Some(NOBODY), Some(NOBODY)).unwrap();
        std::fs::create_dir(user.join("in")).unwrap();
        for t in [user.clone(), user.join("in")] {
            let e = HeldDir::open(&t, false, false).unwrap_err();
            assert_eq!(exit_for(&e), Exit::Security, "{e:#}");
            assert!(
                format!("{e:#}").contains(&format!("{} (owner uid {NOBODY}", user.display())),
                "{e:#}"
            );
            assert!(
                format!("{e:#}").contains("--allow-untrusted-target"),
                "{e:#}"
            );
            assert!(HeldDir::open(&t, false, true).unwrap().untrusted.is_some());
        }
        // Nothing is created below a refused directory.
        assert!(HeldDir::open(&user.join("new/er"), true, false).is_err());
        assert!(!user.join("new").exists());
        // World-writable: refused; sticky helps an ancestor, not the target itself.
        let open = root.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::create_dir(open.join("mine")).unwrap();
        std::fs::set_permissions(open.join("mine"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        assert!(HeldDir::open(&open.join("mine"), false, false).is_ok());
        assert_eq!(
            exit_for(&HeldDir::open(&open, false, false).unwrap_err()),
            Exit::Security
        );
        // A link another user could have planted (in their directory, or theirs in a sticky
        // one) is never followed, allowed or not; root's own link in root's directory is.
        let victim = root.join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::os::unix::fs::symlink(&victim, user.join("link")).unwrap();
        std::os::unix::fs::symlink(&victim, open.join("link")).unwrap();
        nix::unistd::fchownat(
            AT_FDCWD_BORROW,
            &open.join("link"),
            Some(nix::unistd::Uid::from_raw(NOBODY)),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        for l in [user.join("link"), open.join("link")] {
            for allow in [false, true] {
                let e = HeldDir::open(&l.join("x"), true, allow).unwrap_err();
                assert_eq!(exit_for(&e), Exit::Security, "{e:#}");
                assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
            }
        }
        assert!(
            std::fs::read_dir(&victim).unwrap().next().is_none(),
            "nothing created through a link"
        );
        std::os::unix::fs::symlink("victim", root.join("rootlink")).unwrap();
        let h = HeldDir::open(&root.join("rootlink"), false, false).unwrap();
        assert!(h.untrusted.is_none());
        h.replace_file("f", b"via link", 0o644).unwrap();
        assert_eq!(std::fs::read(victim.join("f")).unwrap(), b"via link");
        let _ = std::fs::remove_dir_all(&root);
    }

    const AT_FDCWD_BORROW: std::os::fd::BorrowedFd<'static> =
        unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::AT_FDCWD) };

    /// The swap the held descriptor stops: TARGET opened, then renamed away and replaced by
    /// a link to a victim directory; writes still land in the original directory.
    #[test]
    fn held_dir_stays_on_the_directory_it_opened() {
        let root = tmp();
        let t = root.join("target");
        let h = HeldDir::open(&t, true, true).unwrap();
        let victim = root.join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::rename(&t, root.join("moved")).unwrap();
        std::os::unix::fs::symlink(&victim, &t).unwrap();
        h.replace_file("x", b"1", 0o600).unwrap();
        std::fs::write(h.proc_path().join("y"), b"2").unwrap();
        assert!(std::fs::read_dir(&victim).unwrap().next().is_none());
        assert_eq!(std::fs::read(root.join("moved/x")).unwrap(), b"1");
        assert_eq!(std::fs::read(root.join("moved/y")).unwrap(), b"2");
        assert!(!h.is_empty().unwrap());
        let _ = std::fs::remove_dir_all(&root);
    }

    /// The textfile attack: links planted at the final name (and at the names a writer of
    /// the old kind used) leave what they point to untouched; the file is replaced, mode
    /// 0644, and no temporary file is left.
    #[test]
    fn replace_file_never_writes_through_a_link() {
        let root = tmp();
        let dir = root.join("textfiles");
        std::fs::create_dir(&dir).unwrap();
        let victim = root.join("shadow");
        std::fs::write(&victim, b"root:secret\n").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("m.prom")).unwrap();
        for pid in std::process::id().saturating_sub(3)..std::process::id() + 3 {
            std::os::unix::fs::symlink(&victim, dir.join(format!(".m.prom.{pid}.tmp"))).unwrap();
        }
        let h = HeldDir::open(&dir, false, true).unwrap();
        h.replace_file("m.prom", b"metric 1\n", 0o644).unwrap();
        h.replace_file("m.prom", b"metric 2\n", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"root:secret\n");
        let md = std::fs::symlink_metadata(dir.join("m.prom")).unwrap();
        assert!(md.file_type().is_file());
        assert_eq!(md.permissions().mode() & 0o777, 0o644);
        assert_eq!(std::fs::read(dir.join("m.prom")).unwrap(), b"metric 2\n");
        let left = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| is_temp_name(&e.file_name()))
            .count();
        assert_eq!(left, 0);
        assert!(h.replace_file("../escape", b"x", 0o644).is_err());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn printable_escapes_control_characters() {
        assert_eq!(printable("a\nb\x1b[2J", 100), "a\\nb\\u{1b}[2J");
        assert_eq!(printable("abcdef", 3), "abc…");
    }
}
