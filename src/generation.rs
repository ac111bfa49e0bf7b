//! Rollback and replay detection, above the block layer.
//!
//! LUKS2 with XTS hides data but cannot tell an old sector from a new one: a server can
//! hand back yesterday's container (or last month's) and it decrypts fine. So the container
//! holds a `STATE` file with a generation counter and the list of snapshots, authenticated
//! with HMAC-SHA256 under a key derived from the keyfile (the server cannot forge it), and
//! the client remembers the last generation it committed in
//! `/var/lib/e2ebackup/<profile>/generation`. Every open compares the two: a container older
//! than the client's record is refused (exit 6) before anything is written.
//!
//! Commit order: the container's STATE first (synced), the client's record second. A crash
//! in between leaves the container one generation ahead, which is accepted; the opposite
//! order would raise a false alarm. The `syncfs` also matters for a crash image read with
//! `ro,noload` (no journal replay): it writes the journaled metadata home after the journal
//! commit, where the file and directory fsyncs alone leave it in the journal, so such an
//! image shows the committed generation, not the one before (tests/host_crash_noload.rs).
//! After a deliberate restore of the server from an older
//! backup, `e2ebackup accept-rollback PROFILE` lowers the client's record to the container's.

use std::path::Path;

use anyhow::{Context, Result};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Failure;
use crate::profile::Profile;
use crate::stack::luks::Key;
use crate::warn;

pub const STATE_FILE: &str = "STATE";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub generation: u64,
    pub snapshots: Vec<String>,
    /// When this generation was committed (snapshot id form).
    pub written: String,
    /// Hex HMAC-SHA256 of the fields above.
    pub mac: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A key for this purpose only, so the MAC reveals nothing about the LUKS keyslot key.
/// Zeroed when dropped (`Zeroizing`), like the key it is derived from.
fn mac_key(key: &Key) -> zeroize::Zeroizing<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(b"e2ebackup generation MAC v1\0");
    h.update(key.bytes());
    zeroize::Zeroizing::new(h.finalize().into())
}

fn compute_mac(key: &Key, generation: u64, snapshots: &[String], written: &str) -> String {
    let mk = mac_key(key);
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&mk[..]).expect("any key length");
    m.update(format!("generation {generation}\nwritten {written}\n").as_bytes());
    for s in snapshots {
        m.update(format!("snapshot {s}\n").as_bytes());
    }
    hex(&m.finalize().into_bytes())
}

