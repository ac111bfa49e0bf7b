//! The YAML profile: parsed into a raw serde struct, validated into a typed [`Profile`].
//!
//! Everything after this module trusts a `Profile`: sizes are [`Size`], paths are absolute
//! where they must be, the name is safe to use in device-mapper names and file names.
//! Validation that concerns one value happens inside deserialisation (newtypes with
//! `try_from`), so the YAML parser's error carries the file, line and column of the bad value;
//! unknown keys are refused the same way (`deny_unknown_fields`), naming the line and the key.
//! Loading a profile never touches anything but the profile file itself.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Deserialize;

use crate::error::usage;
use crate::retention;

/// Where profile names are looked up.
pub const PROFILE_DIR: &str = "/etc/e2ebackup/profiles";

/// A byte size written as `2G`, `512M`, `1T`, `1.5G`, `2GiB` or plain bytes (binary units).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "serde_yaml::Value")]
pub struct Size(pub u64);

impl Size {
    pub fn parse(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let mult: u64 = match unit.trim_end_matches("iB").trim_end_matches('B') {
            "" => 1,
            "K" | "k" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            "P" => 1 << 50,
            _ => return Err(format!("`{s}`: unknown unit `{unit}` (use K, M, G, T)")),
        };
        let n: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size (examples: 2G, 512M, 1.5T)"))?;
        let bytes = n * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 / 2.0 {
            return Err(format!("`{s}` is out of range"));
        }
        Ok(Size(bytes as u64))
    }
}

