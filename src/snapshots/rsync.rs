//! The rsync of a snapshot: its argv (the exclusions every run adds in front of the
//! profile's own), and what its output says (the files it wrote, its statistics).

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::cmd::Cmd;
use crate::profile::Profile;
use crate::stack::mount::{self, MountEntry};

/// The rsync argv for one snapshot, with the mounts of this moment. Warns about each other
/// user's FUSE mount below a source, which it leaves out ([`foreign_fuse`]).
pub fn rsync_command(profile: &Profile, dest: &Path, link_dest: Option<&Path>) -> Result<Cmd> {
    // No mount table (no /proc) leaves only the fixed exclusions.
    let mounts = mount::mounts().unwrap_or_default();
    for (m, uid) in foreign_fuse(&profile.backup.sources, &mounts) {
        crate::warn!(
            "skipping {}: a {} mount of user {uid}, which root cannot read; \
             it is not in this snapshot",
            m.target.display(),
            m.fstype
        );
    }
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
        // A line for each item written, after its data (%b), with the whole-file checksum
        // rsync computed over what it read from the source (%C, sha1): the manifest's hash
        // of the file (`hash_behind`), never read back from the container.
        .arg("--checksum-choice=sha1")
        .arg(format!("--out-format={WROTE}%b:%C:%n"))
        // Holes stay holes: a user's `truncate -s 4T` file costs no space in the container.
        .arg("--sparse")
        // rsync 24 = vanished source files: normal on a live system. 23 = some files or
        // attributes not transferred: `take` reads stderr to tell files it could not read
        // (a warning) from anything else (a failure), see [`complaints`].
        .ok_codes(&[0, 23, 24]);
    if let Some(max) = profile.backup.max_file_size {
        // `--info=skip1` names each file skipped for its size ([`over_max_size`]).
        c = c.arg(format!("--max-size={}", max.0)).arg("--info=skip1");
    }
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
    c = c.args(super::filters::argv(profile, mounts)?);
    for s in &profile.backup.sources {
        c = c.arg(&s.0);
    }
    Ok(c.arg(format!("{}/", dest.display())))
}

/// The rsync argv that copies the files named in `list` (NUL-separated paths relative to
/// `/`) again into `dest`, as the snapshot's rsync does but without `--link-dest`: for the
/// names `--link-dest` linked unlike the source (`links::copy_again`). `-H` links those
/// that are one inode in the source.
pub(super) fn copy_again_command(list: &Path, dest: &Path) -> Result<Cmd> {
    Ok(Cmd::new("rsync")?
        // A name gone from the source since (deleted meanwhile) is left out, not an error.
        .args(["-aHAX", "--numeric-ids", "--from0", "--ignore-missing-args"])
        .arg(format!("--files-from={}", list.display()))
        .arg("--checksum-choice=sha1")
        .arg(format!("--out-format={WROTE}%b:%C:%n"))
        .ok_codes(&[0, 24])
        .arg("/")
        .arg(format!("{}/", dest.display())))
}

/// What rsync's line for each item it writes starts with (`--out-format`); then the bytes it
/// sent for it, a colon, its whole-file checksum (blanks where rsync has none: a hard link,
/// a local copy, a directory), a colon and its name, as rsync prints names: relative to the destination
/// (with a leading slash under --relative), a directory with a trailing slash, and every
/// byte it does not print as itself (control characters, bytes the locale cannot show,
/// and the backslash of a literal `\#`) escaped as `\#` and three octal digits.
pub(super) const WROTE: &str = "e2ebackup-wrote:";

/// The path below the destination of the file one of rsync's `WROTE` lines names, and the
/// checksum rsync gives it, if any; `None` for any other line, a directory, or a name that
/// would leave the destination.
pub(super) fn wrote(line: &str) -> Option<(PathBuf, Option<[u8; crate::manifest::DIGEST_LEN]>)> {
    let (_, rest) = line.strip_prefix(WROTE)?.split_once(':')?;
    let (sum, name) = rest.split_once(':')?;
    let digest = crate::manifest::parse_digest(sum);
    if name.ends_with('/') {
        return None;
    }
    decode_name(name).map(|p| (p, digest))
}