/// Read and authenticate the container's STATE (None for a container without one yet).
pub fn read_verified(root: &Path, key: &Key) -> Result<Option<State>> {
    let p = root.join(STATE_FILE);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    let st: State = serde_json::from_slice(&bytes).map_err(|e| {
        Failure::Security(format!(
            "the container's STATE record is unreadable ({e}): damaged or tampered with"
        ))
    })?;
    let want = compute_mac(key, st.generation, &st.snapshots, &st.written);
    // Compare in constant time: the MAC is secret-dependent.
    let ok = want.len() == st.mac.len()
        && want
            .bytes()
            .zip(st.mac.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !ok {
        return Err(Failure::Security(
            "the container's STATE record does not authenticate with this keyfile: it was altered"
                .into(),
        )
        .into());
    }
    Ok(Some(st))
}

/// The last generation this client committed, if any.
pub fn client_generation(p: &Profile) -> Result<Option<u64>> {
    match std::fs::read_to_string(p.generation_record()) {
        Ok(s) => Ok(Some(s.trim().parse().with_context(|| {
            format!("{} is not a number", p.generation_record().display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn set_client_generation(p: &Profile, generation: u64) -> Result<()> {
    crate::fsutil::private_dir(&p.state_dir())?;
    crate::fsutil::write_atomic(&p.generation_record(), format!("{generation}\n").as_bytes())
}

/// The decision, separated from I/O so it is tested on its own.
pub fn judge(container: Option<u64>, client: Option<u64>) -> Result<u64, String> {
    match (container, client) {
        (Some(c), Some(k)) if c < k => Err(format!(
            "the container is at generation {c} but this client already committed generation {k}: \
             the server handed back an OLDER copy of the container (rollback or replay). Refusing \
             to use it. If you restored the server from an older backup on purpose, run \
             `e2ebackup accept-rollback PROFILE`"
        )),
        (None, Some(k)) if k > 0 => Err(format!(
            "the container has no STATE record but this client already committed generation {k}: \
             it was replaced by an older or foreign container. If that was deliberate, run \
             `e2ebackup accept-rollback PROFILE`"
        )),
        (c, _) => Ok(c.unwrap_or(0)),
    }
}

/// Check the mounted container against the client's record; returns its generation.
/// With `accept_any`, only the MAC is checked (`accept-rollback`).
pub fn check(p: &Profile, root: &Path, key: &Key, accept_any: bool) -> Result<u64> {
    let st = match read_verified(root, key) {
        Ok(st) => st,
        Err(e) => match read_with_replaced_key(p, root) {
            Some(st) => Some(st),
            None => return Err(e),
        },
    };
    let client = if accept_any {
        None
    } else {
        client_generation(p)?
    };
    let generation = judge(st.as_ref().map(|s| s.generation), client).map_err(Failure::Security)?;
    for s in st.iter().flat_map(|st| &st.snapshots) {
        if !root.join(crate::snapshots::SNAPSHOTS).join(s).is_dir() {
            warn!("snapshot {s} is in the authenticated list but missing from the container (damaged?)");
        }
    }
    Ok(generation)
}

/// A STATE signed with the keyfile that an interrupted `keys rotate` replaced (the keyfile
/// was swapped, the STATE not yet re-signed): the old keyfile is this client's own secret,
/// kept as `<keyfile>.old` until the rotation is done, so the record is still authentic. The
/// next commit signs it with the new keyfile.
fn read_with_replaced_key(p: &Profile, root: &Path) -> Option<State> {
    let old = p.keyfile_old();
    let key = crate::stack::luks::read_keyfile(&old).ok()?;
    let st = read_verified(root, &key).ok()??;
    warn!(
        "the container's STATE is signed with the replaced keyfile {} (an interrupted `keys rotate`): \
         accepted; the next commit signs it with the new keyfile",
        old.display()
    );
    Some(st)
}

/// Write generation `generation` with the current snapshot list, then the client's record.
pub fn commit(p: &Profile, root: &Path, key: &Key, generation: u64) -> Result<()> {
    let snapshots: Vec<String> = crate::snapshots::list(root)?
        .iter()
        .map(|s| s.to_string())
        .collect();
    let written = crate::snapid::SnapshotId::now().to_string();
    let mac = compute_mac(key, generation, &snapshots, &written);
    let st = State {
        generation,
        snapshots,
        written,
        mac,
    };
    store(root, &serde_json::to_vec_pretty(&st)?)?;
    set_client_generation(p, generation)
}

/// Put `data` in place as the container's STATE, durably: a temporary file, synced,
/// renamed over STATE, then one `syncfs` of the container. The syncfs commits the rename
/// (so no directory fsync, which would be one more journal commit: each commit is a few
/// serial round trips to the server and the server's fsync) and writes the journaled
/// metadata home, which a `ro,noload` mount of a crash image depends on
/// (tests/host_crash_noload.rs).
pub fn store(root: &Path, data: &[u8]) -> Result<()> {
    crate::fsutil::replace_with(&root.join(STATE_FILE), |w| {
        std::io::Write::write_all(w, data).map_err(Into::into)
    })?;
    crate::stack::mount::syncfs(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_refuses_only_older_containers() {
        assert_eq!(judge(Some(5), Some(5)), Ok(5));
        assert_eq!(
            judge(Some(6), Some(5)),
            Ok(6),
            "one ahead after a crash between the two writes"
        );
        assert_eq!(
            judge(Some(0), None),
            Ok(0),
            "a client without a record accepts"
        );
        assert_eq!(judge(None, None), Ok(0));
        assert_eq!(judge(None, Some(0)), Ok(0));
        assert!(judge(Some(4), Some(5)).unwrap_err().contains("OLDER"));
        assert!(judge(None, Some(3)).unwrap_err().contains("no STATE"));
    }

    fn key(b: u8) -> Key {
        crate::stack::luks::tests_key(vec![b; 64])
    }

    #[test]
    fn state_authenticates_and_detects_edits() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        crate::snapshots::create_layout(root).unwrap();
        std::fs::create_dir(root.join("snapshots/20260101T000000Z")).unwrap();
        let k = key(1);
        let snaps = vec!["20260101T000000Z".to_string()];
        let w = "20260101T000001Z";
        let st = State {
            generation: 3,
            snapshots: snaps.clone(),
            written: w.into(),
            mac: compute_mac(&k, 3, &snaps, w),
        };
        std::fs::write(root.join(STATE_FILE), serde_json::to_vec(&st).unwrap()).unwrap();
        assert_eq!(read_verified(root, &k).unwrap().unwrap().generation, 3);
        // Another keyfile cannot verify (nor forge) it.
        let e = read_verified(root, &key(2)).unwrap_err();
        assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Security);
        // A server that bumps the counter without the key is caught.
        let mut forged = st.clone();
        forged.generation = 9;
        std::fs::write(root.join(STATE_FILE), serde_json::to_vec(&forged).unwrap()).unwrap();
        assert!(read_verified(root, &k).is_err());
        std::fs::write(root.join(STATE_FILE), b"{not json").unwrap();
        assert!(read_verified(root, &k).is_err());
    }
}