impl TryFrom<serde_yaml::Value> for Size {
    type Error = String;
    fn try_from(v: serde_yaml::Value) -> Result<Self, String> {
        match v {
            serde_yaml::Value::Number(n) => n
                .as_u64()
                .map(Size)
                .ok_or_else(|| format!("{n} is not a size")),
            serde_yaml::Value::String(s) => Size::parse(&s),
            other => Err(format!("expected a size like 2G, got {other:?}")),
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: &[(&str, u64)] = &[
            ("T", 1 << 40),
            ("G", 1 << 30),
            ("M", 1 << 20),
            ("K", 1 << 10),
        ];
        for (u, m) in UNITS {
            if self.0 >= *m && self.0.is_multiple_of(*m) {
                return write!(f, "{}{u}", self.0 / m);
            }
        }
        for (u, m) in UNITS {
            if self.0 >= *m {
                return write!(f, "{:.1}{u}", self.0 as f64 / *m as f64);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// An absolute local path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct AbsPath(pub PathBuf);

impl TryFrom<String> for AbsPath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let p = PathBuf::from(&s);
        if !p.is_absolute() {
            return Err(format!("`{s}` must be an absolute path"));
        }
        if p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(format!("`{s}` must not contain `..`"));
        }
        Ok(AbsPath(p))
    }
}

/// A container file name: one plain path component inside `server.path`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FileName(pub String);

impl TryFrom<String> for FileName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() || s.contains('/') || s == "." || s == ".." || s.starts_with('.') {
            return Err(format!(
                "`{s}` must be a plain file name inside server.path (no `/`, not hidden)"
            ));
        }
        if s.chars().any(|c| c.is_control()) {
            return Err(format!("`{s}` contains control characters"));
        }
        Ok(FileName(s))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Host name or address of the backup server.
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub user: String,
    /// Private key used for SSH and SSHFS (never a password: this runs unattended).
    pub identity_file: AbsPath,
    /// Pinned host keys in OpenSSH known_hosts format. Unknown or changed keys are refused.
    pub known_hosts: AbsPath,
    /// Directory on the server that holds the container.
    pub path: String,
    /// Seconds to wait for the TCP connection and each SSH operation.
    #[serde(default = "default_timeout")]
    pub timeout: u32,
    /// Overall deadline of one command (`run`, `restore`, `verify`, ...), teardown excluded.
    #[serde(default = "default_run_timeout")]
    pub run_timeout: Duration,
}

fn default_port() -> u16 {
    22
}
fn default_timeout() -> u32 {
    30
}
fn default_run_timeout() -> Duration {
    Duration(24 * 3600)
}

impl Server {
    /// How long file requests may stay unanswered, with nothing completing, before the I/O
    /// watchdog gives up on the server: twice `timeout` plus 30 s. The margin is for a server
    /// that is slow, not hung (an fsync of a lot of dirty data on a busy disk).
    pub fn stall_limit(&self) -> std::time::Duration {
        std::time::Duration::from_secs(2 * u64::from(self.timeout) + 30)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// Container file name, relative to `server.path`.
    pub file: FileName,
    /// Apparent size of the sparse container file.
    pub size: Size,
    /// 4096 random bytes that unlock the container; created by `init` if absent.
    pub keyfile: AbsPath,
    /// Client-side copy of the LUKS2 header. Default: `<keyfile>.header`.
    #[serde(default)]
    pub header_backup: Option<AbsPath>,
    /// Bytes of container per inode for mkfs.ext4 (default 65536, a quarter of mke2fs's
    /// default inode table; see docs/design.md for the sizing).
    #[serde(default)]
    pub bytes_per_inode: Option<Size>,
    /// Exact inode count for mkfs.ext4, overriding `bytes_per_inode`.
    #[serde(default)]
    pub inodes: Option<u64>,
    /// Offline recovery recipients (age `age1...` or SSH public keys): `init` encrypts the
    /// keyfile to them and stores the escrow beside the container and the keyfile.
    #[serde(default)]
    pub recovery_recipients: Vec<Recipient>,
    /// Grow the container during `run` when free space inside gets low.
    #[serde(default)]
    pub auto_grow: Option<AutoGrow>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoGrow {
    /// Grow when the filesystem's free space is under this: `10%` or a size (`20G`).
    pub when_free_below: Threshold,
    /// How much to add each time.
    pub step: Size,
    /// Never grow beyond this.
    pub max_size: Size,
}

/// A free-space threshold: a percentage of the filesystem, or a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "serde_yaml::Value")]
pub enum Threshold {
    Percent(u8),
    Bytes(u64),
}

impl Threshold {
    pub fn is_below(self, free: u64, total: u64) -> bool {
        match self {
            Threshold::Percent(p) => (free as u128) * 100 < (total as u128) * p as u128,
            Threshold::Bytes(b) => free < b,
        }
    }
}

impl TryFrom<serde_yaml::Value> for Threshold {
    type Error = String;
    fn try_from(v: serde_yaml::Value) -> Result<Self, String> {
        if let serde_yaml::Value::String(s) = &v {
            if let Some(n) = s.trim().strip_suffix('%') {
                return match n.trim().parse::<u8>() {
                    Ok(p) if (1..=90).contains(&p) => Ok(Threshold::Percent(p)),
                    _ => Err(format!("`{s}`: a percentage from 1% to 90%")),
                };
            }
        }
        Size::try_from(v).map(|s| Threshold::Bytes(s.0))
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Threshold::Percent(p) => write!(f, "{p}%"),
            Threshold::Bytes(b) => write!(f, "{}", Size(*b)),
        }
    }
}

/// One recovery recipient, checked when the profile is read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Recipient(pub String);

impl TryFrom<String> for Recipient {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        crate::escrow::parse_recipient(&s)?;
        Ok(Recipient(s.trim().to_string()))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// Absolute paths to back up; stored as `snapshots/<id>/<path>`.
    pub sources: Vec<AbsPath>,
    /// rsync exclude patterns (a leading `/` anchors at the file system root).
    #[serde(default)]
    pub excludes: Vec<String>,
    /// Do not cross file system boundaries below each source (rsync -x).
    #[serde(default)]
    pub one_file_system: bool,
    /// A run finds what an interrupted run of this profile left under `.partial/` and
    /// continues it, unless it was started longer ago than this (then it is discarded,
    /// and the log says so). Default 7 days.
    #[serde(default = "default_resume_max_age")]
    pub resume_max_age: Duration,
    /// Sources (or directories above one) that must be mount points: a run refuses, before
    /// it copies anything, when one is not mounted (an external disk or a network share
    /// whose empty mount point would otherwise be backed up as an empty source).
    #[serde(default)]
    pub require_mount: Vec<AbsPath>,
    /// A run refuses (exit 1, nothing committed or pruned) when the number of entries rsync
    /// counts in the sources fell by more than this share since the last committed snapshot
    /// (`run --allow-shrink` lets one run through). `100%` turns the check off.
    #[serde(default = "default_max_shrink")]
    pub max_shrink: Share,
    /// Files rsync could not read (permission denied, I/O error, another user's mount) are
    /// listed and the snapshot commits with exit 3; more than this many fail the run instead.
    #[serde(default = "default_max_unreadable")]
    pub max_unreadable: u64,
    /// Files larger than this are skipped (rsync --max-size), each named in a warning.
    #[serde(default)]
    pub max_file_size: Option<Size>,
    /// rsync --bwlimit: the most the snapshot's rsync reads per second (`2M`, `500K`).
    #[serde(default)]
    pub bwlimit: Option<Bwlimit>,
    /// Leave out every directory that holds a file of one of these names (CACHEDIR.TAG
    /// only with its signature): see [`crate::snapshots::filters`].
    #[serde(default)]
    pub exclude_if_present: Vec<TagName>,
    /// Files of rsync patterns (rsync --exclude-from), root-owned and not writable by others.
    #[serde(default)]
    pub exclude_from: Vec<AbsPath>,
}

/// A bandwidth limit for rsync, in bytes per second, written with a unit: `2M`, `500K`,
/// `1.5M`, optionally `/s` (`2MiB/s`). A bare number is refused: rsync reads it as KiB,
/// most people as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "serde_yaml::Value")]
pub struct Bwlimit(pub u64);

impl Bwlimit {
    pub fn parse(s: &str) -> Result<Bwlimit, String> {
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t).trim();
        if t.is_empty() || t.ends_with(|c: char| c.is_ascii_digit() || c == '.') {
            return Err(format!(
                "`{s}`: give a unit, per second: 500K, 2M (a bare number is ambiguous: rsync reads KiB)"
            ));
        }
        let bytes = Size::parse(t)?.0;
        if bytes < 1024 {
            return Err(format!(
                "`{s}` is below rsync's smallest limit, 1K per second"
            ));
        }
        Ok(Bwlimit(bytes))
    }

