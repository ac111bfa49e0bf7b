//! The ext4 filesystem inside the container: mkfs, fsck, resize.
//!
//! mkfs runs without lazy initialisation (`lazy_itable_init=0,lazy_journal_init=0`):
//! otherwise the kernel's ext4lazyinit thread zeroes inode tables in the background after
//! the first mount, across the network, long after `init` said it was done. The cost of
//! that is paid once and is proportional to the inode tables, so the inode count is sized
//! for backups (`Profile::inode_count`, default one inode per 64 KiB, a quarter of mke2fs's
//! default) instead of mke2fs's 1.56 % of the size: 16 GiB with defaults wrote 340 MiB
//! to the server at init (FACTS.md). `-m 0`: no blocks reserved for root on a data volume.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cmd::Cmd;

pub fn mkfs(device: &Path, label: &str, inodes: u64, journal: u64) -> Result<()> {
    Cmd::new("mkfs.ext4")?
        .args(["-q", "-F", "-m", "0", "-I", "256", "-L", label, "-N"])
        .arg(inodes.to_string())
        .arg("-J")
        .arg(format!("size={}", journal >> 20))
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(device)
        .run()?;
    Ok(())
}

/// Whether the ext4 on `device` has a journal that needs recovery (the superblock's
/// INCOMPAT_RECOVER flag: set while mounted read-write, cleared by a clean unmount). Read
/// straight from the superblock (offset 1024, s_feature_incompat at 0x60), no process.
pub fn needs_recovery(device: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(device)
        .with_context(|| format!("opening {} to read its superblock", device.display()))?;
    let mut sb = [0u8; 0x64];
    f.read_exact_at(&mut sb, 1024)
        .with_context(|| format!("reading the superblock of {}", device.display()))?;
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        anyhow::bail!(
            "{} holds no ext4 filesystem (bad superblock magic)",
            device.display()
        );
    }
    let incompat = u32::from_le_bytes([sb[0x60], sb[0x61], sb[0x62], sb[0x63]]);
    Ok(incompat & 0x4 != 0)
}

/// Read-only check (`e2fsck -fn`); Ok(true) when clean.
pub fn check_readonly(device: &Path) -> Result<bool> {
    let d = Cmd::new("e2fsck")?
        .args(["-f", "-n"])
        .arg(device)
        .ok_codes(&[0, 1, 4])
        .run()?;
    Ok(d.code == 0)
}

/// mke2fs's default journal size for a filesystem of `blocks` 4 KiB blocks
/// (ext2fs_default_journal_size in e2fsprogs).
pub fn journal_bytes(blocks: u64) -> u64 {
    let jblocks = match blocks {
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    };
    jblocks * 4096
}

/// The journal `init` creates for a filesystem of `fs_bytes`: a thousandth of it in whole
/// MiB, at least 4 MiB (ext4's minimum of 1024 blocks), at most mke2fs's default. Every
/// journal byte is written at init (lazy_journal_init=0) and stays allocated on the server;
/// mke2fs's default is 0.4-1.6 % of the size, and a backup target, which writes file data
/// in large sequential runs, does not need that much (docs/benchmarks.md).
pub fn chosen_journal_bytes(fs_bytes: u64) -> u64 {
    ((fs_bytes >> 10) >> 20 << 20).clamp(4 << 20, journal_bytes(fs_bytes / 4096).max(4 << 20))
}

/// Bytes `init` writes to the server: LUKS2 header (metadata and keyslot area,
/// [`crate::stack::luks::HEADER_BYTES`]), inode tables, journal, and ~0.3 % of bitmaps and
/// group descriptors.
pub fn estimate_init_bytes(size: u64, inodes: u64) -> u64 {
    crate::stack::luks::HEADER_BYTES + inodes * 256 + chosen_journal_bytes(size) + size / 300
}

/// Size of the ext4 filesystem on `device` in bytes (block count x block size).
pub fn fs_bytes(device: &Path) -> Result<u64> {
    let d = Cmd::new("dumpe2fs")?.arg("-h").arg(device).run()?;
    let field = |name: &str| -> Option<u64> {
        d.stdout
            .lines()
            .find(|l| l.starts_with(name))?
            .split(':')
            .nth(1)?
            .trim()
            .parse()
            .ok()
    };
    match (field("Block count:"), field("Block size:")) {
        (Some(c), Some(s)) => Ok(c * s),
        _ => anyhow::bail!("cannot read the ext4 size of {}", device.display()),
    }
}

/// `e2fsck -f -p`: required by resize2fs before an offline resize. Exit 1 (errors fixed)
/// is fine; anything worse stops the grow.
pub fn fsck_preen(device: &Path) -> Result<()> {
    Cmd::new("e2fsck")?
        .args(["-f", "-p"])
        .arg(device)
        .ok_codes(&[0, 1])
        .run()?;
    Ok(())
}

/// Grow the filesystem to fill its device (online if mounted, offline otherwise).
pub fn resize_to_fill(device: &Path) -> Result<()> {
    Cmd::new("resize2fs")?.arg(device).run()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_grow_with_inodes_not_only_size() {
        assert_eq!(journal_bytes((1u64 << 30) / 4096), 32 << 20);
        assert_eq!(journal_bytes((1u64 << 40) / 4096), 1 << 30);
        assert_eq!(chosen_journal_bytes(64 << 20), 4 << 20);
        assert_eq!(chosen_journal_bytes(1 << 30), 4 << 20);
        assert_eq!(chosen_journal_bytes(16 << 30), 16 << 20);
        assert_eq!(chosen_journal_bytes(1 << 40), 1 << 30);
        let small = estimate_init_bytes(16 << 30, (16u64 << 30) / 65536);
        let dflt = estimate_init_bytes(16 << 30, (16u64 << 30) / 16384);
        assert!(small < dflt);
        // 16 GiB at one inode per 64 KiB: well under mke2fs's default of ~340 MiB.
        assert!(small < 300 << 20, "{small}");
    }
}

#[cfg(test)]
mod recovery_tests {
    use super::*;

    /// A real ext4 image (a file: mkfs and debugfs need no device), with the recovery flag
    /// set by debugfs as the kernel sets it while mounted read-write.
    #[test]
    fn needs_recovery_reads_the_superblock_flag() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .status()
            .unwrap();
        assert!(ok.success());
        assert!(!needs_recovery(&img).unwrap());
        let ok = std::process::Command::new("debugfs")
            .args(["-w", "-R", "feature needs_recovery"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(ok.status.success(), "{ok:?}");
        assert!(needs_recovery(&img).unwrap());
        let junk = d.path().join("junk");
        std::fs::write(&junk, vec![0u8; 4096]).unwrap();
        let e = needs_recovery(&junk).unwrap_err();
        assert!(format!("{e:#}").contains("bad superblock magic"), "{e:#}");
    }
}
