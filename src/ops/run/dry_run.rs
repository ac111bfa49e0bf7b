//! `e2ebackup run --dry-run PROFILE`: what a run would write and delete, and what its
//! retention would prune, with nothing written to the container.
//!
//! The container is opened read-only (loop device, LUKS mapping and ext4, as `restore`
//! does; the server lock file is the only thing created on the server, and removed), no
//! `.partial/` is made, no hook runs, nothing is recorded. rsync runs with the run's own
//! argv against the newest snapshot (or an empty directory before the first) with
//! `--dry-run` ([`crate::snapshots::dry_run_command`]).

use std::path::Path;

use anyhow::Result;

use crate::error::{usage, Exit};
use crate::ops::{fail, finish, show_path};
use crate::profile::{Profile, Size};
use crate::session::Session;
use crate::snapid::SnapshotId;
use crate::snapshots::{self, rsync::Item};
use crate::{info, retention};

pub fn dry_run(p: &Profile) -> Exit {
    let problems = snapshots::filters::exclude_from_problems(p);
    if let Some(first) = problems.into_iter().next() {
        return fail(usage(first));
    }
    let mut s = match Session::begin(p, "run-dry-run") {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let r = s
        .open_all("run-dry-run", true)
        .and_then(|root| work(p, &root, s.snapshots()));
    finish(s, &r).0
}

/// What a dry run found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub written: u64,
    pub bytes: u64,
    pub deleted: u64,
}

fn work(p: &Profile, root: &Path, committed: &[SnapshotId]) -> Result<Exit> {
    for s in &p.backup.sources {
        if !s.0.exists() {
            anyhow::bail!("backup source {} does not exist", s.0.display());
        }
    }
    let ids = snapshots::list(root)?;
    let now = SnapshotId::now();
    let (id, prev) = snapshots::new_id(&ids, committed, now);
    // Before the first snapshot everything is new: compare with an empty directory of
    // this client's own (rsync --dry-run writes nothing into it either).
    let empty = p.run_dir().join("dry-run-empty");
    let compare = match prev {
        Some(l) => {
            info!("comparing the sources with snapshot {l}");
            snapshots::path_of(root, l)
        }
        None => {
            info!("no snapshot yet: everything would be sent");
            crate::fsutil::private_dir(&p.run_dir())?;
            let _ = std::fs::remove_dir(&empty);
            std::fs::create_dir(&empty)?;
            empty.clone()
        }
    };
    let rsync = snapshots::dry_run_command(p, &compare)?;
    let mut l = Listing::default();
    let done = rsync.run_streaming(|line| {
        if crate::progress::parse(line).is_some() {
            return false;
        }
        match snapshots::rsync::item(line) {
            Some(it) => {
                println!("{}", l.add(&it));
                false
            }
            None => !line.starts_with("e2ebackup-"),
        }
    });
    if prev.is_none() {
        let _ = std::fs::remove_dir(&empty);
    }
    done?;
    println!(
        "dry run: {} new or changed ({} of file data to send), {} deleted; nothing was written",
        l.written,
        Size(l.bytes),
        l.deleted
    );
    // What the run's retention would do once this snapshot is taken (`prune --dry-run`).
    let mut all = ids.clone();
    all.push(id);
    all.sort();
    if !p.retention.is_empty() && retention::future(&all, now.unix()).is_none() {
        for d in retention::select(&all, &p.retention, now.unix()) {
            if d.removed() {
                println!("prune would remove snapshot {}", d.id);
            }
        }
    }
    Ok(Exit::Ok)
}

impl Listing {
    /// Count an item; its line (`+ /path` written, `- /path` deleted).
    pub fn add(&mut self, it: &Item) -> String {
        use std::os::unix::ffi::OsStrExt;
        let (sign, path) = match it {
            Item::Write(path, len) => {
                self.written += 1;
                self.bytes += len;
                ('+', path)
            }
            Item::Delete(path) => {
                self.deleted += 1;
                ('-', path)
            }
        };
        format!("{sign} /{}", show_path(path.as_os_str().as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshots::rsync::item;

    /// rsync's own itemized output for a dry run against a previous copy: exactly the new,
    /// changed and deleted files, and a new directory.
    #[test]
    fn lists_exactly_what_changed() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        for f in ["same", "changed", "gone", "sub/keep"] {
            std::fs::write(src.join(f), f).unwrap();
        }
        let p = Profile::parse(
            Path::new("/etc/e2ebackup/profiles/t.yaml"),
            &format!(
                "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}}\n\
                 container: {{file: c.luks, size: 1G, keyfile: /key}}\n\
                 backup: {{sources: ['{}']}}\n",
                src.display()
            ),
        )
        .unwrap();
        let snap = d.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        snapshots::rsync_command(&p, &snap, None)
            .unwrap()
            .run()
            .unwrap();
        std::fs::write(src.join("changed"), "changed, longer now").unwrap();
        std::fs::remove_file(src.join("gone")).unwrap();
        std::fs::create_dir(src.join("newdir")).unwrap();
        std::fs::write(src.join("newdir/new\nline"), "12345").unwrap();
        let mut l = Listing::default();
        let mut lines = Vec::new();
        snapshots::dry_run_command(&p, &snap)
            .unwrap()
            .run_streaming(|line| {
                if let Some(it) = item(line) {
                    lines.push(l.add(&it));
                }
                false
            })
            .unwrap();
        lines.sort();
        let s = src.display();
        assert_eq!(
            lines,
            [
                format!("+ {s}/changed"),
                format!("+ {s}/newdir"),
                format!("+ {s}/newdir/new\\#012line"),
                format!("- {s}/gone"),
            ]
        );
        assert_eq!(
            l,
            Listing {
                written: 3,
                bytes: 19 + 5,
                deleted: 1
            }
        );
        // Nothing was written to the compared copy.
        assert_eq!(
            std::fs::read(snap.join(src.strip_prefix("/").unwrap()).join("changed")).unwrap(),
            b"changed"
        );
        assert!(snap
            .join(src.strip_prefix("/").unwrap())
            .join("gone")
            .exists());
    }
}