    /// What rsync's --bwlimit takes: KiB per second.
    pub fn kib(self) -> u64 {
        self.0 / 1024
    }
}

impl TryFrom<serde_yaml::Value> for Bwlimit {
    type Error = String;
    fn try_from(v: serde_yaml::Value) -> Result<Self, String> {
        match v {
            serde_yaml::Value::String(s) => Bwlimit::parse(&s),
            other => Bwlimit::parse(serde_yaml::to_string(&other).unwrap_or_default().trim()),
        }
    }
}

/// A file name whose presence leaves its directory out of the snapshot: one plain path
/// component (`CACHEDIR.TAG`, `.nobackup`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct TagName(pub String);

impl TryFrom<String> for TagName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() || s.contains('/') || s == "." || s == ".." || s.contains(char::is_control)
        {
            return Err(format!("`{s}` must be a plain file name (no `/`)"));
        }
        Ok(TagName(s))
    }
}

fn default_resume_max_age() -> Duration {
    Duration(7 * 86400)
}

fn default_max_shrink() -> Share {
    Share(50)
}

fn default_max_unreadable() -> u64 {
    100
}

/// A share written as a percentage, `1%` to `100%` (`backup.max_shrink`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "serde_yaml::Value")]
pub struct Share(pub u8);

impl TryFrom<serde_yaml::Value> for Share {
    type Error = String;
    fn try_from(v: serde_yaml::Value) -> Result<Self, String> {
        let s = match &v {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            _ => "?".to_string(),
        };
        match s.trim().strip_suffix('%').map(|n| n.trim().parse::<u8>()) {
            Some(Ok(p)) if (1..=100).contains(&p) => Ok(Share(p)),
            _ => Err(format!("`{s}`: a percentage from 1% to 100%")),
        }
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

/// A length of time written as `90s`, `15m`, `26h`, `7d` or plain seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "serde_yaml::Value")]
pub struct Duration(pub u64);

impl Duration {
    pub fn parse(s: &str) -> Result<Duration, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult = match unit.trim() {
            "" | "s" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            "d" => 86400,
            u => return Err(format!("`{s}`: unknown unit `{u}` (use s, m, h, d)")),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration (examples: 90s, 15m, 26h, 7d)"))?;
        n.checked_mul(mult)
            .filter(|v| *v > 0)
            .map(Duration)
            .ok_or_else(|| format!("`{s}` is out of range (must be at least 1s)"))
    }

    pub fn std(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.0)
    }
}

impl TryFrom<serde_yaml::Value> for Duration {
    type Error = String;
    fn try_from(v: serde_yaml::Value) -> Result<Self, String> {
        match v {
            serde_yaml::Value::Number(n) => match n.as_u64() {
                Some(s) if s > 0 => Ok(Duration(s)),
                _ => Err(format!("`{n}` is not a positive number of seconds")),
            },
            serde_yaml::Value::String(s) => Duration::parse(&s),
            other => Err(format!("expected a duration like 26h, got {other:?}")),
        }
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (u, m) in [("d", 86400), ("h", 3600), ("m", 60)] {
            if self.0.is_multiple_of(m) {
                return write!(f, "{}{u}", self.0 / m);
            }
        }
        write!(f, "{}s", self.0)
    }
}

/// Shell commands for one hook: a single string or a list of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "serde_yaml::Value")]
pub struct Commands(pub Vec<String>);

impl TryFrom<serde_yaml::Value> for Commands {
    type Error = String;
    fn try_from(v: serde_yaml::Value) -> Result<Self, String> {
        let one = |v: serde_yaml::Value| match v {
            serde_yaml::Value::String(s) if !s.trim().is_empty() => Ok(s),
            other => Err(format!(
                "expected a shell command (a non-empty string), got {other:?}"
            )),
        };
        match v {
            serde_yaml::Value::Sequence(items) => Ok(Commands(
                items.into_iter().map(one).collect::<Result<_, _>>()?,
            )),
            other => Ok(Commands(vec![one(other)?])),
        }
    }
}

/// Commands run around `run`, in the style of borgmatic's hooks (see docs/profile.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// After the local lock is taken, before anything else. Exit 75 skips the run.
    #[serde(default)]
    pub before: Commands,
    /// After a successful run (exit 0 or 3) and its teardown.
    #[serde(default)]
    pub after: Commands,
    /// After a failed run and its teardown.
    #[serde(default)]
    pub failed: Commands,
    /// Always, last.
    #[serde(default)]
    pub finally: Commands,
    /// Limit for each hook command; it is killed after that.
    #[serde(default = "default_hook_timeout")]
    pub timeout: Duration,
}

impl Default for Hooks {
    fn default() -> Hooks {
        Hooks {
            before: Commands::default(),
            after: Commands::default(),
            failed: Commands::default(),
            finally: Commands::default(),
            timeout: default_hook_timeout(),
        }
    }
}

fn default_hook_timeout() -> Duration {
    Duration(600)
}

/// Where a run reports to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Monitoring {
    /// healthchecks.io-style ping URL: `/start`, success, `/fail` are appended.
    #[serde(default)]
    pub healthcheck_url: Option<String>,
    /// `status` warns when the last success is older than this.
    #[serde(default)]
    pub expected_interval: Option<Duration>,
    /// Prometheus node-exporter textfile, rewritten atomically after every run.
    #[serde(default)]
    pub prometheus_textfile: Option<AbsPath>,
    /// This many runs in a row skipped by a `before` hook (exit 75) count as a failure:
    /// `status` exits 3, the healthcheck gets a `/fail` ping, the textfile says so.
    #[serde(default = "default_max_skips")]
    pub max_skips: u32,
}

fn default_max_skips() -> u32 {
    3
}

