//! The rsync of a snapshot: its argv (the exclusions every run adds in front of the
//! profile's own), and what its output says (the files it wrote, its statistics).

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::cmd::Cmd;
use crate::profile::Profile;
use crate::stack::mount::{self, MountEntry};

/// The rsync argv for one snapshot, with the mounts of this moment.
pub fn rsync_command(profile: &Profile, dest: &Path, link_dest: Option<&Path>) -> Result<Cmd> {
    // No mount table (no /proc) leaves only the fixed exclusions.
    let mounts = mount::mounts().unwrap_or_default();
    rsync_command_for(profile, dest, link_dest, &mounts)
}

pub(super) fn rsync_command_for(
    profile: &Profile,
    dest: &Path,
    link_dest: Option<&Path>,
    mounts: &[MountEntry],
) -> Result<Cmd> {
    let mut c = Cmd::new("rsync")?
        .args([
            "-aHAX",
            "--numeric-ids",
            "--delete",
            "--relative",
            "--stats",
            // One overall progress line, rewritten in place: parsed for the progress meter.
            "--info=progress2",
        ])
        // A line for each item written, after its data (%b): the files are hashed as they
        // arrive (`hash_behind`).
        .arg(format!("--out-format={WROTE}%b:%n"))
        // rsync 24 = vanished source files: normal on a live system.
        .ok_codes(&[0, 24]);
    if profile.backup.one_file_system {
        c = c.arg("--one-file-system");
    }
    if let Some(l) = link_dest {
        c = c.arg(format!("--link-dest={}", l.display()));
    }
    for e in always_excluded(&profile.backup.sources, mounts) {
        c = c.arg(format!("--exclude={e}"));
    }
    for e in &profile.backup.excludes {
        c = c.arg(format!("--exclude={e}"));
    }
    for s in &profile.backup.sources {
        c = c.arg(&s.0);
    }
    Ok(c.arg(format!("{}/", dest.display())))
}

/// What rsync's line for each item it writes starts with (`--out-format`); then the bytes it
/// sent for it, a colon and its name, as rsync prints names: relative to the destination
/// (with a leading slash under --relative), a directory with a trailing slash, and every
/// byte it does not print as itself (control characters, bytes the locale cannot show,
/// and the backslash of a literal `\#`) escaped as `\#` and three octal digits.
pub(super) const WROTE: &str = "e2ebackup-wrote:";

/// The path below the destination of the file one of rsync's `WROTE` lines names; `None`
/// for any other line, a directory, or a name that would leave the destination.
pub(super) fn wrote(line: &str) -> Option<PathBuf> {
    let (_, name) = line.strip_prefix(WROTE)?.split_once(':')?;
    if name.ends_with('/') {
        return None;
    }
    let b = name.as_bytes();
    let mut raw = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i..i + 5)
            .filter(|e| e.starts_with(b"\\#") && e[2..].iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(e) => {
                let v = e[2..].iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                raw.push(u8::try_from(v).ok()?);
                i += 5;
            }
            None => {
                raw.push(b[i]);
                i += 1;
            }
        }
    }
    let rel = raw.strip_prefix(b"/").unwrap_or(&raw);
    let inside = rel
        .split(|b| *b == b'/')
        .all(|c| !matches!(c, b"" | b"." | b".."));
    inside.then(|| PathBuf::from(std::ffi::OsString::from_vec(rel.to_vec())))
}

/// Directories whose contents are never worth a snapshot: kernel interfaces and runtime
/// state, recreated at boot. Their own directories stay (a restored system needs the mount
/// points), only what is under them is excluded.
pub const PSEUDO_DIRS: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

/// File system types that are kernel interfaces or memory, wherever they are mounted (a bind
/// of /proc into a chroot is still /proc).
const PSEUDO_FS: [&str; 20] = [
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "pstore",
    "bpf",
    "mqueue",
    "hugetlbfs",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "efivarfs",
    "autofs",
    "rpc_pipefs",
];

/// An rsync pattern that matches `dir`'s contents literally. The pattern has a wildcard (the
/// final `*`), so rsync reads a backslash as an escape: escape the wildcard characters.
fn contents_pattern(dir: &Path) -> String {
    let mut p = String::new();
    for ch in dir.to_string_lossy().chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(ch);
    }
    format!("{}/*", p.trim_end_matches('/'))
}

