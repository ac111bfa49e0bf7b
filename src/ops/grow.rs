//! `e2ebackup grow PROFILE --size SIZE|+SIZE`: enlarge the container, never shrink it.
//!
//! Offline (default): check the container on a read-only open, enlarge the file, attach,
//! unlock (LUKS2's data segment follows the device size), check the header, layout and
//! generation again on this open (the server may have swapped the file since the first),
//! `e2fsck -f`, `resize2fs`. Online (`--online`): mount first, then enlarge the
//! file, refresh the loop device's capacity, resize the LUKS mapping (needs the key again)
//! and `resize2fs` the mounted filesystem. Both are idempotent for an absolute size: a grow
//! interrupted anywhere is completed by running the same command again (the file is only
//! ever enlarged, and resize2fs of a filesystem that already fills its device is a no-op).

use anyhow::{Context, Result};

use crate::error::{usage, Exit};
use crate::ops::{fail, finish};
use crate::profile::{Profile, Size};
use crate::session::Session;
use crate::stack::{ext4, luks};
use crate::{info, warn};

/// `3G` (absolute) or `+1G` (relative to the current size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrowTo {
    Absolute(u64),
    Plus(u64),
}

pub fn parse_spec(s: &str) -> Result<GrowTo> {
    let (plus, rest) = match s.strip_prefix('+') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let n = Size::parse(rest)
        .map_err(|e| usage(format!("--size {e}")))?
        .0;
    if n % (1 << 20) != 0 {
        return Err(usage(format!("--size {s}: must be a whole number of MiB")));
    }
    Ok(if plus {
        GrowTo::Plus(n)
    } else {
        GrowTo::Absolute(n)
    })
}

/// The target size, or why not.
pub fn target_size(current: u64, spec: GrowTo) -> Result<u64> {
    let t = match spec {
        GrowTo::Absolute(n) => n,
        GrowTo::Plus(n) => current + n,
    };
    if t < current {
        return Err(usage(format!(
            "the container is {} and e2ebackup never shrinks a container (asked for {})",
            Size(current),
            Size(t)
        )));
    }
    Ok(t)
}

