//! `diff` and `find`: questions about the history, answered from the manifests (one record
//! per regular file: hash, size, path; sorted by path), with the container opened
//! read-only, as `snapshots` does. No snapshot tree is walked.

use std::cmp::Ordering;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::error::Exit;
use crate::manifest::{self, Entry};
use crate::ops::restore::{resolve, with_readonly};
use crate::ops::show_path;
use crate::profile::Profile;
use crate::{info, warn};

/// How a file differs between two snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Removed,
    /// Other content (hash or size).
    Changed,
}

impl Change {
    fn sign(self) -> char {
        match self {
            Change::Added => '+',
            Change::Removed => '-',
            Change::Changed => 'M',
        }
    }
}

fn manifest_of(root: &Path, id: &str) -> Result<manifest::FileRecords> {
    manifest::open(root, id)?
        .with_context(|| format!("snapshot {id} has no manifest (taken by an older version?)"))
}

pub fn diff(p: &Profile, a: &str, b: &str) -> Exit {
    with_readonly(p, "diff", |s, root| {
        let committed = s.snapshots();
        let (ia, ib) = (
            resolve(committed, a)?.to_string(),
            resolve(committed, b)?.to_string(),
        );
        let n = diff_records(manifest_of(root, &ia)?, manifest_of(root, &ib)?, |c, e| {
            println!("{} /{}", c.sign(), show_path(&e.path))
        })?;
        info!(
            "{ia} -> {ib}: {} added, {} removed, {} changed",
            n[0], n[1], n[2]
        );
        Ok(())
    })
    .0
}

/// Merge two manifests (each sorted by path, as [`manifest::build`] writes them) and hand
/// every difference to `out`, in path order. Returns the counts (added, removed, changed).
/// A manifest out of order is damage, and said so: a merge over it would report nonsense.
pub fn diff_records(
    a: impl Iterator<Item = Result<Entry>>,
    b: impl Iterator<Item = Result<Entry>>,
    mut out: impl FnMut(Change, &Entry),
) -> Result<[u64; 3]> {
    let mut a = Ordered::new(a, "the older");
    let mut b = Ordered::new(b, "the newer");
    let (mut x, mut y) = (a.next()?, b.next()?);
    let mut n = [0u64; 3];
    loop {
        let ord = match (&x, &y) {
            (None, None) => return Ok(n),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(ea), Some(eb)) => as_path(ea).cmp(as_path(eb)),
        };
        match ord {
            Ordering::Less => {
                out(Change::Removed, x.as_ref().expect("some"));
                n[1] += 1;
                x = a.next()?;
            }
            Ordering::Greater => {
                out(Change::Added, y.as_ref().expect("some"));
                n[0] += 1;
                y = b.next()?;
            }
            Ordering::Equal => {
                let (ea, eb) = (x.as_ref().expect("some"), y.as_ref().expect("some"));
                if ea.hash != eb.hash || ea.size != eb.size {
                    out(Change::Changed, eb);
                    n[2] += 1;
                }
                x = a.next()?;
                y = b.next()?;
            }
        }
    }
}

fn as_path(e: &Entry) -> &Path {
    Path::new(OsStr::from_bytes(&e.path))
}

/// A manifest's records, each checked to come after the one before.
struct Ordered<I> {
    it: I,
    last: Option<Vec<u8>>,
    what: &'static str,
}

impl<I: Iterator<Item = Result<Entry>>> Ordered<I> {
    fn new(it: I, what: &'static str) -> Self {
        Ordered {
            it,
            last: None,
            what,
        }
    }

    fn next(&mut self) -> Result<Option<Entry>> {
        let Some(e) = self.it.next().transpose()? else {
            return Ok(None);
        };
        if let Some(l) = &self.last {
            if Path::new(OsStr::from_bytes(l)) >= as_path(&e) {
                bail!(
                    "{} snapshot's manifest is not in path order at /{} (damaged?): run `e2ebackup verify`",
                    self.what,
                    show_path(&e.path)
                );
            }
        }
        self.last = Some(e.path.clone());
        Ok(Some(e))
    }
}

/// A shell glob (fnmatch(3), `*` also crossing `/`): against the whole absolute path if the
/// pattern has a `/`, else against the file name.
pub struct Glob {
    pattern: CString,
    whole_path: bool,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob> {
        Ok(Glob {
            pattern: CString::new(pattern).context("a pattern cannot contain a NUL byte")?,
            whole_path: pattern.contains('/'),
        })
    }

