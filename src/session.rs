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

use anyhow::{bail, Result};

use crate::error::Failure;
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
}

pub fn journal_path(p: &Profile) -> PathBuf {
    p.run_dir().join("undo.json")
}

pub fn sshfs_dir(p: &Profile) -> PathBuf {
    p.run_dir().join("server")
}

pub fn fs_dir(p: &Profile) -> PathBuf {
    p.run_dir().join("fs")
}

/// Finish the teardown recorded by an earlier process, if any. With `include_persistent`
/// also a `mount` session's (that is what `umount` and `cleanup` do).
pub fn recover(p: &Profile, include_persistent: bool) -> Result<Option<Report>> {
    let path = journal_path(p);
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
        let local = lock::lock_local(&profile.name)?;
        if let Some(r) = recover(profile, false)? {
            if !r.complete() {
                bail!("could not finish the teardown of an earlier run; fix the cause above, then run `e2ebackup cleanup {}`", profile.name);
            }
        }
        let stack = Stack::persistent(journal_path(profile), command)?;
        Ok(Session {
            profile,
            stack,
            _local: local,
            remote: None,
            facts: None,
            loopdev: None,
            mapper: None,
            fs_root: None,
            header_override: None,
            key: None,
            generation: None,
            accept_any_generation: false,
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
        let target = sshfs_dir(p);
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
        signals::check()?;
        let lock_path = lock::server_lock_path(&target, &p.container.file.0);
        let me = lock::ServerLock::mine(command);
        self.stack.push(Undo::ReleaseServerLock {
            path: lock_path.clone(),
            token: me.token.clone(),
        })?;
        lock::acquire_server_lock(&lock_path, &me)?;
        Ok(())
    }

    /// The container file as seen through sshfs.
    pub fn container_path(&self) -> PathBuf {
        sshfs_dir(self.profile).join(&self.profile.container.file.0)
    }

    /// Attach a loop device (direct I/O) over `file`.
    pub fn attach(&mut self, file: &Path, read_only: bool) -> Result<PathBuf> {
        signals::check()?;
        let l = loopdev::attach(file, read_only)?;
        let dev = l.device.clone();
        self.stack.push(Undo::DetachLoop {
            device: dev.clone(),
            backing: file.to_path_buf(),
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
            warn!(
                "no pinned LUKS header at {}: the server's header is used unchecked",
                h.display()
            );
            return Ok(None);
        }
        luks::verify_pinned_header(device, &h)?;
        Ok(Some(h))
    }

    /// Mount the ext4 inside.
    pub fn mount_fs(&mut self, read_only: bool) -> Result<PathBuf> {
        signals::check()?;
        let dev = self.mapper.clone().expect("unlock first");
        let target = fs_dir(self.profile);
        std::fs::create_dir_all(&target)?;
        self.stack.push(Undo::Unmount {
            target: target.clone(),
        })?;
        mount::mount_ext4(&dev, &target, read_only)?;
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
        let file = self.container_path();
        self.attach(&file, read_only)?;
        info!("unlocking {}", p.remote_container());
        let m = self.unlock(&key, read_only, false)?;
        self.key = Some(key);
        Ok(m)
    }

    /// Mount the unlocked container, check its layout and its authenticated generation.
    pub fn mount_checked(&mut self, read_only: bool) -> Result<PathBuf> {
        let root = self.mount_fs(read_only)?;
        crate::snapshots::check_layout(&root)?;
        let key = self.key.as_ref().expect("unlocked with the key");
        self.generation = Some(crate::generation::check(
            self.profile,
            &root,
            key,
            self.accept_any_generation,
        )?);
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
        let r = self.stack.unwind(&mut stack::Real);
        r.print();
        r
    }

    /// Keep everything up past this process (`e2ebackup mount`).
    pub fn keep_open(&mut self) -> Result<()> {
        self.stack.set_persistent(true)?;
        Ok(())
    }
}