impl Default for Monitoring {
    fn default() -> Monitoring {
        Monitoring {
            healthcheck_url: None,
            expected_interval: None,
            prometheus_textfile: None,
            max_skips: default_max_skips(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    server: Server,
    container: Container,
    backup: Backup,
    #[serde(default)]
    retention: Option<retention::Policy>,
    #[serde(default)]
    hooks: Option<Hooks>,
    #[serde(default)]
    monitoring: Option<Monitoring>,
}

/// A validated profile.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Profile name (file stem): used for lock, state, mount point and mapping names.
    pub name: String,
    pub source_file: PathBuf,
    pub server: Server,
    pub container: Container,
    pub backup: Backup,
    pub retention: retention::Policy,
    pub hooks: Hooks,
    pub monitoring: Monitoring,
}

/// Make a deserialisation error name the line and key of a bad value.
///
/// A value rejected by one of our newtypes is reported by the YAML parser at the start of
/// the enclosing mapping ("container: `2Q`: unknown unit ... at line 8 column 3"). Our
/// messages quote the bad value in backticks, so look for it below the section header and
/// report that line and its key instead. Unknown keys and syntax errors already carry the
/// right line and are returned unchanged.
fn pinpoint(text: &str, msg: &str) -> String {
    if msg.contains("expected struct Raw") || msg.starts_with("EOF while parsing") {
        let at = msg
            .rsplit_once(" at line ")
            .map(|(_, l)| format!("line {}: ", l.split(' ').next().unwrap_or("?")))
            .unwrap_or_default();
        return format!("{at}this is not a profile: {WHAT_A_PROFILE_IS}");
    }
    let located = (|| {
        let (section, rest) = msg.split_once(": ")?;
        if section.contains(' ') {
            return None;
        }
        // A missing key: the parser names the section's line; the key's name is not a value
        // to look for (`host` would find `known_hosts`).
        if let Some(field) = rest.strip_prefix("missing field `") {
            let field = field.split('`').next()?;
            let line = line_of(text, section)?;
            return Some(format!(
                "line {line}: {section}: the required key `{field}` is missing"
            ));
        }
        // A section that is not a mapping (`server: foo`).
        if rest.contains("expected struct ") {
            let line = line_of(text, section)?;
            let what = rest.split(" at line ").next().unwrap_or(rest);
            let what = what
                .split(", expected struct")
                .next()
                .unwrap_or(what)
                .trim_start_matches("invalid type: ");
            return Some(format!(
                "line {line}: {section}: expected a mapping of keys (`key: value` lines \
                 indented below it), found {what}"
            ));
        }
        let value = rest.split('`').nth(1)?;
        let lines: Vec<&str> = text.lines().collect();
        let top = section.split('.').next()?;
        let start = lines
            .iter()
            .position(|l| l.starts_with(&format!("{top}:")))?;
        for (i, l) in lines.iter().enumerate().skip(start + 1) {
            if !l.starts_with(' ') && !l.trim().is_empty() && !l.starts_with('#') {
                break;
            }
            if !l.contains(value) {
                continue;
            }
            let t = l.trim_start();
            let key = if t.starts_with("- ") {
                lines[..i]
                    .iter()
                    .rev()
                    .find(|p| p.trim_end().ends_with(':') && !p.trim_start().starts_with('-'))
                    .map(|p| p.trim().trim_end_matches(':').to_string())?
            } else {
                t.split(':').next()?.trim().to_string()
            };
            let what = rest.split(" at line ").next().unwrap_or(rest);
            return Some(format!("line {}: {top}.{key}: {what}", i + 1));
        }
        None
    })();
    located.unwrap_or_else(|| msg.to_string())
}

/// The line (1-based) of a dotted key (`container.size`) in a profile's text: the block-style
/// YAML the examples use (a key below its section, more indented), or a flow mapping on its
/// section's line (`server: {host: h, ...}`). None when not found.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut parts = key.split('.');
    let top = parts.next().filter(|t| !t.is_empty() && !t.contains(' '))?;
    let mut at = lines
        .iter()
        .position(|l| l.starts_with(&format!("{top}:")))?;
    let mut indent = 0;
    for part in parts {
        let want = format!("{part}:");
        if lines[at].contains('{') {
            return lines[at].contains(&want).then_some(at + 1);
        }
        let mut found = None;
        for (j, l) in lines.iter().enumerate().skip(at + 1) {
            let t = l.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let ind = l.len() - t.len();
            if ind <= indent {
                break;
            }
            if t.starts_with(&want) {
                found = Some((j, ind));
                break;
            }
        }
        let (j, ind) = found?;
        at = j;
        indent = ind;
    }
    Some(at + 1)
}

/// What a profile is, for a file that is something else (a scalar, a list, empty).
const WHAT_A_PROFILE_IS: &str = "a profile is a YAML mapping with the sections `server:`, \
    `container:` and `backup:` (and optionally `retention:`, `hooks:`, `monitoring:`); \
    start from profiles/example.yaml (docs/profile.md explains every key)";

/// A profile is a page of YAML; anything larger is not one.
const PROFILE_MAX_BYTES: u64 = 1 << 20;

/// Minimum container: the LUKS2 header (2 MiB) plus room for an ext4 journal and data.
pub const MIN_SIZE: u64 = 64 << 20;

impl Profile {
    /// Resolve PROFILE (a path, or a name under /etc/e2ebackup/profiles) and load it.
    pub fn resolve(arg: &str) -> Result<Profile> {
        let path = if arg.contains('/') || arg.ends_with(".yaml") || arg.ends_with(".yml") {
            PathBuf::from(arg)
        } else {
            Path::new(PROFILE_DIR).join(format!("{arg}.yaml"))
        };
        Profile::load_private(&path)
    }

