//! A session walks up the stack for one command and always walks back down.
//!
//! ```text
//!   local lock -> [finish an earlier run's teardown] -> SSH preflight -> sshfs -> server lock
//!   -> loop device -> LUKS -> ext4 mount          ...work...          teardown, in reverse
//! ```
//! Each step pushes its undo record (see [`crate::teardown`]) and checks for a signal before
//! it starts. [`Session::close`] unwinds everything, whatever happened before, and reports
//! whether the teardown was complete.
//!
//! The session is the only owner of what a command acquires: the commands in [`crate::ops`]
//! call its methods, never a stack layer's acquiring function, and never push an undo
//! record themselves. Its fields are private; a step called out of order is an error
//! ("... is not attached"), not a panic.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::error::Failure;
use crate::fsutil::ServerDir;
use crate::profile::Profile;
use crate::stack::{self, lock, loopdev, luks, mount, ssh, sshfs};
use crate::teardown::{self, Journal, Report, Stack, Undo};
use crate::{info, signals, warn};

/// The block device under LUKS: a loop device over the container file on sshfs (every
/// command), or an NBD device served from the server (`trim`, whose discards a loop device
/// over FUSE cannot pass on).
pub enum Backing {
    Loop(loopdev::Loop),
    Nbd(PathBuf),
}

impl Backing {
    pub fn device(&self) -> &Path {
        match self {
            Backing::Loop(l) => &l.device,
            Backing::Nbd(d) => d,
        }
    }
}

pub struct Session<'p> {
    profile: &'p Profile,
    stack: Stack,
    _local: lock::LocalLock,
    remote: Option<ssh::Remote>,
    facts: Option<ssh::Facts>,
    /// The mounted server directory, held open: every server file is opened beneath it
    /// without following links.
    server: Option<ServerDir>,
    backing: Option<Backing>,
    mapper: Option<PathBuf>,
    /// Where the container's ext4 is mounted, once it is.
    fs_root: Option<PathBuf>,
    /// The generation commit synced the container as a command's last write: the
    /// teardown's own syncfs (one more flush, a round trip to the server) is skipped.
    fs_synced: bool,
    /// `init` pins the header it just wrote before it is moved to its final name.
    header_override: Option<PathBuf>,
    /// The keyfile's content, once read.
    key: Option<luks::Key>,
    /// The pinned header the container was unlocked with (checked then).
    unlocked_with: Option<PathBuf>,
    /// The container's authenticated generation, once checked (see [`crate::generation`]).
    generation: Option<u64>,
    /// The authenticated snapshots in commit order (checked against the directory), as this
    /// command changes them: what the next generation commit writes.
    snapshots: Vec<crate::snapid::SnapshotId>,
    /// `accept-rollback`: listed snapshots found missing, and unlisted entries.
    checked: Option<crate::generation::Checked>,
    /// `accept-rollback` only: skip the comparison with the client's record.
    accept_any_generation: bool,
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

/// `cleanup` and `umount`: under the local lock, finish whatever teardown is recorded,
/// a `mount` session's included.
pub fn recover_all(p: &Profile) -> Result<Option<Report>> {
    let _local = lock::lock_local(&p.name)?;
    recover(p, true)
}

/// The preflight's SSH session and what it found: pinned host key, authentication, the
/// server directory, the container's size, the server's free space.
fn preflight(p: &Profile) -> Result<(ssh::Remote, ssh::Facts)> {
    let remote = ssh::Remote::connect(&p.server)?;
    let facts = remote.facts(&p.server.path, &p.remote_container())?;
    Ok((remote, facts))
}

