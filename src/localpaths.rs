//! Local paths checked before the first connection.
//!
//! A profile can name a file that can never be created (a keyfile "in" a directory that is
//! really a regular file, a header backup under a read-only or missing mount). Found late,
//! that costs a login to the server and a half-done command that exits 1; found first, it is
//! a usage error (exit 2) that names the path. So `validate` and [`crate::session::Session`]
//! run [`problems`] before anything else. Only what the file system can tell without writing
//! is checked: the path itself is of the right kind if it exists, and its nearest existing
//! ancestor is a directory. Permissions are not checked: we are root.

use std::path::{Path, PathBuf};

use crate::error::usage;
use crate::profile::Profile;

/// What a path must be.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    File,
    Dir,
}

/// The local paths of a profile that commands create or write, with the profile key that
/// names each (for the message).
pub fn paths_of(p: &Profile) -> Vec<(String, PathBuf, Kind)> {
    vec![
        (
            "container.keyfile".into(),
            p.container.keyfile.0.clone(),
            Kind::File,
        ),
        (
            "container.header_backup".into(),
            p.header_backup(),
            Kind::File,
        ),
        ("the key escrow copy".into(), p.escrow_client(), Kind::File),
        ("the state directory".into(), p.state_dir(), Kind::Dir),
        ("the run directory".into(), p.run_dir(), Kind::Dir),
        (
            "the lock directory".into(),
            crate::layout::local_lock_dir(),
            Kind::Dir,
        ),
    ]
}

/// Why `path` cannot be (or become) a `kind`, if so.
pub fn check(path: &Path, kind: Kind) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(m) if kind == Kind::File && m.is_dir() => {
            return Some(format!("{} is a directory, not a file", path.display()))
        }
        Ok(m) if kind == Kind::Dir && !m.is_dir() => {
            return Some(format!("{} exists and is not a directory", path.display()))
        }
        Ok(_) => return None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            // ENOTDIR: an ancestor is not a directory; found below with its name.
            if e.raw_os_error() != Some(libc::ENOTDIR) {
                return Some(format!("{}: {e}", path.display()));
            }
        }
    }
    let mut a = path.parent();
    while let Some(dir) = a {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => return None,
            Ok(_) => {
                return Some(format!(
                    "{} cannot be created: {} is not a directory",
                    path.display(),
                    dir.display()
                ))
            }
            Err(_) => a = dir.parent(),
        }
    }
    None
}

/// Every problem with the profile's local paths, each naming its path.
pub fn problems(p: &Profile) -> Vec<String> {
    paths_of(p)
        .into_iter()
        .filter_map(|(what, path, kind)| check(&path, kind).map(|why| format!("{what}: {why}")))
        .collect()
}

/// `line N: ` for a profile key, read from the profile's file (empty when not found).
pub fn at_line(p: &Profile, key: &str) -> String {
    std::fs::read_to_string(&p.source_file)
        .ok()
        .and_then(|t| crate::profile::line_of(&t, key))
        .map(|n| format!("line {n}: "))
        .unwrap_or_default()
}

/// Sources that do not exist, each naming its line: rsync would fail the run after the whole
/// stack is open. `validate` refuses them (borgmatic's `source_directories_must_exist: true`,
/// always on here: a snapshot without a source is an incomplete backup) unless a `before`
/// hook could create them (mount a disk), and `run` checks them after its `before` hook,
/// before it connects.
pub fn source_problems(p: &Profile) -> Vec<String> {
    p.backup
        .sources
        .iter()
        .filter(|s| std::fs::symlink_metadata(&s.0).is_err())
        .map(|s| {
            format!(
                "{}backup.sources: backup source {} does not exist (remove it from the \
                 profile, or create it)",
                at_line(p, "backup.sources"),
                s.0.display()
            )
        })
        .collect()
}

/// The Prometheus textfile's directory must exist: the file is written there after each run,
/// and a missing directory is a monitoring that never reports.
pub fn textfile_problem(p: &Profile) -> Option<String> {
    let t = p.monitoring.prometheus_textfile.as_ref()?;
    let dir = t.0.parent().unwrap_or(Path::new("/"));
    (!dir.is_dir()).then(|| {
        format!(
            "{}monitoring.prometheus_textfile: the directory {} does not exist \
             (node-exporter's textfile directory, e.g. /var/lib/prometheus/node-exporter)",
            at_line(p, "monitoring.prometheus_textfile"),
            dir.display()
        )
    })
}