    /// [`Profile::load`] for a profile that root is about to act on: the file must be owned
    /// by root (this user) and neither readable nor writable by group or others, as ssh
    /// requires of a private key. A profile holds `monitoring.healthcheck_url` (whoever reads
    /// it can report success for ever) and says what root backs up and where; another user
    /// who could change it could have root run hooks of their choosing. Otherwise a usage
    /// error (exit 2) naming the file, its owner and mode, and the commands that fix it.
    /// Owner and mode are those of the file that was opened and read (no second lookup).
    pub fn load_private(path: &Path) -> Result<Profile> {
        use std::os::unix::fs::MetadataExt;
        let (bytes, md) = crate::fsutil::read_local_bounded(path, PROFILE_MAX_BYTES)
            .map_err(|e| usage(format!("cannot read profile {}: {e:#}", path.display())))?;
        let me = nix::unistd::geteuid().as_raw();
        if md.uid() != me || md.mode() & 0o077 != 0 {
            return Err(usage(format!(
                "profile {} is owned by uid {} with mode {:04o}: a profile must be owned by \
                 {} and not accessible by group or others (it names the keyfile and holds the \
                 healthcheck URL; another user could read or change it). Fix it with: \
                 chown {}:{} {} && chmod 0600 {}",
                path.display(),
                md.uid(),
                md.mode() & 0o7777,
                if me == 0 {
                    "root".to_string()
                } else {
                    format!("uid {me}")
                },
                me,
                nix::unistd::getegid().as_raw(),
                path.display(),
                path.display()
            )));
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| usage(format!("profile {} is not UTF-8 text", path.display())))?;
        Profile::parse(path, &text)
    }

    pub fn load(path: &Path) -> Result<Profile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| usage(format!("cannot read profile {}: {e}", path.display())))?;
        Profile::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Profile> {
        let raw: Raw = serde_yaml::from_str(text).map_err(|e| {
            usage(format!(
                "{}: {}",
                path.display(),
                pinpoint(text, &e.to_string())
            ))
        })?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_string();
        // Every check below adds to `errs`, with the line of its key: all the problems of
        // the file are reported at once, each where it is.
        let mut errs: Vec<String> = Vec::new();
        let mut bad = |msg: String| {
            let key = msg.split(':').next().unwrap_or("");
            errs.push(match line_of(text, key) {
                Some(n) => format!("line {n}: {msg}"),
                None => msg,
            });
        };
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bad(format!(
                "profile name `{name}` (the file name) must be 1-64 characters of A-Z a-z 0-9 - _"
            ));
        }
        let s = &raw.server;
        if s.host.is_empty() || s.host.chars().any(|c| c.is_whitespace() || c == '@') {
            bad(format!("server.host: `{}` is not a host name", s.host));
        }
        if s.user.is_empty()
            || s.user
                .chars()
                .any(|c| c.is_whitespace() || c == '@' || c == ':')
        {
            bad(format!("server.user: `{}` is not a user name", s.user));
        }
        if s.path.is_empty() || s.path.chars().any(|c| c.is_control()) {
            bad("server.path: must be a directory on the server".into());
        }
        if s.timeout == 0 {
            bad("server.timeout: must be at least 1 second".into());
        }
        let c = &raw.container;
        if c.size.0 < MIN_SIZE {
            bad(format!(
                "container.size: {} is too small (minimum {})",
                c.size,
                Size(MIN_SIZE)
            ));
        }
        if !c.size.0.is_multiple_of(1 << 20) {
            let mib = c.size.0 >> 20;
            bad(format!(
                "container.size: {} is {} bytes, not a whole number of MiB: write {mib}M or {}M",
                c.size,
                c.size.0,
                mib + 1
            ));
        }
        if let Some(ag) = &c.auto_grow {
            if ag.step.0 < (1 << 20) || !ag.step.0.is_multiple_of(1 << 20) {
                bad(format!(
                    "container.auto_grow.step: {} must be a whole number of MiB, at least 1M",
                    ag.step
                ));
            }
            if !ag.max_size.0.is_multiple_of(1 << 20) {
                bad(format!(
                    "container.auto_grow.max_size: {} must be a whole number of MiB",
                    ag.max_size
                ));
            }
            if ag.max_size.0 < c.size.0 {
                bad(format!(
                    "container.auto_grow.max_size: {} is smaller than container.size {}",
                    ag.max_size, c.size
                ));
            }
        }
        if let Some(b) = c.bytes_per_inode {
            if !(4096..=(64 << 20)).contains(&b.0) {
                bad("container.bytes_per_inode: must be between 4K and 64M".into());
            }
        }
        if raw.backup.sources.is_empty() {
            bad("backup.sources: list at least one directory".into());
        }
        for (i, a) in raw.backup.sources.iter().enumerate() {
            for b in &raw.backup.sources[i + 1..] {
                if a.0.starts_with(&b.0) || b.0.starts_with(&a.0) {
                    bad(format!(
                        "backup.sources: `{}` and `{}` overlap",
                        a.0.display(),
                        b.0.display()
                    ));
                }
            }
        }
        for e in &raw.backup.excludes {
            if e.is_empty() || e.contains('\n') {
                bad("backup.excludes: empty or multi-line pattern".into());
            }
        }
        for m in &raw.backup.require_mount {
            if !raw.backup.sources.iter().any(|s| s.0.starts_with(&m.0)) {
                bad(format!(
                    "backup.require_mount: `{}` is neither a source nor a directory above one",
                    m.0.display()
                ));
            }
        }
        if raw.backup.max_file_size.is_some_and(|s| s.0 == 0) {
            bad("backup.max_file_size: must be more than 0".into());
        }
        let retention = raw.retention.unwrap_or_default();
        let monitoring = raw.monitoring.unwrap_or_default();
        if let Some(u) = &monitoring.healthcheck_url {
            let rest = u
                .strip_prefix("https://")
                .or_else(|| u.strip_prefix("http://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
                bad(format!(
                    "monitoring.healthcheck_url: `{u}` is not an http:// or https:// URL"
                ));
            }
        }
        match errs.len() {
            0 => {}
            1 => return Err(usage(format!("{}: {}", path.display(), errs[0]))),
            n => {
                return Err(usage(format!(
                    "{}: {n} problems:\n  {}",
                    path.display(),
                    errs.join("\n  ")
                )))
            }
        }
        Ok(Profile {
            name,
            source_file: path.to_path_buf(),
            server: raw.server,
            container: raw.container,
            backup: raw.backup,
            retention,
            hooks: raw.hooks.unwrap_or_default(),
            monitoring,
        })
    }

