//! Per-snapshot manifests: the SHA-256 of every regular file, written at backup time, so
//! `verify` can name every file whose content changed on the server afterwards (XTS has
//! no integrity: a flipped ciphertext bit decrypts to 16 garbled bytes, silently).
//!
//! Format: `manifests/<id>` inside the container, one record per file,
//! `<sha256 hex> <size> <path>\0` with the path relative to the snapshot. Records end in NUL
//! because file names may contain newlines and need not be UTF-8; they cannot contain NUL.
//! Hashing is incremental: a file that rsync hard-linked to the previous snapshot (same
//! inode) has the same content, so its hash is taken from the previous manifest.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

pub const MANIFESTS: &str = "manifests";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub sha256: String,
    pub size: u64,
    /// Relative to the snapshot directory, raw bytes.
    pub path: Vec<u8>,
}

pub fn path_of(root: &Path, id: &str) -> PathBuf {
    root.join(MANIFESTS).join(id)
}

pub fn hash_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", p.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(format!("{} {} ", e.sha256, e.size).as_bytes());
        out.extend_from_slice(&e.path);
        out.push(0);
    }
    out
}

pub fn decode(data: &[u8]) -> Result<Vec<Entry>> {
    let mut v = Vec::new();
    for rec in data.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let mut parts = rec.splitn(3, |b| *b == b' ');
        let (Some(h), Some(s), Some(p)) = (parts.next(), parts.next(), parts.next()) else {
            anyhow::bail!("malformed manifest record");
        };
        v.push(Entry {
            sha256: String::from_utf8_lossy(h).into_owned(),
            size: std::str::from_utf8(s)?.parse()?,
            path: p.to_vec(),
        });
    }
    Ok(v)
}

