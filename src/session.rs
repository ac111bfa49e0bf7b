//! A session walks up the stack for one command and always walks back down.
//!
//! ```text
//!   local lock -> [finish an earlier run's teardown] -> SSH preflight -> sshfs -> server lock
//!   -> loop device -> LUKS -> ext4 mount          ...work...          teardown, in reverse
//! ```
//! Each step pushes its undo record (see [`crate::teardown`]) and checks for a signal before
//! it starts. [`Session::close`] unwinds everything, whatever happened before, and reports
//! whether the teardown was complete.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::error::Failure;
use crate::fsutil::ServerDir;
use crate::profile::Profile;
use crate::stack::{self, lock, loopdev, luks, mount, ssh, sshfs};
use crate::teardown::{self, Journal, Report, Stack, Undo};
use crate::{info, signals, warn};

pub struct Session<'p> {
    pub profile: &'p Profile,
    pub stack: Stack,
    _local: lock::LocalLock,
    pub remote: Option<ssh::Remote>,
    pub facts: Option<ssh::Facts>,
    /// The mounted server directory, held open: every server file is opened beneath it
    /// without following links.
    server: Option<ServerDir>,
    pub loopdev: Option<loopdev::Loop>,
    pub mapper: Option<PathBuf>,
    /// Where the container's ext4 is mounted, once it is.
    pub fs_root: Option<PathBuf>,
    /// `init` pins the header it just wrote before it is moved to its final name.
    pub header_override: Option<PathBuf>,
    /// The keyfile's content, once read.
    pub key: Option<luks::Key>,
    /// The container's authenticated generation, once checked (see [`crate::generation`]).
    pub generation: Option<u64>,
    /// `accept-rollback` only: skip the comparison with the client's record.
    pub accept_any_generation: bool,
    /// Watches the sshfs connection for a hung server (see [`crate::watchdog`]), from the
    /// sshfs mount until the teardown is done.
    watchdog: Option<crate::watchdog::Watchdog>,
}

/// Finish the teardown recorded by an earlier process, if any. With `include_persistent`
/// also a `mount` session's (that is what `umount` and `cleanup` do).
pub fn recover(p: &Profile, include_persistent: bool) -> Result<Option<Report>> {
    let path = p.journal_path();
    let Some(j) = Journal::read(&path)? else {
        return Ok(None);
    };
    if j.persistent && !include_persistent {
        return Err(Failure::Locked(format!(
            "the container of profile `{}` is mounted by `e2ebackup mount` (pid {}); run `e2ebackup umount {}` first",
            p.name, j.pid, p.name
        ))
        .into());
    }
    teardown::announce_recovery(&j);
    let mut s = Stack::adopt(path, j);
    let r = s.unwind(&mut stack::Real);
    r.print();
    Ok(Some(r))
}