    /// Inode count for mkfs.ext4.
    pub fn inode_count(&self) -> u64 {
        if let Some(n) = self.container.inodes {
            return n;
        }
        let per = self.container.bytes_per_inode.map(|s| s.0).unwrap_or(65536);
        (self.container.size.0 / per).max(16384)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
server:
  host: 127.0.0.1
  user: backupuser
  identity_file: /etc/e2ebackup/demo/id_ed25519
  known_hosts: /etc/e2ebackup/demo/known_hosts
  path: /srv/backup
container:
  file: demo.luks
  size: 2G
  keyfile: /etc/e2ebackup/demo/container.key
backup:
  sources: [/home, /etc]
  excludes: [\"*.tmp\"]
";

    fn parse(text: &str) -> Result<Profile> {
        Profile::parse(Path::new("/etc/e2ebackup/profiles/demo.yaml"), text)
    }

    #[test]
    fn good_profile_gets_defaults() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.name, "demo");
        assert_eq!(p.server.port, 22);
        assert_eq!(p.server.run_timeout, Duration(86400));
        assert_eq!(p.server.stall_limit().as_secs(), 90);
        assert_eq!(p.container.size, Size(2 << 30));
        assert_eq!(p.remote_container(), "/srv/backup/demo.luks");
        assert_eq!(
            p.header_backup(),
            PathBuf::from("/etc/e2ebackup/demo/container.key.header")
        );
        assert_eq!(p.inode_count(), 32768);
        assert!(p.retention.is_empty());
        assert_eq!(p.mapping_name(), "e2ebackup-demo");
    }