impl<'p> Session<'p> {
    /// Take the local lock and finish any earlier teardown; nothing remote is touched yet.
    pub fn begin(profile: &'p Profile, command: &str) -> Result<Session<'p>> {
        // Every command with a session handles the key: no core dump of this process, and
        // no ptrace or /proc/PID/mem access by this user's other processes (as for ssh-agent).
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            warn!("prctl(PR_SET_DUMPABLE, 0) failed: {e}; a core dump could hold the key");
        }
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
            backing: None,
            mapper: None,
            fs_root: None,
            fs_synced: false,
            header_override: None,
            key: None,
            unlocked_with: None,
            generation: None,
            snapshots: Vec::new(),
            checked: None,
            accept_any_generation: false,
            watchdog: None,
        })
    }

    /// SSH preflight: pinned host key, authentication, server directory, facts.
    pub fn connect(&mut self) -> Result<&ssh::Facts> {
        signals::check()?;
        self.announce_connect();
        let (remote, facts) = preflight(self.profile)?;
        Ok(self.connected(remote, facts))
    }

    /// The preflight ([`Session::connect`]) and the sshfs mount ([`Session::mount_sshfs`])
    /// at the same time: each is an SSH handshake of its own (libssh2's, OpenSSH's), a
    /// dozen round trips, and neither needs the other's result. Nothing is written or
    /// trusted before both are done: sshfs's OpenSSH pins the same host key, and the server
    /// lock and every later step come after the preflight has passed. When both fail, the
    /// preflight's error is the one reported (it names the cause: host key, refused,
    /// unreachable); a mount made meanwhile is undone with the session.
    pub fn connect_and_mount_sshfs(&mut self) -> Result<&ssh::Facts> {
        signals::check()?;
        let p = self.profile;
        // Bad local input (no pinned keys, no identity) is a usage error before anything
        // is started, as it is for the preflight alone.
        ssh::local_files(&p.server)?;
        self.announce_connect();
        let (pre, mounted) = std::thread::scope(|scope| {
            let pre = scope.spawn(|| preflight(p));
            let mounted = self.mount_sshfs();
            (pre.join(), mounted)
        });
        let (remote, facts) =
            pre.map_err(|_| anyhow::anyhow!("the SSH preflight stopped with a panic"))??;
        mounted?;
        Ok(self.connected(remote, facts))
    }

    fn announce_connect(&self) {
        let p = self.profile;
        info!(
            "connecting to {}@{}:{}",
            p.server.user, p.server.host, p.server.port
        );
    }

    fn connected(&mut self, remote: ssh::Remote, facts: ssh::Facts) -> &ssh::Facts {
        if !facts.fsync_supported {
            warn!(
                "the SFTP server on {} does not support fsync@openssh.com: sshfs cannot flush to the \
                 server's disk, so a finished backup is NOT guaranteed durable there until the server \
                 flushes on its own (use OpenSSH's sftp-server or internal-sftp)",
                self.profile.server.host
            );
        }
        self.remote = Some(remote);
        self.facts.insert(facts)
    }

    /// The facts the preflight found (after [`Session::connect`]).
    pub fn facts(&self) -> Result<&ssh::Facts> {
        self.facts.as_ref().context("not connected to the server")
    }

    /// The preflight's SSH session (after [`Session::connect`]).
    pub fn remote(&self) -> Result<&ssh::Remote> {
        self.remote.as_ref().context("not connected to the server")
    }

    /// Read the keyfile (`container.keyfile`) once; later calls keep what was read.
    pub fn read_key(&mut self) -> Result<()> {
        if self.key.is_none() {
            self.key = Some(luks::read_keyfile(&self.profile.container.keyfile.0)?);
        }
        Ok(())
    }

    /// The key (after [`Session::read_key`] or [`Session::use_key`]).
    pub fn key(&self) -> Result<&luks::Key> {
        self.key.as_ref().context("the keyfile was not read")
    }

    /// Use `key` (a keyfile `init` just created) instead of reading the keyfile.
    pub fn use_key(&mut self, key: luks::Key) {
        self.key = Some(key);
    }

    /// Mount the server directory and take the server lock.
    pub fn mount_server(&mut self, command: &str) -> Result<()> {
        self.mount_sshfs()?;
        self.take_server(command)
    }

    /// Mount the server directory with sshfs (and watch it); nothing there is touched yet.
    fn mount_sshfs(&mut self) -> Result<()> {
        signals::check()?;
        let p = self.profile;
        let target = p.sshfs_dir();
        info!("mounting {}:{} with sshfs", p.server.host, p.server.path);
        let daemon = sshfs::mount(&mut self.stack, &p.server, &target)?;
        let dir = ServerDir::open(&target, &format!("{}:{}", p.server.host, p.server.path))?;
        self.watchdog = Some(crate::watchdog::Watchdog::start(
            &p.server.host,
            &target,
            Some(daemon),
            &self.container_path(),
            p.server.stall_limit(),
        ));
        self.server = Some(dir);
        Ok(())
    }

    /// Check the names the tool uses on the mounted server directory and take the server
    /// lock.
    fn take_server(&mut self, command: &str) -> Result<()> {
        signals::check()?;
        let p = self.profile;
        let dir = self
            .server
            .as_ref()
            .context("the server directory is not mounted")?;
        // Before anything is written: every name the tool uses there is absent or a regular
        // file. A planted link, FIFO or device is exit 6, naming it.
        for name in p.server_names() {
            dir.stat(&name)?;
        }
        let lock_name = p.server_lock_name();
        let me = lock::ServerLock::mine(command);
        lock::take_server_lock(&mut self.stack, dir, &lock_name, &me)
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

    /// Create the server file `name` (O_EXCL, beneath the server directory) sized `size`
    /// and sparse, recorded for removal: what `init` builds the container in until it is
    /// complete. The record stays until the session ends; once the file is renamed it is a
    /// no-op.
    pub fn create_partial(&mut self, name: &str, size: u64) -> Result<()> {
        signals::check()?;
        let path = self.server_dir()?.local_path(name);
        self.stack.push(Undo::RemoveFile { path: path.clone() })?;
        let f = self.server_dir()?.create_new(name)?;
        f.set_len(size)
            .with_context(|| format!("sizing {}", path.display()))?;
        Ok(())
    }

    /// Attach a loop device over the server file `name`, opened beneath the server directory
    /// without following links: direct I/O when read-write, buffered when read-only
    /// ([`crate::stack::loopdev`]).
    pub fn attach(&mut self, name: &str, read_only: bool) -> Result<PathBuf> {
        signals::check()?;
        let dir = self
            .server
            .as_ref()
            .context("the server directory is not mounted")?;
        let path = dir.local_path(name);
        let f = dir.open_file(name, read_only)?;
        let l = loopdev::attach(&mut self.stack, &f, &path, read_only)?;
        drop(f);
        let dev = l.device.clone();
        crate::debug!(
            "attached {} (direct I/O: {})",
            dev.display(),
            loopdev::direct_io(&dev)
        );
        self.backing = Some(Backing::Loop(l));
        Ok(dev)
    }

    /// Serve the container from the server over NBD instead of a loop device (`trim`):
    /// an ssh tunnel runs nbdkit on the server, listening on the Unix socket `remote`
    /// (`Profile::remote_nbd_socket`), its local end a socket in a root-only directory: no
    /// TCP port on either side for local users to reach. nbd-client attaches to it.
    pub fn open_nbd(&mut self, remote: &str) -> Result<PathBuf> {
        let p = self.profile;
        let sock = stack::nbd::socket_in(&p.run_dir().join("nbd"))?;
        signals::check()?;
        let tunnel = stack::nbd::start_tunnel(
            &mut self.stack,
            &p.server,
            &p.remote_container(),
            &sock,
            remote,
        )?;
        info!(
            "NBD server starting on the server (Unix socket {remote}), tunnelled to {}",
            sock.display()
        );
        stack::nbd::wait_ready(&sock, &tunnel, std::time::Duration::from_secs(60))?;
        let dev = stack::nbd::connect(&mut self.stack, &sock)?;
        self.backing = Some(Backing::Nbd(dev.clone()));
        Ok(dev)
    }

    /// The attached block device (loop or NBD).
    pub fn device(&self) -> Result<PathBuf> {
        self.backing
            .as_ref()
            .map(|b| b.device().to_path_buf())
            .context("no container device is attached")
    }

    /// The unlocked mapping (after [`Session::unlock`]).
    pub fn mapper(&self) -> Result<PathBuf> {
        self.mapper.clone().context("the container is not unlocked")
    }

    /// Check the header against `path` instead of the profile's pinned header: `init` pins
    /// the header it just wrote before it is moved to its final name.
    pub fn pin_header_at(&mut self, path: PathBuf) {
        self.header_override = Some(path);
    }

    /// Unlock the LUKS container on the attached device with the key ([`Session::key`]).
    /// `discards` only for `trim`.
    pub fn unlock(&mut self, read_only: bool, discards: bool) -> Result<PathBuf> {
        signals::check()?;
        let dev = self.device()?;
        let header = self.pinned_header()?;
        self.read_key()?;
        let key = self.key.as_ref().context("the keyfile was not read")?;
        let m = luks::open(
            &mut self.stack,
            &dev,
            header.as_deref(),
            &self.profile.mapping_name(),
            key,
            read_only,
            discards,
        )?;
        self.mapper = Some(m.clone());
        self.unlocked_with = header;
        if let Err(e) = luks::set_read_ahead(&m, luks::READ_AHEAD_KIB) {
            warn!("read-ahead of {} left at the default: {e:#}", m.display());
        }
        Ok(m)
    }

    /// After the container file grew: the loop device's capacity, then the open mapping,
    /// follow it (the filesystem is the caller's: `ext4::resize_to_fill`).
    pub fn grow_open_container(&mut self) -> Result<()> {
        signals::check()?;
        match &self.backing {
            Some(Backing::Loop(l)) => l.refresh_capacity()?,
            _ => bail!("the container is not attached through a loop device"),
        }
        let header = self.pinned_header()?;
        self.read_key()?;
        let key = self.key()?;
        luks::resize_to_fill(&self.profile.mapping_name(), header.as_deref(), key)
    }

    /// The client's pinned header, after checking the attached device's header against it.
    pub fn pinned_header(&self) -> Result<Option<PathBuf>> {
        let device = self.device()?;
        let h = self.pin_or_trust()?;
        if luks::reencrypt_unfinished(&h)? {
            return Err(luks::reencrypt_unfinished_error(&h, &self.profile.name));
        }
        luks::verify_pinned_header(&device, &h)?;
        luks::check_params(&h)?;
        Ok(Some(h))
    }

    /// The pinned header for a test of the key only (`recover-key`): as
    /// [`Session::pinned_header`], but one that records an unfinished `keys rotate
    /// --reencrypt` is taken as it is (its parameters checked; the server's copy may lag
    /// behind it by a hot zone), so that a client rebuilt in the middle of one can recover
    /// its key and then finish it.
    pub fn pinned_header_for_key_test(&self) -> Result<PathBuf> {
        let h = self.pin_or_trust()?;
        if !luks::reencrypt_unfinished(&h)? {
            luks::verify_pinned_header(&self.device()?, &h)?;
        }
        Ok(h)
    }

    /// The pinned header's path; when there is none and this client has no record of the
    /// container (a rebuilt client), the attached device's header is pinned there first, on
    /// trust, said out loud. The header is not checked here.
    pub fn pin_or_trust(&self) -> Result<PathBuf> {
        let device = self.device()?;
        let device = device.as_path();
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
            // Trust on first use, said out loud once it is done (a header that cannot be
            // read pins nothing): pinned now, every later open is checked.
            if let Some(dir) = h.parent() {
                crate::fsutil::secret_dir(dir)?;
            }
            luks::backup_header(device, &h)?;
            warn!(
                "no pinned LUKS header at {} and no record of this container on this client \
                 (a rebuilt client?): trusted the server's header this once and pinned it there",
                h.display()
            );
        }
        Ok(h)
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
        let dev = self.mapper()?;
        let target = self.profile.fs_dir();
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
        stack::ext4::check_features(&dev)?;
        mount::mount_ext4_with(&mut self.stack, &dev, &target, read_only, noload)?;
        self.fs_root = Some(target.clone());
        self.fs_synced = false;
        Ok(target)
    }

    /// Open the whole stack up to the mounted filesystem.
    pub fn open_all(&mut self, command: &str, read_only: bool) -> Result<PathBuf> {
        self.unlock_container(command, read_only)?;
        self.mount_checked(read_only)
    }

    /// Up to the unlocked LUKS mapping (not mounted): what `verify` fscks.
    pub fn unlock_container(&mut self, command: &str, read_only: bool) -> Result<PathBuf> {
        self.attach_container(command, read_only)?;
        info!("unlocking {}", self.profile.remote_container());
        self.unlock(read_only, false)
    }

    /// Up to the container attached as a block device, still locked: connected, the
    /// server directory mounted and its lock taken. Returns the device.
    pub fn attach_container(&mut self, command: &str, read_only: bool) -> Result<PathBuf> {
        let p = self.profile;
        self.read_key()?;
        let facts = self.connect_and_mount_sshfs()?;
        if facts.container_size.is_none() {
            return Err(crate::error::usage(format!(
                "no container {} on {}; create it with `e2ebackup init {}`",
                p.remote_container(),
                p.server.host,
                p.name
            )));
        }
        self.take_server(command)?;
        self.attach(&p.container.file.0, read_only)
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
        self.check_mounted(&root)?;
        if !read_only {
            signals::check()?;
            mount::remount_ext4(&root, false)?;
        }
        Ok(root)
    }

    /// What every open checks on the mounted filesystem at `root`: our layout, then the
    /// authenticated generation and snapshot list, which the session keeps.
    fn check_mounted(&mut self, root: &Path) -> Result<()> {
        crate::snapshots::check_layout(root)?;
        let key = self.key()?;
        let c = crate::generation::check(self.profile, root, key, self.accept_any_generation)?;
        self.generation = Some(c.generation);
        self.snapshots = c.snapshots.clone();
        self.checked = Some(c);
        Ok(())
    }

    /// On an open mapping that is about to be written by something other than a mounted
    /// filesystem (offline `grow`'s e2fsck and resize2fs): check the layout and the
    /// authenticated generation of what this open reads, on a read-only mount that replays
    /// nothing (`noload` when the journal needs recovery), then unmount it again. The
    /// header was checked by the unlock. A check on an earlier open says nothing about this
    /// one: the server may have swapped the file in between.
    pub fn check_open_container(&mut self) -> Result<()> {
        let mark = self.mark();
        let root = self.mount_fs_with(true, true)?;
        self.check_mounted(&root)?;
        // Read-only: nothing to sync before the unmount.
        self.fs_root = None;
        let r = self.stack.unwind_to(mark, &mut stack::Real);
        if !r.complete() {
            r.print();
            bail!("could not unmount the container after checking it");
        }
        Ok(())
    }

    /// Record one more committed change (snapshot taken or removed) in the container and
    /// on the client. The container is synced by it and must not be written after it:
    /// the teardown does not sync it again.
    pub fn commit_generation(&mut self, root: &Path) -> Result<u64> {
        let next = self
            .generation
            .context("the container's generation was not checked")?
            + 1;
        let key = self.key()?;
        crate::generation::commit(self.profile, root, key, next, &self.snapshots)?;
        self.generation = Some(next);
        self.fs_synced = true;
        Ok(next)
    }

    /// The authenticated snapshots in commit order, oldest first (after
    /// [`Session::mount_checked`]); the last one is "latest".
    pub fn snapshots(&self) -> &[crate::snapid::SnapshotId] {
        &self.snapshots
    }

    /// What the open's check found (missing and unlisted snapshots: `accept-rollback`).
    pub fn checked(&self) -> Option<&crate::generation::Checked> {
        self.checked.as_ref()
    }

    /// A snapshot this command put in place: the next commit lists it last.
    pub fn snapshot_added(&mut self, id: crate::snapid::SnapshotId) {
        self.snapshots.retain(|s| *s != id);
        self.snapshots.push(id);
    }

    /// Snapshots this command removed: the next commit no longer lists them.
    pub fn snapshots_removed(&mut self, ids: &[crate::snapid::SnapshotId]) {
        self.snapshots.retain(|s| !ids.contains(s));
    }

    /// The container's authenticated generation (after [`Session::mount_checked`]).
    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// `accept-rollback`: take the container's generation as it is (its MAC is still
    /// checked), instead of comparing it with the client's record.
    pub fn accept_any_generation(&mut self) {
        self.accept_any_generation = true;
    }

    /// What a restore needs to read a snapshot's data from the server in bulk
    /// ([`crate::snapshots::Warm`]), for a snapshot created at `since` (unix seconds): only on
    /// a read-only loop device, which reads through the container file's page cache; `None`
    /// on any other stack (read-write, NBD), where reading the file ahead would not help.
    pub fn warm_view(&self, since: u64) -> Result<Option<crate::snapshots::Warm>> {
        let Some(Backing::Loop(l)) = &self.backing else {
            return Ok(None);
        };
        if !l.read_only {
            return Ok(None);
        }
        let device = self.mapper()?;
        let offset =
            luks::data_offset(&self.profile.mapping_name(), self.unlocked_with.as_deref())?;
        let container = self
            .server_dir()?
            .open_file(&self.profile.container.file.0, true)?;
        Ok(Some(crate::snapshots::Warm {
            container,
            offset,
            device,
            since,
        }))
    }

    /// Bind the mounted container's snapshots read-only at the held directory `dir`
    /// (`e2ebackup mount`), by descriptor ([`mount::bind_readonly_held`]).
    pub fn bind_snapshots(&mut self, dir: &crate::fsutil::HeldDir) -> Result<()> {
        signals::check()?;
        let root = self
            .fs_root
            .clone()
            .context("the container is not mounted")?;
        mount::bind_readonly_held(
            &mut self.stack,
            &root.join(crate::snapshots::SNAPSHOTS),
            dir,
        )
        .with_context(|| format!("showing the snapshots at {}", dir.shown().display()))
    }

    /// How much is acquired now; [`Session::close_to`] releases what comes after.
    pub fn mark(&self) -> usize {
        self.stack.len()
    }

    /// Release everything acquired after `mark` (newest first); an error if any of it
    /// could not be released (the records stay for the final teardown).
    pub fn close_to(&mut self, mark: usize) -> Result<()> {
        if let Some(root) = self.fs_root.take().filter(|_| !self.fs_synced) {
            if let Err(e) = mount::syncfs(&root) {
                warn!("syncing {} before unmount: {e:#}", root.display());
            }
        }
        self.mapper = None;
        self.unlocked_with = None;
        self.backing = None;
        let r = self.stack.unwind_to(mark, &mut stack::Real);
        if !r.complete() {
            r.print();
            bail!("could not release the container between two steps");
        }
        Ok(())
    }

    /// Like [`Session::close_to`] for a `mark` taken after [`Session::attach_container`]:
    /// unmount and close the mapping, keep the device attached (offline work on the
    /// container: `keys rotate --reencrypt`).
    pub fn relock_to(&mut self, mark: usize) -> Result<()> {
        let backing = self.backing.take();
        let r = self.close_to(mark);
        self.backing = backing;
        r
    }

    /// Tear everything down (always). The loop device's descriptor is closed first so that
    /// autoclear can detach it as soon as the mapping lets go.
    pub fn close(mut self) -> Report {
        if let Some(root) = self.fs_root.as_ref().filter(|_| !self.fs_synced) {
            if let Err(e) = mount::syncfs(root) {
                warn!("syncing {} before unmount: {e:#}", root.display());
            }
        }
        self.backing = None;
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