/// A name as rsync prints it (see [`WROTE`]), decoded; `None` for one that would leave the
/// destination.
fn decode_name(name: &str) -> Option<PathBuf> {
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
pub(super) fn contents_pattern(dir: &Path) -> String {
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
/// and, last, each other user's FUSE mount below a source, itself ([`foreign_fuse`]),
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
    let mut patterns: Vec<String> = dirs.iter().map(|d| contents_pattern(d)).collect();
    for (m, _) in foreign_fuse(sources, mounts) {
        if !dirs.iter().any(|d| m.target.starts_with(d)) {
            patterns.push(literal_pattern(&m.target));
        }
    }
    patterns
}

/// FUSE mounts (`fuse`, `fuse.*`, `fuseblk`) strictly below a source whose owner (`user_id=`
/// in the filesystem's options) is not root, with that owner. Any local user can mount one
/// (`fusermount3` is setuid root), and without `allow_other` root gets EACCES on it: rsync
/// would then exit 23 on every run. They are left out of every snapshot, mount point and all.
pub fn foreign_fuse<'a>(
    sources: &[crate::profile::AbsPath],
    mounts: &'a [MountEntry],
) -> Vec<(&'a MountEntry, u32)> {
    mounts
        .iter()
        .filter(|m| m.fstype == "fuse" || m.fstype == "fuseblk" || m.fstype.starts_with("fuse."))
        .filter(|m| {
            sources
                .iter()
                .any(|s| m.target.starts_with(&s.0) && m.target != s.0)
        })
        .filter_map(|m| {
            let uid = m
                .super_options
                .split(',')
                .find_map(|o| o.strip_prefix("user_id="))?
                .parse::<u32>()
                .ok()?;
            (uid != 0).then_some((m, uid))
        })
        .collect()
}

/// An rsync pattern that matches `p` itself. Without a wildcard rsync takes a backslash
/// literally; with one, it escapes.
fn literal_pattern(p: &Path) -> String {
    let s = p.to_string_lossy();
    if !s.contains(['*', '?', '[']) {
        return s.into_owned();
    }
    let mut out = String::new();
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// The file named by one of the lines `--info=skip1` prints for a file over `--max-size`
/// (`home/u/big is over max-size`), as rsync prints names (escaped, see [`WROTE`]), with
/// the leading slash of its source path.
pub(super) fn over_max_size(line: &str) -> Option<String> {
    let name = line.strip_suffix(" is over max-size")?;
    (!name.is_empty()).then(|| format!("/{}", name.trim_start_matches('/')))
}

/// What rsync's stderr says went wrong in a run that exited 23 or 24.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Complaints {
    /// Source files (or directories) the sender could not read, as rsync names them (its
    /// escapes kept: one line each, safe to log).
    pub unread: Vec<String>,
    /// Files that vanished while rsync copied them.
    pub vanished: usize,
    /// Every other error line: anything on the receiving side (writes into the container)
    /// or that this does not know. Any such line fails the run.
    pub other: Vec<String>,
}

/// Sort rsync's stderr lines into [`Complaints`]. Only the sender's errors about a source
/// path (`rsync: [sender] opendir "..." failed`, `send_files failed to open "..."`,
/// `readlink_stat("...") failed`, `read errors mapping "..."`, ...) are files not read; the
/// generator and receiver write into the container, and their errors stay failures. rsync
/// prints names with control characters escaped, so a file name cannot forge a line.
pub fn complaints(stderr: &str) -> Complaints {
    let mut c = Complaints::default();
    let quoted = |l: &str| {
        let (a, b) = (l.find('"')?, l.rfind('"')?);
        (b > a + 1).then(|| l[a + 1..b].to_string())
    };
    let read_error = stderr.contains("rsync: [sender] read errors mapping ");
    for line in stderr.lines().map(str::trim_end) {
        if line.is_empty()
            || line.starts_with("rsync error: some files/attrs were not transferred")
            || line.starts_with("rsync warning: some files vanished")
        {
            continue;
        }
        if let Some(rest) = line.strip_prefix("rsync: [sender] ") {
            match quoted(rest) {
                Some(name) if !c.unread.contains(&name) => c.unread.push(name),
                Some(_) => {}
                None => c.other.push(line.to_string()),
            }
        } else if line.starts_with("file has vanished: ") {
            c.vanished += 1;
        } else if read_error
            && (line.starts_with("WARNING: ") || line.starts_with("ERROR: "))
            && line.contains(" failed verification -- update ")
        {
            // The receiver's check of data the sender could not read (it sends zeros): the
            // file is already listed by its read error, and discarded.
        } else {
            c.other.push(line.to_string());
        }
    }
    c
}

/// What `run --dry-run` prints for each item ([`dry_run_command`]): rsync's itemized
/// change, the file's size and its name.
const ITEM: &str = "e2ebackup-item:";