/// The exclusions every run adds in front of the profile's own, for `sources` and the
/// current `mounts` (see [`crate::stack::mount::mounts`]): the contents of
/// - e2ebackup's run dir ([`crate::RUN_DIR`]: the sshfs mount of the server and the mounted
///   container are under it; without this, a source of `/` with one_file_system off copies
///   the container into itself),
/// - every mount of an opened e2ebackup container (`/dev/mapper/e2ebackup-*`, e.g. where
///   `e2ebackup mount` put it),
/// - [`PSEUDO_DIRS`] and every mount of a [`PSEUDO_FS`] type,
///
/// each only where a source contains it. A pseudo directory named as a source itself (say
/// `/run/foo` or `/dev/shm`) is the user's explicit wish and is not excluded, but the run
/// dir always is.
pub fn always_excluded(sources: &[crate::profile::AbsPath], mounts: &[MountEntry]) -> Vec<String> {
    let under = |d: &Path, strict: bool| {
        sources
            .iter()
            .any(|s| d.starts_with(&s.0) && (!strict || d != s.0.as_path()))
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    let add = |d: PathBuf, dirs: &mut Vec<PathBuf>| {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    };
    let run = Path::new(crate::layout::RUN_DIR);
    // The run dir, also when a source is inside it.
    if under(run, false) || sources.iter().any(|s| s.0.starts_with(run)) {
        add(run.to_path_buf(), &mut dirs);
    }
    for d in PSEUDO_DIRS {
        if under(Path::new(d), true) {
            add(PathBuf::from(d), &mut dirs);
        }
    }
    for m in mounts {
        let (mp, fstype, source) = (&m.target, &m.fstype, &m.source);
        let ours = source.starts_with("/dev/mapper/e2ebackup-") || mp.starts_with(run);
        if dirs.iter().any(|d| mp.starts_with(d)) {
            // Already covered (say /dev/pts under /dev, or a mount in the run dir).
            continue;
        }
        let ours_here = ours && (under(mp, false) || sources.iter().any(|s| s.0.starts_with(mp)));
        let pseudo_here = PSEUDO_FS.contains(&fstype.as_str()) && under(mp, true);
        if ours_here || pseudo_here {
            add(mp.clone(), &mut dirs);
        }
    }
    dirs.iter().map(|d| contents_pattern(d)).collect()
}

pub(super) fn stat_number(stats: &str, label: &str) -> Option<u64> {
    let line = stats.lines().find(|l| l.starts_with(label))?;
    let v = line.split(':').nth(1)?.split_whitespace().next()?;
    v.replace(',', "").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn rsync_names_decode_exactly_and_stay_below_the_destination() {
        let w = |l: &str| wrote(l).map(|p| p.into_os_string().into_vec());
        assert_eq!(w("e2ebackup-wrote:3:/src/a/x"), Some(b"src/a/x".to_vec()));
        assert_eq!(w("e2ebackup-wrote:3:a:b"), Some(b"a:b".to_vec()));
        assert_eq!(
            w("e2ebackup-wrote:1:new\\#012line"),
            Some(b"new\nline".to_vec())
        );
        assert_eq!(w("e2ebackup-wrote:1:caf\\#351"), Some(b"caf\xe9".to_vec()));
        // A literal backslash-hash is itself escaped; a bad escape is taken as it stands.
        assert_eq!(
            w("e2ebackup-wrote:0:b\\#134#056c"),
            Some(b"b\\#056c".to_vec())
        );
        assert_eq!(w("e2ebackup-wrote:0:b\\#9x"), Some(b"b\\#9x".to_vec()));
        for other in [
            "e2ebackup-wrote:0:/src/a/",
            "e2ebackup-wrote:0:/",
            "e2ebackup-wrote:0:/src/../../etc/shadow",
            "e2ebackup-wrote:0:\\#056\\#056/etc/shadow",
            "e2ebackup-wrote:0:a/\\#056/b",
            "e2ebackup-wrote:0:x\\#777",
            "e2ebackup-wrote:nocolon",
            "      1,234  45%   12.34MB/s    0:00:12 (xfr#12, to-chk=100/2000)",
        ] {
            assert_eq!(w(other), None, "{other}");
        }
    }

    #[test]
    fn parses_rsync_stats() {
        let s = "Number of files: 1,234 (reg: 1,000, dir: 234)\nNumber of regular files transferred: 1,017\nTotal file size: 9,999 bytes\nTotal transferred file size: 12,345,678 bytes\n";
        assert_eq!(
            stat_number(s, "Number of regular files transferred"),
            Some(1017)
        );
        assert_eq!(
            stat_number(s, "Total transferred file size"),
            Some(12_345_678)
        );
        assert_eq!(stat_number(s, "Nope"), None);
    }

    /// A machine with a server mounted by a run, the container open and also shown by
    /// `e2ebackup mount` at /home/me/browse, /proc bound into a chroot under /home, a tmpfs
    /// at /tmp and a path with a space and a wildcard.
    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw
24 22 0:22 / /sys rw,nosuid shared:3 - sysfs sysfs rw
25 22 0:5 / /dev rw,nosuid shared:4 - devtmpfs udev rw
26 25 0:23 / /dev/pts rw shared:5 - devpts devpts rw
27 22 0:24 / /run rw,nosuid shared:6 - tmpfs tmpfs rw
28 22 0:25 / /tmp rw shared:7 - tmpfs tmpfs rw
40 27 0:50 / /run/e2ebackup/home/server rw shared:20 - fuse.sshfs u@h:/srv rw
41 27 254:0 / /run/e2ebackup/home/mnt rw shared:21 - ext4 /dev/mapper/e2ebackup-home rw
42 22 254:0 /snapshots /home/me/browse ro shared:21 - ext4 /dev/mapper/e2ebackup-home ro
43 22 0:21 / /home/jail/proc rw shared:2 - proc proc rw
44 22 8:2 / /home/odd\\040[dir]* rw shared:9 - tmpfs tmpfs rw
45 22 8:3 / /data rw shared:10 - ext4 /dev/sdb1 rw
";

    fn argv_excludes(sources: &str) -> Vec<String> {
        let p = crate::profile::Profile::parse(
            Path::new("/etc/e2ebackup/profiles/t.yaml"),
            &format!(
                "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}}\n\
                 container: {{file: c.luks, size: 1G, keyfile: /key}}\n\
                 backup: {{sources: {sources}}}\n"
            ),
        )
        .unwrap();
        let c = rsync_command_for(
            &p,
            Path::new("/m/.partial/X"),
            None,
            &mount::parse_mountinfo(MOUNTINFO),
        )
        .unwrap();
        c.argv()
            .iter()
            .filter_map(|a| a.strip_prefix("--exclude=").map(str::to_string))
            .collect()
    }

    #[test]
    fn source_root_excludes_the_run_dir_our_mounts_and_pseudo_filesystems() {
        assert_eq!(
            argv_excludes("[/]"),
            [
                "/run/e2ebackup/*",
                "/proc/*",
                "/sys/*",
                "/dev/*",
                "/run/*",
                "/tmp/*",
                "/home/me/browse/*",
                "/home/jail/proc/*",
                "/home/odd \\[dir\\]\\*/*",
            ]
        );
        // /home: only what is under it.
        assert_eq!(
            argv_excludes("[/home]"),
            [
                "/home/me/browse/*",
                "/home/jail/proc/*",
                "/home/odd \\[dir\\]\\*/*"
            ]
        );
        // Nothing of the kind under /data or /etc.
        assert!(argv_excludes("[/data, /etc]").is_empty());
        // A pseudo dir named as a source is the user's wish, but the run dir is not.
        assert_eq!(argv_excludes("[/run]"), ["/run/e2ebackup/*"]);
        assert_eq!(argv_excludes("[/tmp, /dev/shm]"), Vec::<String>::new());
        assert_eq!(argv_excludes("[/run/e2ebackup/home]"), ["/run/e2ebackup/*"]);
    }

    #[test]
    fn mountinfo_parsing() {
        use mount::parse_mountinfo;
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 13);
        assert_eq!(
            (
                m[11].target.as_path(),
                m[11].fstype.as_str(),
                m[11].source.as_str()
            ),
            (Path::new("/home/odd [dir]*"), "tmpfs", "tmpfs")
        );
        assert_eq!(m[7].fstype, "fuse.sshfs");
        assert_eq!(m[8].source, "/dev/mapper/e2ebackup-home");
        assert!(parse_mountinfo("garbage\n\n").is_empty());
        // This machine's own table parses, and / is in it.
        let own = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap());
        assert!(own.iter().any(|m| m.target == Path::new("/")));
    }

    #[test]
    fn rsync_argv() {
        let p = crate::profile::Profile::parse(
            Path::new("/etc/e2ebackup/profiles/t.yaml"),
            "server: {host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}\n\
             container: {file: c.luks, size: 1G, keyfile: /key}\n\
             backup: {sources: [/home, /etc], excludes: ['*.tmp', '/home/*/.cache'], one_file_system: true}\n",
        )
        .unwrap();
        let c = rsync_command_for(
            &p,
            Path::new("/m/.partial/X"),
            Some(Path::new("/m/snapshots/W")),
            &mount::parse_mountinfo(MOUNTINFO),
        )
        .unwrap();
        let argv = c.argv();
        assert!(argv[0].ends_with("/rsync"));
        assert_eq!(
            &argv[1..],
            &[
                "-aHAX",
                "--numeric-ids",
                "--delete",
                "--relative",
                "--stats",
                "--info=progress2",
                "--out-format=e2ebackup-wrote:%b:%n",
                "--one-file-system",
                "--link-dest=/m/snapshots/W",
                "--exclude=/home/me/browse/*",
                "--exclude=/home/jail/proc/*",
                "--exclude=/home/odd \\[dir\\]\\*/*",
                "--exclude=*.tmp",
                "--exclude=/home/*/.cache",
                "/home",
                "/etc",
                "/m/.partial/X/"
            ]
        );
    }
}
