//! The source's hard links in a snapshot. `rsync --link-dest` links each name to the
//! previous snapshot's file of the same name when it looks unchanged (content by size and
//! time, mode, owner). Two names that were one inode in the previous snapshot and are two
//! independent files in the source now (one replaced by an identical copy) so come out as
//! one inode again, and a restore (`rsync -H`) would make them hard links: writing one would
//! change the other. `manifest::build` finds such names by comparing each inode's names
//! with the source's inodes; [`copy_again`] copies them once more from the source, without
//! `--link-dest`, before the manifest is written anew.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::manifest::Fresh;
use crate::profile::Profile;

use super::rsync::{copy_again_command, wrote, WROTE};

/// Remove the `names` (relative to the snapshot directory `dest`, which is also their path
/// below `/` in the source) from `dest` and copy them again from the source with rsync,
/// without `--link-dest`: every one a new inode, linked only to those of `names` that share
/// an inode in the source. Returns rsync's checksums of what it copied.
pub fn copy_again(profile: &Profile, dest: &Path, names: &[PathBuf]) -> Result<Fresh> {
    for n in names {
        let p = dest.join(n);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
    }
    // The list lives in the run's own directory on the client (root's, 0700), not in the
    // container: nothing is read back from the server.
    let (list, f) = crate::fsutil::write_temp_with(&profile.run_dir().join("copy-again"), |w| {
        for n in names {
            w.write_all(n.as_os_str().as_bytes())?;
            w.write_all(&[0])?;
        }
        Ok(())
    })?;
    drop(f);
    let r = copy_again_from(&list, dest);
    let _ = std::fs::remove_file(&list);
    r
}

fn copy_again_from(list: &Path, dest: &Path) -> Result<Fresh> {
    let cmd = copy_again_command(list, dest)?;
    let mut fresh = Fresh::default();
    cmd.run_streaming(|line| {
        if line.starts_with(WROTE) {
            if let Some((p, Some(d))) = wrote(line) {
                fresh.record(&dest.join(p), d);
            }
            return false;
        }
        true
    })
    .context("copying again the files --link-dest linked unlike the source")?;
    Ok(fresh.seal())
}