    fn err(text: &str) -> String {
        let e = parse(text).unwrap_err();
        assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Usage);
        format!("{e:#}")
    }

    #[test]
    fn hooks_and_monitoring() {
        let p = parse(&format!(
            "{GOOD}hooks:\n  before: /usr/local/bin/wake-nas\n  finally: [a, b]\n  timeout: 2m\n\
             monitoring:\n  healthcheck_url: https://hc-ping.com/x\n  expected_interval: 26h\n"
        ))
        .unwrap();
        assert_eq!(p.hooks.before.0, ["/usr/local/bin/wake-nas"]);
        assert_eq!(p.hooks.finally.0, ["a", "b"]);
        assert!(p.hooks.after.0.is_empty());
        assert_eq!(p.hooks.timeout, Duration(120));
        assert_eq!(p.monitoring.expected_interval, Some(Duration(26 * 3600)));
        assert_eq!(parse(GOOD).unwrap().hooks.timeout, Duration(600));
        let e = err(&format!("{GOOD}hooks:\n  befor: x\n"));
        assert!(e.contains("befor") && e.contains("line 15"), "{e}");
        let e = err(&format!("{GOOD}monitoring:\n  expected_interval: 3w\n"));
        assert!(e.contains("line 15: monitoring.expected_interval"), "{e}");
        let e = err(&format!(
            "{GOOD}monitoring:\n  healthcheck_url: hc-ping.com/x\n"
        ));
        assert!(e.contains("monitoring.healthcheck_url"), "{e}");
        let e = err(&format!("{GOOD}hooks:\n  after: ['']\n"));
        assert!(e.contains("non-empty"), "{e}");
    }

    #[test]
    fn auto_grow_thresholds() {
        let p = parse(&GOOD.replace(
            "  keyfile: /etc/e2ebackup/demo/container.key\n",
            "  keyfile: /etc/e2ebackup/demo/container.key\n  auto_grow: {when_free_below: 10%, step: 1G, max_size: 8G}\n",
        ))
        .unwrap();
        let ag = p.container.auto_grow.unwrap();
        assert_eq!(ag.when_free_below, Threshold::Percent(10));
        assert!(ag.when_free_below.is_below(99, 1000));
        assert!(!ag.when_free_below.is_below(100, 1000));
        assert_eq!(ag.max_size, Size(8 << 30));
        let t: Threshold = serde_yaml::from_str("20G").unwrap();
        assert!(t.is_below((20 << 30) - 1, 1 << 40));
        let with = |ag: &str| {
            GOOD.replace(
                "  keyfile: /etc/e2ebackup/demo/container.key\n",
                &format!("  keyfile: /etc/e2ebackup/demo/container.key\n  auto_grow: {ag}\n"),
            )
        };
        let e = err(&with("{when_free_below: 95%, step: 1G, max_size: 8G}"));
        assert!(e.contains("1% to 90%"), "{e}");
        let e = err(&with("{when_free_below: 10%, step: 1G, max_size: 1G}"));
        assert!(e.contains("auto_grow.max_size"), "{e}");
        let e = err(&with("{when_free_below: 10%, step: 1G, max_size: 8193K}"));
        assert!(
            e.contains("max_size: 8193K must be a whole number of MiB"),
            "{e}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(Duration::parse("90s"), Ok(Duration(90)));
        assert_eq!(Duration::parse("7d"), Ok(Duration(7 * 86400)));
        assert_eq!(Duration(93600).to_string(), "26h");
        assert_eq!(Duration(61).to_string(), "61s");
        assert!(Duration::parse("0").is_err());
        assert!(Duration::parse("1.5h").is_err());
    }

    #[test]
    fn typo_names_file_line_and_key() {
        let e = err(&GOOD.replace("  user:", "  usr:"));
        assert!(e.contains("demo.yaml"), "{e}");
        assert!(e.contains("usr"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn bad_size_names_line() {
        let e = err(&GOOD.replace("size: 2G", "size: 2Q"));
        assert!(e.contains("unknown unit"), "{e}");
        assert!(e.contains("line 9: container.size"), "{e}");
        let e = err(&GOOD.replace("[/home, /etc]", "[/home, etc]"));
        assert!(e.contains("line 12: backup.sources"), "{e}");
        assert!(e.contains("absolute"), "{e}");
        let e = err(&GOOD.replace("size: 2G", "size: 10M"));
        assert!(e.contains("too small"), "{e}");
    }

    #[test]
    fn source_guards_validated_with_line_and_key() {
        let p = parse(GOOD).unwrap();
        assert_eq!(
            (p.backup.max_shrink, p.backup.max_unreadable),
            (Share(50), 100)
        );
        assert!(p.backup.require_mount.is_empty() && p.backup.max_file_size.is_none());
        let p = parse(&format!(
            "{GOOD}  require_mount: [/home]\n  max_shrink: 20%\n  max_unreadable: 0\n  max_file_size: 4G\n"
        ))
        .unwrap();
        assert_eq!(p.backup.max_shrink, Share(20));
        assert_eq!(p.backup.max_file_size, Some(Size(4 << 30)));
        assert_eq!(p.backup.require_mount[0].0, Path::new("/home"));
        let e = err(&format!("{GOOD}  require_mount: [/mnt/disk]\n"));
        assert!(e.contains("line 14: backup.require_mount"), "{e}");
        assert!(e.contains("neither a source"), "{e}");
        let e = err(&format!("{GOOD}  max_shrink: 150%\n"));
        assert!(e.contains("line 14: backup.max_shrink"), "{e}");
        let e = err(&format!("{GOOD}  max_shrink: 50\n"));
        assert!(e.contains("line 14: backup.max_shrink"), "{e}");
        let e = err(&format!("{GOOD}  max_file_size: 0\n"));
        assert!(e.contains("line 14: backup.max_file_size"), "{e}");
    }

    #[test]
    fn relative_paths_and_bad_names_refused() {
        let e = err(&GOOD.replace("/etc/e2ebackup/demo/container.key", "container.key"));
        assert!(e.contains("absolute"), "{e}");
        let e = err(&GOOD.replace("file: demo.luks", "file: ../x"));
        assert!(e.contains("plain file name"), "{e}");
        let e = err(&GOOD.replace("[/home, /etc]", "[/home, /home/alice]"));
        assert!(e.contains("overlap"), "{e}");
        let e = err(&GOOD.replace("[/home, /etc]", "[]"));
        assert!(e.contains("at least one"), "{e}");
        let bad_name = Profile::parse(Path::new("/tmp/bad name.yaml"), GOOD).unwrap_err();
        assert!(format!("{bad_name:#}").contains("profile name"));
    }

    /// Issue 28, traps 4 and 5: checks after parsing name their line, and every problem of
    /// the file is reported, not only the first.
    #[test]
    fn checks_after_parsing_name_lines_and_report_all() {
        let text = GOOD
            .replace("  user: backupuser", "  user: 'back up'")
            .replace("size: 2G", "size: 1.3G")
            .replace("[/home, /etc]", "[/home, /home/alice]");
        let e = err(&text);
        assert!(e.contains("3 problems"), "{e}");
        assert!(e.contains("line 3: server.user"), "{e}");
        assert!(
            e.contains("line 9: container.size: 1.3G is 1395864371 bytes"),
            "{e}"
        );
        assert!(e.contains("write 1331M or 1332M"), "{e}");
        assert!(e.contains("line 12: backup.sources"), "{e}");
        // Flow style: the section's line.
        let e = err(
            "server: {host: h, user: 'a b', identity_file: /k, known_hosts: /kh, path: /s}\n\
             container: {file: c.luks, size: 1G, keyfile: /key}\nbackup: {sources: [/home]}\n",
        );
        assert!(e.contains("line 1: server.user"), "{e}");
    }

    #[test]
    fn missing_host_names_host_and_its_section() {
        let e = err(&GOOD.replace("  host: 127.0.0.1\n", ""));
        assert!(
            e.contains("line 1: server: the required key `host` is missing"),
            "{e}"
        );
        assert!(!e.contains("known_hosts"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_mapping_says_what_a_profile_is() {
        for text in ["hello\n", "- a\n- b\n"] {
            let e = err(text);
            assert!(
                e.contains("not a profile") && e.contains("`server:`"),
                "{e}"
            );
            assert!(!e.contains("struct Raw"), "{e}");
        }
        let e = err(&GOOD.replace(
            "server:\n  host: 127.0.0.1\n  user: backupuser\n  identity_file: /etc/e2ebackup/demo/id_ed25519\n  known_hosts: /etc/e2ebackup/demo/known_hosts\n  path: /srv/backup\n",
            "server: backup.example.org\n",
        ));
        assert!(e.contains("line 1: server: expected a mapping"), "{e}");
        assert!(!e.contains("struct"), "{e}");
    }

    #[test]
    fn keep_within_m_is_refused_at_its_line() {
        let e = err(&format!("{GOOD}retention:\n  keep_within: 10m\n"));
        assert!(e.contains("line 15: retention.keep_within"), "{e}");
        assert!(e.contains("10mo") && e.contains("10min"), "{e}");
    }

    #[test]
    fn missing_key_is_named() {
        let e = err(&GOOD.replace("  path: /srv/backup\n", ""));
        assert!(e.contains("path"), "{e}");
    }

    #[test]
    fn retention_parsed() {
        let p = parse(&format!(
            "{GOOD}retention:\n  keep_daily: 7\n  keep_within: 2d\n"
        ))
        .unwrap();
        assert_eq!(p.retention.keep_daily, Some(7));
        assert_eq!(p.retention.keep_within, Some(2 * 86400));
        let e = err(&format!("{GOOD}retention:\n  keep_dayly: 7\n"));
        assert!(e.contains("keep_dayly"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("512M").unwrap(), Size(512 << 20));
        assert_eq!(Size::parse("1.5G").unwrap(), Size(3 << 29));
        assert_eq!(Size::parse("2GiB").unwrap(), Size(2 << 30));
        assert_eq!(Size::parse("4096").unwrap(), Size(4096));
        assert!(Size::parse("G").is_err());
        assert!(Size::parse("-1G").is_err());
        assert_eq!(Size(2 << 30).to_string(), "2G");
        assert_eq!(Size(3 << 29).to_string(), "1536M");
        assert_eq!(Size(3 << 29 | 1).to_string(), "1.5G");
    }

    #[test]
    fn example_profiles_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "yaml") {
                let prof = Profile::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                if p.ends_with("example.yaml") {
                    // Copied by newcomers: no hook may be active in it (a `before` hook that
                    // tests the example's host skipped every run of a copied profile).
                    let h = &prof.hooks;
                    assert!(
                        h.before.0.is_empty()
                            && h.after.0.is_empty()
                            && h.failed.0.is_empty()
                            && h.finally.0.is_empty(),
                        "profiles/example.yaml ships an active hook: {h:?}"
                    );
                }
                n += 1;
            }
        }
        assert!(n >= 1, "no example profiles in {}", dir.display());
    }
    #[test]
    fn bwlimit_exclude_if_present_and_exclude_from() {
        let p = parse(&format!(
            "{GOOD}  bwlimit: 2M\n  exclude_if_present: [CACHEDIR.TAG, .nobackup]\n  exclude_from: [/etc/e2ebackup/x.rules]\n"
        ))
        .unwrap();
        assert_eq!(p.backup.bwlimit, Some(Bwlimit(2 << 20)));
        assert_eq!(p.backup.bwlimit.unwrap().kib(), 2048);
        assert_eq!(p.backup.exclude_if_present[1].0, ".nobackup");
        assert_eq!(
            p.backup.exclude_from[0].0,
            Path::new("/etc/e2ebackup/x.rules")
        );
        let none = parse(GOOD).unwrap();
        assert!(none.backup.bwlimit.is_none() && none.backup.exclude_if_present.is_empty());
        for (v, kib) in [
            ("500K", 500),
            ("500k/s", 500),
            ("1.5M", 1536),
            ("2MiB/s", 2048),
            ("1G", 1 << 20),
        ] {
            assert_eq!(Bwlimit::parse(v).unwrap().kib(), kib, "{v}");
        }
        for bad in ["500", "2", "", "fast", "0K", "512B", "2X"] {
            assert!(Bwlimit::parse(bad).is_err(), "{bad}");
        }
        // A bare number names its line and says why.
        let e = err(&format!("{GOOD}  bwlimit: 500\n"));
        assert!(
            e.contains("line 14") && e.contains("bwlimit") && e.contains("give a unit"),
            "{e}"
        );
        let e = err(&format!("{GOOD}  exclude_if_present: [a/b]\n"));
        assert!(
            e.contains("line 14") && e.contains("plain file name"),
            "{e}"
        );
        let e = err(&format!("{GOOD}  exclude_from: [rules.txt]\n"));
        assert!(e.contains("line 14") && e.contains("absolute"), "{e}");
    }
}