/// Why `path` cannot be an SSH identity (private key) file, if so: missing, or a public key
/// (a `.pub` given by mistake: ssh would only say "authentication failed").
pub fn identity_problem(path: &Path) -> Option<String> {
    use std::io::Read as _;
    let mut head = [0u8; 64];
    let n = match std::fs::File::open(path) {
        Ok(mut f) if path.is_file() => f.read(&mut head).unwrap_or(0),
        _ => return Some(format!("{} does not exist", path.display())),
    };
    let head = String::from_utf8_lossy(&head[..n]);
    let public = ["ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-"]
        .iter()
        .any(|p| head.starts_with(p));
    public.then(|| {
        let private = path.to_string_lossy();
        let private = private.strip_suffix(".pub").unwrap_or("the private key");
        format!(
            "{} is a public key; give the private key ({private}), whose public half is in \
             the server's authorized_keys",
            path.display()
        )
    })
}

/// [`problems`] as a usage error (exit 2), for the start of a command.
pub fn ensure(p: &Profile) -> anyhow::Result<()> {
    let v = problems(p);
    if v.is_empty() {
        Ok(())
    } else {
        Err(usage(format!(
            "{}: {} (nothing was touched)",
            p.source_file.display(),
            v.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 28, trap 4: things `validate` passed and `run` then failed on.
    #[test]
    fn missing_source_textfile_dir_and_public_identity_are_problems() {
        let d = tempfile::tempdir().unwrap();
        let prof = d.path().join("trap4.yaml");
        std::fs::write(
            &prof,
            format!(
                "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: /s}}\n\
                 container: {{file: c.luks, size: 1G, keyfile: /key}}\n\
                 backup:\n  sources: [/etc, {d}/nope]\n\
                 monitoring:\n  prometheus_textfile: {d}/missing/x.prom\n",
                d = d.path().display()
            ),
        )
        .unwrap();
        let p = Profile::load(&prof).unwrap();
        let v = source_problems(&p);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].starts_with("line 4: backup.sources: ") && v[0].contains("nope does not exist"),
            "{v:?}"
        );
        let t = textfile_problem(&p).unwrap();
        assert!(
            t.starts_with("line 6: monitoring.prometheus_textfile"),
            "{t}"
        );
        let key = d.path().join("id");
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(identity_problem(&key), None);
        let e = identity_problem(&d.path().join("id.pub")).unwrap();
        assert!(
            e.contains("is a public key") && e.contains(&key.display().to_string()),
            "{e}"
        );
        assert!(identity_problem(&d.path().join("none"))
            .unwrap()
            .contains("does not exist"));
    }

    #[test]
    fn paths_under_a_regular_file_or_of_the_wrong_kind() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("plain");
        std::fs::write(&f, "x").unwrap();
        let under = f.join("keys/k.key");
        let e = check(&under, Kind::File).unwrap();
        assert!(e.contains(&under.display().to_string()), "{e}");
        assert!(
            e.contains(&format!("{} is not a directory", f.display())),
            "{e}"
        );
        assert!(check(&f.join("dir"), Kind::Dir).is_some());
        assert_eq!(
            check(d.path(), Kind::File).unwrap(),
            format!("{} is a directory, not a file", d.path().display())
        );
        assert!(check(&f, Kind::Dir).unwrap().contains("is not a directory"));
        // Fine: existing file, existing dir, missing paths below a directory.
        assert_eq!(check(&f, Kind::File), None);
        assert_eq!(check(d.path(), Kind::Dir), None);
        assert_eq!(check(&d.path().join("a/b/c.key"), Kind::File), None);
        assert_eq!(check(&d.path().join("a/b"), Kind::Dir), None);
    }

    #[test]
    fn a_profile_with_a_keyfile_under_a_file_is_a_usage_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("plain");
        std::fs::write(&f, "x").unwrap();
        let p = crate::profile::Profile::parse(
            Path::new("/etc/e2ebackup/profiles/t.yaml"),
            &format!(
                "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}}\n\
                 container: {{file: c.luks, size: 1G, keyfile: {}/k.key}}\n\
                 backup: {{sources: [/etc]}}\n",
                f.display()
            ),
        )
        .unwrap();
        let v = problems(&p);
        // keyfile, its default header backup and escrow copy: all under the file.
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(v[0].starts_with("container.keyfile: "), "{v:?}");
        let e = ensure(&p).unwrap_err();
        assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Usage);
        assert!(format!("{e:#}").contains("t.yaml"));
    }
}