pub fn grow(p: &Profile, spec: &str, online: bool) -> Exit {
    let spec = match parse_spec(spec) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut s = match Session::begin(p, "grow") {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let r = work(p, &mut s, spec, online);
    finish(s, &r).0
}

fn work(p: &Profile, s: &mut Session<'_>, spec: GrowTo, online: bool) -> Result<Exit> {
    s.read_key()?;
    let facts = s.connect()?.clone();
    let current = facts.container_size.ok_or_else(|| {
        usage(format!(
            "no container {} on {}; nothing to grow",
            p.remote_container(),
            p.server.host
        ))
    })?;
    let target = target_size(current, spec)?;
    let added = target - current;
    if let Some(free) = facts.free_bytes {
        // resize2fs writes inode tables, bitmaps and descriptors for the new part.
        let need =
            ext4::estimate_init_bytes(added, added / 65536).saturating_sub(luks::HEADER_BYTES);
        if added > 0 && free < need + (64 << 20) {
            anyhow::bail!(
                "{}:{} has {} free; growing by {} writes about {} and wants 64M more to spare",
                p.server.host,
                p.server.path,
                Size(free),
                Size(added),
                Size(need)
            );
        }
        if free < added {
            warn!(
                "the server has {} free, less than the {} being added",
                Size(free),
                Size(added)
            );
        } else {
            info!(
                "{}:{} has {} free; growing by {}",
                p.server.host,
                p.server.path,
                Size(free),
                Size(added)
            );
        }
    } else {
        warn!(
            "cannot tell the free space on {} (its SFTP server offers no statvfs@openssh.com); continuing",
            p.server.host
        );
    }
    s.mount_server("grow")?;
    let name = p.container.file.0.clone();
    if online {
        s.attach(&name, false)?;
        let mapper = s.unlock(false, false)?;
        // Layout and authenticated generation (rollback) checked before anything grows.
        let root = s.mount_checked(false)?;
        enlarge_open(p, s, &mapper, target)?;
        report(&root)?;
    } else {
        // The rollback check needs the filesystem, and an offline grow must not have it
        // mounted read-write: check on a read-only open first, close, then grow.
        let mark = s.mark();
        s.attach(&name, true)?;
        s.unlock(true, false)?;
        s.mount_checked(true)?;
        s.close_to(mark)?;
        enlarge_file(p, &s.server_dir()?.open_file(&name, false)?, target)?;
        // A new open of what the server serves now: its header (at the unlock) and its
        // layout and generation are checked again before anything is written to it.
        s.attach(&name, false)?;
        let mapper = s.unlock(false, false)?;
        s.check_open_container()?;
        info!("checking the filesystem before an offline resize (e2fsck -f)");
        ext4::fsck_preen(&mapper)?;
        crate::signals::check()?;
        // The resize itself runs on the mounted filesystem: the kernel's online resize is
        // journaled, so a client killed in the middle leaves a consistent ext4, where an
        // offline resize2fs killed midway leaves one that e2fsck -p refuses (seen in
        // vm-tests 30: SIGKILL during resize2fs, then "UNEXPECTED INCONSISTENCY").
        let root = s.mount_fs(false)?;
        crate::snapshots::check_layout(&root)?;
        info!("resizing the filesystem (mounted, journaled)");
        ext4::resize_to_fill(&mapper)?;
        report(&root)?;
    }
    Ok(Exit::Ok)
}

/// Enlarge the open container file `f` to `target` (never shrinks; a no-op when already
/// there). The file was opened beneath the server directory without following links.
fn enlarge_file(p: &Profile, f: &std::fs::File, target: u64) -> Result<()> {
    if f.metadata()?.len() < target {
        info!("enlarging {} to {}", p.remote_container(), Size(target));
        f.set_len(target)
            .with_context(|| format!("enlarging {}", p.remote_container()))?;
        f.sync_all()?;
    }
    Ok(())
}

/// Grow a container that is attached, unlocked and mounted: file, loop capacity, LUKS
/// mapping (needs the key again), then an online resize2fs.
pub fn enlarge_open(
    p: &Profile,
    s: &mut Session<'_>,
    mapper: &std::path::Path,
    target: u64,
) -> Result<()> {
    let f = s.server_dir()?.open_file(&p.container.file.0, false)?;
    enlarge_file(p, &f, target)?;
    drop(f);
    s.grow_open_container()?;
    info!("resizing the mounted filesystem (online)");
    ext4::resize_to_fill(mapper)
}

/// `container.auto_grow` during `run`: when the mounted filesystem's free space is under the
/// threshold, grow by `step`, up to `max_size`, before the snapshot is taken. When the last
/// run failed because the filesystem was full (the client's last-run record says so, with
/// what it still needed), grow whatever the threshold says, by what it needed (at least
/// `step`): its snapshot is kept under `.partial/` and resumed, but the rest must fit.
pub fn auto_grow(p: &Profile, s: &mut Session<'_>, root: &std::path::Path) -> Result<()> {
    let Some(ag) = &p.container.auto_grow else {
        return Ok(());
    };
    let st = nix::sys::statvfs::statvfs(root)?;
    let total = st.blocks() * st.fragment_size();
    let free = st.blocks_available() * st.fragment_size();
    let full_last_time = crate::state::read_last_run(p)
        .filter(|l| l.command == "run")
        .and_then(|l| l.container_full_needed);
    let below = ag.when_free_below.is_below(free, total);
    if !below && full_last_time.is_none() {
        return Ok(());
    }
    let current = s
        .server_dir()?
        .len(&p.container.file.0)?
        .context("the container file is gone")?;
    let by = growth_after_full(full_last_time, free, ag.step.0);
    let target = current.saturating_add(by).min(ag.max_size.0);
    if target <= current {
        warn!(
            "the container has {} free of {} and is at its auto_grow.max_size {}: grow it by hand or prune",
            Size(free),
            Size(total),
            ag.max_size
        );
        return Ok(());
    }
    if let Some(server_free) = s.facts().ok().and_then(|f| f.free_bytes) {
        if server_free < (target - current) + (256 << 20) {
            warn!(
                "auto_grow skipped: the server has only {} free",
                Size(server_free)
            );
            return Ok(());
        }
    }
    match full_last_time {
        Some(needed) => info!(
            "auto_grow: the last run failed with the container's filesystem full{} ({} free now); \
             growing the container to {}",
            if needed > 0 {
                format!(", needing about {} more", Size(needed))
            } else {
                String::new()
            },
            Size(free),
            Size(target)
        ),
        None => info!(
            "auto_grow: {} free of {} is below {}; growing the container to {}",
            Size(free),
            Size(total),
            ag.when_free_below,
            Size(target)
        ),
    }
    let mapper = s.mapper()?;
    enlarge_open(p, s, &mapper, target)?;
    report(root)
}

/// How much `auto_grow` adds: `step`, or after a run that failed for space and still needed
/// `needed` bytes (0: unknown), that plus a tenth and 64 MiB for metadata, less what is
/// free now, if that is more than `step`. Whole MiB, as `grow` wants.
pub fn growth_after_full(needed: Option<u64>, free: u64, step: u64) -> u64 {
    let want = match needed {
        Some(n) if n > 0 => (n + n / 10 + (64 << 20)).saturating_sub(free),
        _ => 0,
    };
    let mib = 1u64 << 20;
    want.max(step).div_ceil(mib) * mib
}

fn report(root: &std::path::Path) -> Result<()> {
    let st = nix::sys::statvfs::statvfs(root)?;
    let total = st.blocks() * st.fragment_size();
    let free = st.blocks_available() * st.fragment_size();
    info!("filesystem now {} ({} free)", Size(total), Size(free));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_after_a_full_container_covers_what_was_needed() {
        const M: u64 = 1 << 20;
        // No failure, or an unknown need: one step.
        assert_eq!(growth_after_full(None, 0, 64 * M), 64 * M);
        assert_eq!(growth_after_full(Some(0), 0, 64 * M), 64 * M);
        // 500 MiB still needed, 10 MiB free: 500 + 50 + 64 - 10 = 604 MiB.
        assert_eq!(growth_after_full(Some(500 * M), 10 * M, 64 * M), 604 * M);
        // A small need is at least a step; odd bytes round up to whole MiB.
        assert_eq!(growth_after_full(Some(M), 0, 64 * M), 66 * M);
        assert_eq!(growth_after_full(Some(M), 100 * M, 64 * M), 64 * M);
    }

    #[test]
    fn specs_and_targets() {
        assert_eq!(parse_spec("3G").unwrap(), GrowTo::Absolute(3 << 30));
        assert_eq!(parse_spec("+512M").unwrap(), GrowTo::Plus(512 << 20));
        assert!(parse_spec("+1000").is_err());
        assert!(parse_spec("lots").is_err());
        assert_eq!(
            target_size(2 << 30, GrowTo::Plus(1 << 30)).unwrap(),
            3 << 30
        );
        assert_eq!(
            target_size(2 << 30, GrowTo::Absolute(2 << 30)).unwrap(),
            2 << 30
        );
        let e = target_size(2 << 30, GrowTo::Absolute(1 << 30)).unwrap_err();
        assert!(format!("{e}").contains("never shrinks"));
        assert_eq!(crate::error::exit_for(&e), Exit::Usage);
    }
}