impl<'p> Session<'p> {
    /// Take the local lock and finish any earlier teardown; nothing remote is touched yet.
    pub fn begin(profile: &'p Profile, command: &str) -> Result<Session<'p>> {
        // Before the lock and the first connection: a path that can never be written is a
        // usage error (exit 2), found without touching anything.
        crate::localpaths::ensure(profile)?;
        let local = lock::lock_local(&profile.name)?;
        if let Some(r) = recover(profile, false)? {
            if !r.complete() {
                bail!("could not finish the teardown of an earlier run; fix the cause above, then run `e2ebackup cleanup {}`", profile.name);
            }
        }
        let stack = Stack::persistent(profile.journal_path(), command)?;
        let limit = profile.server.run_timeout;
        signals::set_deadline(
            std::time::Instant::now() + limit.std(),
            format!(
                "`{command}` did not finish within server.run_timeout ({limit}); stopped it. \
                 Raise server.run_timeout in {} if it needs longer (a first backup of much data)",
                profile.source_file.display()
            ),
        );
        Ok(Session {
            profile,
            stack,
            _local: local,
            remote: None,
            facts: None,
            server: None,
            loopdev: None,
            mapper: None,
            fs_root: None,
            header_override: None,
            key: None,
            generation: None,
            accept_any_generation: false,
            watchdog: None,
        })
    }

    /// SSH preflight: pinned host key, authentication, server directory, facts.
    pub fn connect(&mut self) -> Result<&ssh::Facts> {
        signals::check()?;
        let p = self.profile;
        info!(
            "connecting to {}@{}:{}",
            p.server.user, p.server.host, p.server.port
        );
        let remote = ssh::Remote::connect(&p.server)?;
        let facts = remote.facts(&p.server.path, &p.remote_container())?;
        if !facts.fsync_supported {
            warn!(
                "the SFTP server on {} does not support fsync@openssh.com: sshfs cannot flush to the \
                 server's disk, so a finished backup is NOT guaranteed durable there until the server \
                 flushes on its own (use OpenSSH's sftp-server or internal-sftp)",
                p.server.host
            );
        }
        self.remote = Some(remote);
        self.facts = Some(facts);
        Ok(self.facts.as_ref().expect("just set"))
    }

    /// Mount the server directory and take the server lock.
    pub fn mount_server(&mut self, command: &str) -> Result<()> {
        signals::check()?;
        let p = self.profile;
        let target = p.sshfs_dir();
        self.stack.push(Undo::UnmountSshfs {
            target: target.clone(),
            daemon: None,
        })?;
        info!("mounting {}:{} with sshfs", p.server.host, p.server.path);
        let daemon = sshfs::mount(&p.server, &target)?;
        self.stack.amend_last(Undo::UnmountSshfs {
            target: target.clone(),
            daemon: Some(daemon),
        })?;
        let dir = ServerDir::open(&target, &format!("{}:{}", p.server.host, p.server.path))?;
        self.watchdog = Some(crate::watchdog::Watchdog::start(
            &p.server.host,
            &target,
            Some(daemon),
            &self.container_path(),
            p.server.stall_limit(),
        ));
        signals::check()?;
        // Before anything is written: every name the tool uses there is absent or a regular
        // file. A planted link, FIFO or device is exit 6, naming it.
        for name in p.server_names() {
            dir.stat(&name)?;
        }
        let lock_name = p.server_lock_name();
        let me = lock::ServerLock::mine(command);
        self.stack.push(Undo::ReleaseServerLock {
            path: dir.local_path(&lock_name),
            token: me.token.clone(),
        })?;
        let r = lock::acquire_server_lock(&dir, &lock_name, &me);
        self.server = Some(dir);
        r
    }

    /// The mounted server directory (after [`Session::mount_server`]).
    pub fn server_dir(&self) -> Result<&ServerDir> {
        self.server
            .as_ref()
            .context("the server directory is not mounted")
    }

    /// The container file as seen through sshfs (for messages and records; open it with
    /// [`Session::server_dir`]).
    pub fn container_path(&self) -> PathBuf {
        self.profile
            .sshfs_dir()
            .join(&self.profile.container.file.0)
    }

    /// Attach a loop device (direct I/O) over the server file `name`, opened beneath the
    /// server directory without following links.
    pub fn attach(&mut self, name: &str, read_only: bool) -> Result<PathBuf> {
        signals::check()?;
        let dir = self.server_dir()?;
        let path = dir.local_path(name);
        let f = dir.open_file(name, read_only)?;
        let l = loopdev::attach(&f, &path, read_only)?;
        drop(f);
        let dev = l.device.clone();
        self.stack.push(Undo::DetachLoop {
            device: dev.clone(),
            backing: path.clone(),
        })?;
        crate::debug!(
            "attached {} (direct I/O: {})",
            dev.display(),
            loopdev::direct_io(&dev)
        );
        self.loopdev = Some(l);
        Ok(dev)
    }

    /// Unlock the LUKS container on the attached loop device.
    pub fn unlock(&mut self, key: &luks::Key, read_only: bool, discards: bool) -> Result<PathBuf> {
        signals::check()?;
        let dev = self
            .loopdev
            .as_ref()
            .map(|l| l.device.clone())
            .expect("attach first");
        let name = self.profile.mapping_name();
        if luks::is_active(&name) {
            bail!("/dev/mapper/{name} is already open, but not by this run; see `e2ebackup status {}`", self.profile.name);
        }
        let header = self.pinned_header(&dev)?;
        self.stack.push(Undo::CloseLuks { name: name.clone() })?;
        let m = luks::open(&dev, header.as_deref(), &name, key, read_only, discards)?;
        self.mapper = Some(m.clone());
        if let Err(e) = luks::set_read_ahead(&m, luks::READ_AHEAD_KIB) {
            warn!("read-ahead of {} left at the default: {e:#}", m.display());
        }
        Ok(m)
    }

    /// The client's pinned header, after checking the server's copy against it.
    pub fn pinned_header(&self, device: &Path) -> Result<Option<PathBuf>> {
        let h = self
            .header_override
            .clone()
            .unwrap_or_else(|| self.profile.header_backup());
        if !h.exists() {
            // A client that has committed to this container before had a pinned header:
            // its loss is not something to shrug off (the server could be serving a
            // container of its own making). A client with no record (rebuilt after a
            // disaster) can only warn.
            if crate::generation::client_generation(self.profile)?.is_some() {
                return Err(Failure::Security(format!(
                    "the pinned LUKS header {} is missing, but this client has used the container \
                     before (record {}): restore the header copy from your backup of the client, or, \
                     if you trust the server's header, re-pin it with `cryptsetup luksHeaderBackup` \
                     (docs/disaster-recovery.md)",
                    h.display(),
                    self.profile.generation_record().display()
                ))
                .into());
            }
            // Trust on first use, said out loud: pinned now, every later open is checked.
            warn!(
                "no pinned LUKS header at {} and no record of this container on this client \
                 (a rebuilt client?): trusting the server's header this once and pinning it there",
                h.display()
            );
            if let Some(dir) = h.parent() {
                crate::fsutil::secret_dir(dir)?;
            }
            luks::backup_header(device, &h)?;
        }
        luks::verify_pinned_header(device, &h)?;
        Ok(Some(h))
    }

    /// Mount the ext4 inside.
    pub fn mount_fs(&mut self, read_only: bool) -> Result<PathBuf> {
        self.mount_fs_with(read_only, false)
    }

    /// Mount the ext4 inside; with `crash_image_ok` (read-only commands on a read-only
    /// mapping), a journal that needs recovery is not replayed but skipped (`noload`), with
    /// a warning: the kernel cannot replay it on a read-only device, and replaying would
    /// write to the server.
    fn mount_fs_with(&mut self, read_only: bool, crash_image_ok: bool) -> Result<PathBuf> {
        signals::check()?;
        let dev = self.mapper.clone().expect("unlock first");
        let target = self.profile.fs_dir();
        std::fs::create_dir_all(&target)?;
        self.stack.push(Undo::Unmount {
            target: target.clone(),
        })?;
        let noload = read_only && crash_image_ok && stack::ext4::needs_recovery(&dev)?;
        if noload {
            warn!(
                "the ext4 journal of {} needs recovery: a run was interrupted (the client died, or the \
                 container was copied mid-run). Mounted read-only WITHOUT replaying the journal (ro,noload), \
                 so nothing is written to {}: every committed snapshot is there, but what the interrupted \
                 run wrote last (its unfinished snapshot, and possibly its last metadata) is not. The next \
                 `run` replays the journal.",
                self.profile.remote_container(),
                self.profile.server.host
            );
        }
        mount::mount_ext4_with(&dev, &target, read_only, noload)?;
        self.fs_root = Some(target.clone());
        Ok(target)
    }

    /// Open the whole stack up to the mounted filesystem.
    pub fn open_all(&mut self, command: &str, read_only: bool) -> Result<PathBuf> {
        self.unlock_container(command, read_only)?;
        self.mount_checked(read_only)
    }

    /// Up to the unlocked LUKS mapping (not mounted): what `verify` fscks.
    pub fn unlock_container(&mut self, command: &str, read_only: bool) -> Result<PathBuf> {
        let p = self.profile;
        let key = luks::read_keyfile(&p.container.keyfile.0)?;
        let facts = self.connect()?;
        if facts.container_size.is_none() {
            return Err(crate::error::usage(format!(
                "no container {} on {}; create it with `e2ebackup init {}`",
                p.remote_container(),
                p.server.host,
                p.name
            )));
        }
        self.mount_server(command)?;
        self.attach(&p.container.file.0, read_only)?;
        info!("unlocking {}", p.remote_container());
        let m = self.unlock(&key, read_only, false)?;
        self.key = Some(key);
        Ok(m)
    }

    /// Mount the unlocked container, check its layout and its authenticated generation.
    ///
    /// Always read-only first, then (for a writing command) remounted read-write only once
    /// both checks passed: a refused rollback or a foreign filesystem leaves the container's
    /// bytes as they were (a read-write mount alone writes the superblock and the journal).
    /// One exception: on a read-write mapping the kernel replays a journal that needs
    /// recovery even for a read-only mount, so after a crash the replay comes before the check.
    pub fn mount_checked(&mut self, read_only: bool) -> Result<PathBuf> {
        let root = self.mount_fs_with(true, read_only)?;
        crate::snapshots::check_layout(&root)?;
        let key = self.key.as_ref().expect("unlocked with the key");
        self.generation = Some(crate::generation::check(
            self.profile,
            &root,
            key,
            self.accept_any_generation,
        )?);
        if !read_only {
            signals::check()?;
            mount::remount_ext4_rw(&root)?;
        }
        Ok(root)
    }

    /// Record one more committed change (snapshot taken or removed) in the container and
    /// on the client.
    pub fn commit_generation(&mut self, root: &Path) -> Result<u64> {
        let next = self.generation.expect("open_all checked the generation") + 1;
        let key = self.key.as_ref().expect("open_all read the key");
        crate::generation::commit(self.profile, root, key, next)?;
        self.generation = Some(next);
        Ok(next)
    }

    /// How much is acquired now; [`Session::close_to`] releases what comes after.
    pub fn mark(&self) -> usize {
        self.stack.len()
    }

    /// Release everything acquired after `mark` (newest first); an error if any of it
    /// could not be released (the records stay for the final teardown).
    pub fn close_to(&mut self, mark: usize) -> Result<()> {
        if let Some(root) = self.fs_root.take() {
            if let Err(e) = mount::syncfs(&root) {
                warn!("syncing {} before unmount: {e:#}", root.display());
            }
        }
        self.mapper = None;
        self.loopdev = None;
        let r = self.stack.unwind_to(mark, &mut stack::Real);
        if !r.complete() {
            r.print();
            bail!("could not release the container between two steps");
        }
        Ok(())
    }

    /// Tear everything down (always). The loop device's descriptor is closed first so that
    /// autoclear can detach it as soon as the mapping lets go.
    pub fn close(mut self) -> Report {
        if let Some(root) = &self.fs_root {
            if let Err(e) = mount::syncfs(root) {
                warn!("syncing {} before unmount: {e:#}", root.display());
            }
        }
        self.loopdev = None;
        self.remote = None;
        self.server = None;
        let r = self.stack.unwind(&mut stack::Real);
        // Only now: a hung server can hang the teardown's own I/O too.
        if let Some(w) = self.watchdog.take() {
            w.stop();
        }
        signals::disarm();
        r.print();
        r
    }

    /// Keep everything up past this process (`e2ebackup mount`).
    pub fn keep_open(&mut self) -> Result<()> {
        self.stack.set_persistent(true)?;
        Ok(())
    }
}