pub fn read(root: &Path, id: &str) -> Result<Option<Vec<Entry>>> {
    match std::fs::read(path_of(root, id)) {
        Ok(b) => Ok(Some(decode(&b)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Every regular file below `dir`, as paths relative to it (sorted).
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        for e in std::fs::read_dir(&abs).with_context(|| format!("reading {}", abs.display()))? {
            let e = e?;
            let t = e.file_type()?;
            let r = rel.join(e.file_name());
            if t.is_dir() {
                stack.push(r);
            } else if t.is_file() {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Build the manifest of `snap`, reusing hashes of files shared (same inode) with `prev`.
pub fn build(snap: &Path, prev: Option<(&Path, Vec<Entry>)>) -> Result<Vec<Entry>> {
    let known: HashMap<Vec<u8>, Entry> = prev
        .as_ref()
        .map(|(_, es)| es.iter().map(|e| (e.path.clone(), e.clone())).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for rel in walk(snap)? {
        crate::signals::check()?;
        let abs = snap.join(&rel);
        let m = std::fs::symlink_metadata(&abs)?;
        let key = rel.as_os_str().as_bytes().to_vec();
        let reused = prev.as_ref().and_then(|(pdir, _)| {
            let pm = std::fs::symlink_metadata(pdir.join(&rel)).ok()?;
            let e = known.get(&key)?;
            (pm.ino() == m.ino() && pm.dev() == m.dev() && e.size == m.len()).then(|| e.clone())
        });
        out.push(match reused {
            Some(e) => e,
            None => Entry {
                sha256: hash_file(&abs)?,
                size: m.len(),
                path: key,
            },
        });
    }
    Ok(out)
}

/// Write a manifest atomically.
pub fn write(root: &Path, id: &str, entries: &[Entry]) -> Result<()> {
    let dir = root.join(MANIFESTS);
    std::fs::create_dir_all(&dir)?;
    crate::fsutil::write_atomic(&path_of(root, id), &encode(entries))
}

/// Whether `path` belongs to today's share of a rolling `percent` subset: over
/// 100/percent days every file is read once.
pub fn in_rolling_subset(path: &[u8], percent: u32, day: i64) -> bool {
    if percent >= 100 {
        return true;
    }
    let h = Sha256::digest(path);
    let bucket = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % 100;
    let offset = ((day.rem_euclid(100)) as u32 * percent) % 100;
    (bucket + 100 - offset) % 100 < percent
}

/// Compare `snap` against its manifest; returns the paths (lossy, for messages) that differ.
pub fn verify(
    snap: &Path,
    entries: &[Entry],
    percent: u32,
    day: i64,
) -> Result<(u64, Vec<String>)> {
    let mut checked = 0;
    let mut bad = Vec::new();
    for e in entries {
        if !in_rolling_subset(&e.path, percent, day) {
            continue;
        }
        crate::signals::check()?;
        checked += 1;
        let abs = snap.join(OsStr::from_bytes(&e.path));
        let shown = String::from_utf8_lossy(&e.path).into_owned();
        match hash_file(&abs) {
            Ok(h) if h == e.sha256 => {}
            Ok(_) => bad.push(format!("{shown}: content differs from the manifest")),
            Err(err) => bad.push(format!("{shown}: {err:#}")),
        }
    }
    Ok((checked, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_odd_names() {
        let es = vec![
            Entry {
                sha256: "ab".repeat(32),
                size: 3,
                path: b"dir/new\nline".to_vec(),
            },
            Entry {
                sha256: "cd".repeat(32),
                size: 0,
                path: b"latin1-\xe9t\xe9 with space".to_vec(),
            },
        ];
        assert_eq!(decode(&encode(&es)).unwrap(), es);
        assert!(decode(b"garbage\0").is_err());
    }

    #[test]
    fn build_reuses_shared_inodes_and_verify_names_changes() {
        let d = tempfile::tempdir().unwrap();
        let s1 = d.path().join("s1");
        let s2 = d.path().join("s2");
        std::fs::create_dir_all(s1.join("a")).unwrap();
        std::fs::write(s1.join("a/same"), b"same content").unwrap();
        std::fs::write(s1.join("a/changed"), b"old").unwrap();
        let m1 = build(&s1, None).unwrap();
        assert_eq!(m1.len(), 2);
        std::fs::create_dir_all(s2.join("a")).unwrap();
        std::fs::hard_link(s1.join("a/same"), s2.join("a/same")).unwrap();
        std::fs::write(s2.join("a/changed"), b"new").unwrap();
        // Poison s1's manifest entry for the shared file: a reused hash proves no re-read.
        let mut poisoned = m1.clone();
        for e in &mut poisoned {
            if e.path == b"a/same" {
                e.sha256 = "00".repeat(32);
            }
        }
        let m2 = build(&s2, Some((&s1, poisoned))).unwrap();
        let same = m2.iter().find(|e| e.path == b"a/same").unwrap();
        assert_eq!(
            same.sha256,
            "00".repeat(32),
            "hash of a shared inode is reused"
        );
        let m2 = build(&s2, Some((&s1, m1))).unwrap();
        let (n, bad) = verify(&s2, &m2, 100, 0).unwrap();
        assert_eq!((n, bad.len()), (2, 0));
        std::fs::write(s2.join("a/changed"), b"NEW").unwrap();
        let (_, bad) = verify(&s2, &m2, 100, 0).unwrap();
        assert_eq!(
            bad,
            vec!["a/changed: content differs from the manifest".to_string()]
        );
    }

    #[test]
    fn rolling_subset_covers_everything_over_its_period() {
        let paths: Vec<Vec<u8>> = (0..2000).map(|i| format!("f{i}").into_bytes()).collect();
        let mut seen = vec![false; paths.len()];
        for day in 0..10 {
            let mut today = 0;
            for (i, p) in paths.iter().enumerate() {
                if in_rolling_subset(p, 10, day) {
                    seen[i] = true;
                    today += 1;
                }
            }
            assert!(
                (120..=280).contains(&today),
                "day {day}: {today} of 2000 at 10%"
            );
        }
        assert!(seen.iter().all(|s| *s), "10 days at 10% read every file");
    }
}