/// `run --dry-run`'s rsync: the very argv of a run ([`rsync_command`]), with the newest
/// snapshot `compare` (or an empty directory) as the destination instead of a new one
/// hard-linked to it, and `--dry-run`: rsync compares and lists, and writes nothing. What it
/// would send to `compare` is what a run would write instead of linking, and what it would
/// delete there is what is gone from the sources since.
pub fn dry_run_command(profile: &Profile, compare: &Path) -> Result<Cmd> {
    Ok(rsync_command(profile, compare, None)?
        .arg("--dry-run")
        .arg(format!("--out-format={ITEM}%i:%l:%n")))
}

/// One item of a dry run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// New or changed (a run would write it): its path below the destination and its size
    /// (0 for a directory).
    Write(PathBuf, u64),
    /// Gone from the sources: a run's snapshot no longer has it.
    Delete(PathBuf),
}

/// The item one of [`dry_run_command`]'s lines names, if any: written when rsync would
/// transfer or create it (`>`, `c`, `h`) or change a file's attributes (a new inode in the
/// snapshot); a directory only when it is new (a directory whose time changes because its
/// content did says nothing more).
pub fn item(line: &str) -> Option<Item> {
    let rest = line.strip_prefix(ITEM)?;
    let (flags, rest) = rest.split_once(':')?;
    let (len, name) = rest.split_once(':')?;
    let path = decode_name(name.trim_end_matches('/'))?;
    if flags.starts_with("*deleting") {
        return Some(Item::Delete(path));
    }
    let f = flags.as_bytes();
    let (kind, ty) = (*f.first()?, *f.get(1)?);
    let new = flags.get(2..).is_some_and(|r| r.starts_with("+++"));
    let written = match (kind, ty) {
        (_, b'd') => new,
        (b'>' | b'c' | b'h', _) => true,
        (b'.', _) => flags[2..].bytes().any(|b| b != b'.' && b != b' '),
        _ => false,
    };
    // A directory's size is its own blocks, not file data to send.
    let len = if ty == b'd' {
        0
    } else {
        len.trim().replace(',', "").parse().unwrap_or(0)
    };
    written.then_some(Item::Write(path, len))
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
        // Lines as rsync prints them: bytes, checksum (blanks for none), name.
        let w = |l: &str| {
            let (bytes, name) = l
                .strip_prefix("e2ebackup-wrote:")
                .unwrap()
                .split_once(':')?;
            let line = format!("e2ebackup-wrote:{bytes}:{}:{name}", " ".repeat(40));
            wrote(&line).map(|(p, d)| {
                assert_eq!(d, None);
                p.into_os_string().into_vec()
            })
        };
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
        ] {
            assert_eq!(w(other), None, "{other}");
        }
        for other in [
            "e2ebackup-wrote:nocolon",
            "e2ebackup-wrote:1:nosum",
            "      1,234  45%   12.34MB/s    0:00:12 (xfr#12, to-chk=100/2000)",
        ] {
            assert_eq!(wrote(other), None, "{other}");
        }
        // A file rsync transferred: its checksum comes with it.
        let sum = "f572d396fae9206628714fb2ce00f72e94f2258f";
        let (p, d) = wrote(&format!("e2ebackup-wrote:6:{sum}:/src/a:b")).unwrap();
        assert_eq!(p, PathBuf::from("src/a:b"));
        assert_eq!(
            d.map(|d| crate::manifest::parse_digest(sum) == Some(d)),
            Some(true)
        );
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
46 22 0:60 / /home/attacker/mnt rw,nosuid,nodev shared:30 - fuse.sshfs attacker@127.0.0.1:/ rw,user_id=1001,group_id=1001
47 22 0:61 / /home/me/own rw shared:31 - fuse.sshfs x@y:/ rw,user_id=0,group_id=0
48 22 0:62 / /home/odd\\040[dir]*/x rw shared:32 - fuse.bindfs bindfs rw,user_id=1002,group_id=1002
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
                "/home/attacker/mnt",
            ]
        );
        // /home: only what is under it; another user's FUSE mount itself (root's own stays,
        // and one inside an excluded directory is covered).
        assert_eq!(
            argv_excludes("[/home]"),
            [
                "/home/me/browse/*",
                "/home/jail/proc/*",
                "/home/odd \\[dir\\]\\*/*",
                "/home/attacker/mnt",
            ]
        );
        // A FUSE mount named as the source itself is the user's wish.
        assert!(argv_excludes("[/home/attacker/mnt]").is_empty());
        assert_eq!(literal_pattern(Path::new("/a\\b[1]")), "/a\\\\b\\[1\\]");
        assert_eq!(literal_pattern(Path::new("/a\\b")), "/a\\b");
        // Nothing of the kind under /data or /etc.
        assert!(argv_excludes("[/data, /etc]").is_empty());
        // A pseudo dir named as a source is the user's wish, but the run dir is not.
        assert_eq!(argv_excludes("[/run]"), ["/run/e2ebackup/*"]);
        assert_eq!(argv_excludes("[/tmp, /dev/shm]"), Vec::<String>::new());
        assert_eq!(argv_excludes("[/run/e2ebackup/home]"), ["/run/e2ebackup/*"]);
    }

    /// rsync 3.5's own lines (as root can't be refused on a local file, these were taken
    /// from rsync run as nobody, and a receiver that cannot write).
    #[test]
    fn sender_read_errors_are_told_from_receiver_errors() {
        let sender = "\
rsync: [sender] opendir \"/src/d\" failed: Permission denied (13)
rsync: [sender] send_files failed to open \"/src/se\"cret\": Permission denied (13)
rsync: [sender] readlink_stat(\"/home/attacker/mnt\") failed: Permission denied (13)
rsync: [sender] read errors mapping \"/src/bad\\#012name\": Input/output error (5)
WARNING: src/bad\\#012name failed verification -- update retained (will try again).
ERROR: src/bad\\#012name failed verification -- update discarded.
file has vanished: \"/src/gone\"
rsync error: some files/attrs were not transferred (see previous errors) (code 23) at main.c(1394) [sender=3.5.0]
";
        let c = complaints(sender);
        assert_eq!(
            c.unread,
            [
                "/src/d",
                "/src/se\"cret",
                "/home/attacker/mnt",
                "/src/bad\\#012name"
            ]
        );
        assert_eq!((c.vanished, c.other.len()), (1, 0));
        let receiver = "\
rsync: [sender] opendir \"/src/d\" failed: Permission denied (13)
rsync: [generator] recv_generator: mkdir \"/m/.partial/X/src\" failed: No space left on device (28)
*** Skipping any contents from this failed directory ***
rsync: [receiver] write failed on \"/m/.partial/X/src/f\": Input/output error (5)
rsync: [sender] write error: Broken pipe (32)
ERROR: src/f failed verification -- update discarded.
rsync error: some files/attrs were not transferred (see previous errors) (code 23) at main.c(1394) [sender=3.5.0]
";
        let c = complaints(receiver);
        assert_eq!(c.unread, ["/src/d"]);
        assert_eq!(c.other.len(), 5, "{:?}", c.other);
        assert_eq!(
            over_max_size("home/u/big is over max-size").as_deref(),
            Some("/home/u/big")
        );
        assert_eq!(over_max_size("e2ebackup-wrote:0:/home/u/x"), None);
        // Error output past crate::cmd::STDERR_KEEP is not kept: whatever it said, the run
        // fails (the note, and a line cut in the middle, are errors of their own).
        let cut = "\
file has vanished: \"/src/gone\"
rsync: [sender] opendir \"/src/d
[e2ebackup: 123 more bytes of error output were not kept]
";
        let c = complaints(cut);
        assert_eq!(
            (c.vanished, c.unread.len(), c.other.len()),
            (1, 0, 2),
            "{c:?}"
        );
    }

    #[test]
    fn mountinfo_parsing() {
        use mount::parse_mountinfo;
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 16);
        assert_eq!(m[13].super_options, "rw,user_id=1001,group_id=1001");
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
             backup: {sources: [/home, /etc], excludes: ['*.tmp', '/home/*/.cache'], one_file_system: true, max_file_size: 1M}\n",
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
                "--checksum-choice=sha1",
                "--out-format=e2ebackup-wrote:%b:%C:%n",
                "--sparse",
                "--max-size=1048576",
                "--info=skip1",
                "--one-file-system",
                "--link-dest=/m/snapshots/W",
                "--exclude=/home/me/browse/*",
                "--exclude=/home/jail/proc/*",
                "--exclude=/home/odd \\[dir\\]\\*/*",
                "--exclude=/home/attacker/mnt",
                "--exclude=*.tmp",
                "--exclude=/home/*/.cache",
                "/home",
                "/etc",
                "/m/.partial/X/"
            ]
        );
    }
}
