//! Every name and path the tool derives, in one place: directories on the client, mount
//! points, the device-mapper name, the journal, lock and state files, and the names next to
//! the container on the server. Everything else asks here (like stratisd's `names.rs`), so
//! that a change of layout, or a security fix to how a name is formed, is made once.
//!
//! ```text
//!   /run/e2ebackup/                  RUN_DIR (tmpfs: gone after a reboot, like mounts)
//!     lock/NAME.lock                 local flock (root, 0700: not the shared /run/lock)
//!     NAME/undo.json                 undo journal
//!     NAME/server/                   sshfs mount of server.path
//!     NAME/fs/                       the container's ext4
//!   /var/lib/e2ebackup/NAME/         STATE_DIR: generation, last-run.json, verify-cursor
//!   <keyfile>.header, <keyfile>.escrow.age      pinned header, client escrow copy
//!   server.path/<file>, <file>.lock, <file>.escrow.age, <file>.init-partial
//!   /dev/mapper/e2ebackup-NAME
//! ```

use std::path::{Path, PathBuf};

use crate::profile::Profile;

/// Runtime state: mount points, undo journals and local locks.
pub const RUN_DIR: &str = "/run/e2ebackup";
/// Persistent state: generation record, last run.
pub const STATE_DIR: &str = "/var/lib/e2ebackup";

/// The root-owned 0700 directory of the local locks.
pub fn local_lock_dir() -> PathBuf {
    Path::new(RUN_DIR).join("lock")
}

/// The local lock of profile `name`.
pub fn local_lock_path(name: &str) -> PathBuf {
    local_lock_dir().join(format!("{name}.lock"))
}

impl Profile {
    pub fn header_backup(&self) -> PathBuf {
        match &self.container.header_backup {
            Some(p) => p.0.clone(),
            None => {
                let mut s = self.container.keyfile.0.clone().into_os_string();
                s.push(".header");
                PathBuf::from(s)
            }
        }
    }

    /// The client's copy of the key escrow.
    pub fn escrow_client(&self) -> PathBuf {
        let mut s = self.container.keyfile.0.clone().into_os_string();
        s.push(".escrow.age");
        PathBuf::from(s)
    }

    /// The escrow's file name next to the container on the server.
    pub fn escrow_server_name(&self) -> String {
        format!("{}.escrow.age", self.container.file.0)
    }

    /// Name of an unfinished `init`'s container on the server.
    pub fn init_partial_name(&self) -> String {
        format!("{}.init-partial", self.container.file.0)
    }

    /// Every name the tool reads or writes in the server directory: each must be absent or
    /// a regular file.
    pub fn server_names(&self) -> Vec<String> {
        let c = &self.container.file.0;
        vec![
            c.clone(),
            self.init_partial_name(),
            self.escrow_server_name(),
            self.server_lock_name(),
        ]
    }

    /// Device-mapper name of the opened container.
    pub fn mapping_name(&self) -> String {
        format!("e2ebackup-{}", self.name)
    }

    /// Per-profile runtime directory (mount points, undo journal): gone after a reboot,
    /// exactly like the mounts it describes.
    pub fn run_dir(&self) -> PathBuf {
        Path::new(RUN_DIR).join(&self.name)
    }

    /// Persistent per-profile state (last run, committed generation).
    pub fn state_dir(&self) -> PathBuf {
        Path::new(STATE_DIR).join(&self.name)
    }

    /// The container path as seen on the server.
    pub fn remote_container(&self) -> String {
        format!(
            "{}/{}",
            self.server.path.trim_end_matches('/'),
            self.container.file.0
        )
    }

    /// Where `trim`'s nbdkit listens on the server: a Unix socket beside the container, in
    /// the server account's own directory. `login_dir` is where a relative `server.path`
    /// starts (the account's login directory, as SFTP resolves it).
    pub fn remote_nbd_socket(&self, login_dir: &str) -> String {
        let dir = self.server.path.trim_end_matches('/');
        let dir = if dir.starts_with('/') {
            dir.to_string()
        } else {
            format!("{}/{dir}", login_dir.trim_end_matches('/'))
        };
        format!("{dir}/.{}.nbd", self.container.file.0)
    }

    /// The undo journal of this profile's commands.
    pub fn journal_path(&self) -> PathBuf {
        self.run_dir().join("undo.json")
    }

    /// Where the server directory is mounted with sshfs.
    pub fn sshfs_dir(&self) -> PathBuf {
        self.run_dir().join("server")
    }

    /// Where the container's ext4 is mounted.
    pub fn fs_dir(&self) -> PathBuf {
        self.run_dir().join("fs")
    }

    /// The last generation this client committed.
    pub fn generation_record(&self) -> PathBuf {
        self.state_dir().join("generation")
    }

    /// The snapshot list of the last generation this client committed, and what it was
    /// about to add or remove ([`crate::generation::ClientRecord`]).
    pub fn snapshot_record(&self) -> PathBuf {
        self.state_dir().join("snapshots.json")
    }

    /// Where `verify --read-data` goes on from: the next bucket of the rolling subset.
    pub fn verify_cursor_path(&self) -> PathBuf {
        self.state_dir().join("verify-cursor")
    }

    /// The status file of the last command.
    pub fn last_run_path(&self) -> PathBuf {
        self.state_dir().join("last-run.json")
    }

    /// Name of the server lock next to the container.
    pub fn server_lock_name(&self) -> String {
        format!("{}.lock", self.container.file.0)
    }

    /// `keys rotate`: the new keyfile until it replaces the keyfile.
    pub fn keyfile_new(&self) -> PathBuf {
        with_suffix(&self.container.keyfile.0, ".new")
    }

    /// `keys rotate`: the replaced keyfile, until the new one has opened the container.
    pub fn keyfile_old(&self) -> PathBuf {
        with_suffix(&self.container.keyfile.0, ".old")
    }

    /// `keys rotate --reencrypt`: the copy of the pinned header on which the re-encryption
    /// is recorded, until it replaces the pinned header.
    pub fn header_reencrypt_work(&self) -> PathBuf {
        with_suffix(&self.header_backup(), ".reencrypt")
    }

    /// `keys rotate --reencrypt`: there while the volume key has been changed but the
    /// keyfile rotation that follows has not finished, so that running the command again
    /// rotates the keyfile without re-encrypting everything once more.
    pub fn reencrypted_marker(&self) -> PathBuf {
        self.state_dir().join("reencrypted")
    }
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(server_path: &str) -> Profile {
        Profile::parse(
            Path::new("/etc/e2ebackup/profiles/p.yaml"),
            &format!(
                "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: '{server_path}'}}\n\
                 container: {{file: c.luks, size: 1G, keyfile: /key}}\n\
                 backup: {{sources: [/etc]}}\n"
            ),
        )
        .unwrap()
    }

    #[test]
    fn the_nbd_socket_lies_beside_the_container() {
        assert_eq!(
            profile("/srv/b/").remote_nbd_socket("/home/u"),
            "/srv/b/.c.luks.nbd"
        );
        // A relative server.path starts at the login directory, as SFTP resolves it.
        assert_eq!(
            profile("backups").remote_nbd_socket("/home/u/"),
            "/home/u/backups/.c.luks.nbd"
        );
        assert_eq!(
            profile("/srv/b").remote_container(),
            "/srv/b/c.luks",
            "its container, in the same directory"
        );
    }
}