    /// Whether `path` (relative to the snapshot, as the manifest has it) matches.
    pub fn matches(&self, path: &[u8]) -> bool {
        let subject: Vec<u8> = if self.whole_path {
            [b"/".as_slice(), path].concat()
        } else {
            path.rsplit(|b| *b == b'/').next().unwrap_or(path).to_vec()
        };
        let Ok(s) = CString::new(subject) else {
            return false;
        };
        // SAFETY: both are NUL-terminated strings that live across the call.
        unsafe { libc::fnmatch(self.pattern.as_ptr(), s.as_ptr(), 0) == 0 }
    }
}

pub fn find(p: &Profile, pattern: &str) -> Exit {
    let glob = match Glob::new(pattern) {
        Ok(g) => g,
        Err(e) => return super::fail(crate::error::usage(format!("{e:#}"))),
    };
    with_readonly(p, "find", |s, root| {
        let mut hits = 0u64;
        // The authenticated list, in commit order.
        for id in s.snapshots().to_vec() {
            let id = id.to_string();
            let Some(records) = manifest::open(root, &id)? else {
                warn!("snapshot {id} has no manifest: not searched");
                continue;
            };
            for e in records {
                let e = e?;
                if glob.matches(&e.path) {
                    println!("{id} {:>12} /{}", e.size, show_path(&e.path));
                    hits += 1;
                }
            }
        }
        info!("{hits} match(es) for `{pattern}`");
        Ok(())
    })
    .0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(list: &[(&str, u64, &str)]) -> Vec<u8> {
        manifest::encode(
            &list
                .iter()
                .map(|(h, s, p)| Entry {
                    hash: Some(h.repeat(40)),
                    size: *s,
                    group: 0,
                    path: p.as_bytes().to_vec(),
                })
                .collect::<Vec<_>>(),
        )
    }

    fn run(a: &[u8], b: &[u8]) -> Result<(Vec<String>, [u64; 3])> {
        let mut lines = Vec::new();
        let n = diff_records(
            manifest::Records::new(a, "a"),
            manifest::Records::new(b, "b"),
            |c, e| lines.push(format!("{} /{}", c.sign(), show_path(&e.path))),
        )?;
        Ok((lines, n))
    }

    #[test]
    fn diff_of_two_small_manifests() {
        // Path order, component by component: `a/b` before `a-b` (as the walk writes them).
        let a = records(&[
            ("0", 1, "a/b"),
            ("1", 1, "a-b"),
            ("2", 5, "home/gone"),
            ("3", 5, "home/same"),
            ("4", 5, "home/size"),
            ("5", 9, "z"),
        ]);
        let b = records(&[
            ("0", 1, "a/b"),
            ("9", 1, "a-b"),
            ("3", 5, "home/same"),
            ("4", 6, "home/size"),
            ("6", 1, "home/sub/new\nline"),
            ("5", 9, "z"),
            ("7", 1, "zz"),
        ]);
        let (lines, n) = run(&a, &b).unwrap();
        assert_eq!(
            lines,
            [
                "M /a-b",
                "- /home/gone",
                "M /home/size",
                "+ /home/sub/new\\#012line",
                "+ /zz"
            ]
        );
        assert_eq!(n, [2, 1, 2]);
        let (none, n) = run(&a, &a).unwrap();
        assert!(none.is_empty() && n == [0, 0, 0]);
        let (all, n) = run(b"", &a).unwrap();
        assert_eq!((all.len(), n), (6, [6, 0, 0]));
        // Out of order is damage, not a difference.
        let bad = records(&[("0", 1, "b"), ("1", 1, "a")]);
        let e = run(&a, &bad).unwrap_err().to_string();
        assert!(e.contains("not in path order at /a"), "{e}");
    }

    #[test]
    fn globs_match_names_or_whole_paths() {
        let g = Glob::new("*.pdf").unwrap();
        assert!(g.matches(b"home/u/doc.pdf") && g.matches(b"x.pdf"));
        assert!(!g.matches(b"home/u/doc.pdf.txt") && !g.matches(b"home/x.pdf/y"));
        let g = Glob::new("/home/*/notes.txt").unwrap();
        assert!(g.matches(b"home/u/notes.txt") && g.matches(b"home/u/deep/notes.txt"));
        assert!(!g.matches(b"srv/home/u/notes.txt") && !g.matches(b"home/u/notes.txt2"));
        assert!(Glob::new("/etc/[ab]?").unwrap().matches(b"etc/bc"));
        assert!(Glob::new("a\0b").is_err());
    }
}
