//! Command line (clap derive). The doc comments are the `--help` text.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::error::Exit;
use crate::ops;
use crate::profile::Profile;

/// End-to-end encrypted backups to a server you do not trust.
///
/// The server stores one sparse file: a LUKS2 container with an ext4 filesystem inside,
/// reached over SSHFS. The key never leaves this machine; the server only sees ciphertext.
/// Each run adds an rsync --link-dest snapshot (a full tree; unchanged files are hard links).
///
/// PROFILE is a path to a YAML profile, or a name looked up as
/// /etc/e2ebackup/profiles/NAME.yaml.
///
/// Exit status: 0 success; 1 failed, teardown complete; 2 invalid usage or profile;
/// 3 snapshot committed with warnings; 4 another run holds the lock; 5 failed and teardown
/// incomplete (manual action printed); 6 refused for security; 130 interrupted.
#[derive(Debug, Parser)]
#[command(name = "e2ebackup", version, max_term_width = 100)]
pub struct Cli {
    /// More output (-v: commands run; -vv: debug)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The profile every command but `generate-assets` acts on.
#[derive(Debug, Args)]
pub struct ProfileArg {
    /// Profile name (/etc/e2ebackup/profiles/NAME.yaml) or path to a profile file
    #[arg(value_name = "PROFILE")]
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the encrypted container on the server (once)
    Init {
        #[command(flatten)]
        profile: ProfileArg,
    },
    /// Take a snapshot now (what cron or the systemd timer runs)
    Run {
        #[command(flatten)]
        profile: ProfileArg,
        /// Commit this once although a source is empty or shrank by more than
        /// backup.max_shrink since the last snapshot (an intended clean-up)
        #[arg(long)]
        allow_shrink: bool,
        /// Only list what would be sent (`+ /path`, new or changed) and deleted (`- /path`)
        /// against the newest snapshot, and what retention would prune. The container is
        /// opened read-only; no hook runs; nothing is recorded
        #[arg(long)]
        dry_run: bool,
    },
    /// Check a profile and the local prerequisites without changing anything
    Validate {
        #[command(flatten)]
        profile: ProfileArg,
        /// Also connect to the server (host key, login, directory, free space)
        #[arg(long)]
        connect: bool,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Show what is mounted or open, the lock, and the last run
    Status {
        #[command(flatten)]
        profile: ProfileArg,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Finish the teardown of a run that was killed (also done by every command first)
    Cleanup {
        #[command(flatten)]
        profile: ProfileArg,
    },
    /// List complete snapshots with their size and the size unique to each
    Snapshots {
        #[command(flatten)]
        profile: ProfileArg,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Mount the container read-only and expose its snapshots at DIR for browsing
    Mount {
        #[command(flatten)]
        profile: ProfileArg,
        dir: std::path::PathBuf,
        /// Accept a DIR that another user could change (see docs/threat-model.md)
        #[arg(long)]
        allow_untrusted_target: bool,
    },
    /// Tear down what `mount` set up
    Umount {
        #[command(flatten)]
        profile: ProfileArg,
    },
    /// Copy a snapshot (or some paths of it) to TARGET, keeping owners, modes, links, ACLs, xattrs
    Restore {
        #[command(flatten)]
        profile: ProfileArg,
        /// A snapshot id (see `snapshots`) or `latest`
        snapshot: String,
        /// Directory to restore into (must be empty unless --force)
        target: std::path::PathBuf,
        /// Restore only this absolute path as it was backed up (repeatable)
        #[arg(long = "path", value_name = "P")]
        paths: Vec<std::path::PathBuf>,
        /// Restore into a non-empty TARGET, overwriting files of the same name
        #[arg(long)]
        force: bool,
        /// Accept a TARGET that another user could change (see docs/threat-model.md)
        #[arg(long)]
        allow_untrusted_target: bool,
        /// Do not check the restored files against the snapshot's manifest (by default every
        /// restored file is hashed and a difference exits 6)
        #[arg(long)]
        no_check: bool,
        /// Also delete what is in TARGET but not in the snapshot, within the restored
        /// --path directories only (a roll-back of a directory; needs --path)
        #[arg(long, requires = "paths")]
        delete: bool,
    },
    /// List the files added (+), removed (-) and changed (M) between two snapshots, from
    /// their manifests (regular files only)
    Diff {
        #[command(flatten)]
        profile: ProfileArg,
        /// The older snapshot (an id, or `latest`)
        a: String,
        /// The newer snapshot (an id, or `latest`)
        b: String,
    },
    /// Find files by a glob across every snapshot (from the manifests): prints the snapshot
    /// id, the size and the path of each match
    Find {
        #[command(flatten)]
        profile: ProfileArg,
        /// A shell glob: with a `/` it matches the whole absolute path (`/home/*/notes.txt`,
        /// `*` crosses `/`), without one only the file name (`*.pdf`)
        pattern: String,
    },
    /// Enlarge the container (never shrinks): SIZE is the new size (3G) or an increase (+1G)
    Grow {
        #[command(flatten)]
        profile: ProfileArg,
        #[arg(long, allow_hyphen_values = true)]
        size: String,
        /// Skip the e2fsck: grow while mounted (default: e2fsck -f unmounted first, then the journaled resize)
        #[arg(long)]
        online: bool,
    },
    /// Check the filesystem (e2fsck, read-only) and the snapshots' content against their manifests
    Verify {
        #[command(flatten)]
        profile: ProfileArg,
        /// Read only this percentage of the files, a different share each day
        #[arg(long, value_name = "PERCENT", default_value_t = 100)]
        read_data: u32,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Print (or --install) a systemd service and timer that run this profile
    Schedule {
        #[command(flatten)]
        profile: ProfileArg,
        /// systemd OnCalendar= expression
        #[arg(long, default_value = "daily")]
        on_calendar: String,
        /// A unit to start when a run fails (OnFailure=)
        #[arg(long, value_name = "UNIT")]
        on_failure: Option<String>,
        /// Write the units to /etc/systemd/system and enable the timer (if systemd runs; else exit 3)
        #[arg(long)]
        install: bool,
        /// Also a second timer for `verify --read-data PERCENT` (units e2ebackup-NAME-verify.*)
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u32).range(1..=100))]
        verify_read_data: Option<u32>,
        /// OnCalendar= expression of the verify timer
        #[arg(long, value_name = "CALENDAR", default_value = "weekly")]
        verify_on_calendar: String,
    },
    /// Key checks and rotation: `keys verify` tests the keyfile, the pinned header and the
    /// escrows; `keys rotate` replaces the keyfile
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Write the keyfile back from the key escrow, with an offline recovery identity
    RecoverKey {
        #[command(flatten)]
        profile: ProfileArg,
        /// age identity file, or an unencrypted SSH private key
        #[arg(long, value_name = "FILE")]
        identity: std::path::PathBuf,
        /// Replace an existing keyfile (kept as .old)
        #[arg(long)]
        force: bool,
    },
    /// Accept a container older than this client's record, or missing snapshots (after restoring the server on purpose); also `accept-loss`
    #[command(visible_alias = "accept-loss")]
    AcceptRollback {
        #[command(flatten)]
        profile: ProfileArg,
        /// Accept it even if `e2fsck -fn` finds the filesystem damaged (or mid-transaction)
        #[arg(long)]
        force: bool,
    },
    /// Give space freed by deleted snapshots back to the server (NBD + fstrim over SSH)
    Trim {
        #[command(flatten)]
        profile: ProfileArg,
    },
    /// Apply the profile's retention rules now; list what is kept (and why) or removed
    Prune {
        #[command(flatten)]
        profile: ProfileArg,
        /// Only show what would be removed
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Write man pages and shell completions into DIR (for packaging; see src/assets.rs)
    #[command(hide = true)]
    GenerateAssets { dir: std::path::PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Test that the keyfile opens the container, the pinned header matches, and the
    /// escrows are intact (and, with --identity, that they hold this keyfile)
    Verify {
        #[command(flatten)]
        profile: ProfileArg,
        /// An offline recovery identity to test against the escrow
        #[arg(long, value_name = "FILE")]
        identity: Option<std::path::PathBuf>,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Write the recovery kit (profile, keyfile, pinned header, SSH key, known_hosts, escrow,
    /// recipients, a README with the restore steps) to an empty directory of mode 0700
    ExportKit {
        #[command(flatten)]
        profile: ProfileArg,
        /// An empty directory (created 0700 if missing), e.g. on a removable disk
        dir: std::path::PathBuf,
    },
    /// Replace the keyfile: a new keyfile and keyslot, the old keyslot removed, the pinned
    /// header, the key escrows and the container's STATE renewed (the volume key stays,
    /// unless --reencrypt)
    Rotate {
        #[command(flatten)]
        profile: ProfileArg,
        /// First give the container a new volume key (LUKS2 re-encryption, offline: every
        /// byte of the container is read from and written back to the server once). It can
        /// be stopped; run it again to go on. Until it has finished, every other command
        /// refuses to open the container (and `status` exits 3)
        #[arg(long)]
        reencrypt: bool,
    },
}

impl Command {
    /// The profile named on the command line (None for `generate-assets`).
    fn profile(&self) -> Option<&str> {
        let t = match self {
            Command::Init { profile }
            | Command::Run { profile, .. }
            | Command::Validate { profile, .. }
            | Command::Status { profile, .. }
            | Command::Cleanup { profile }
            | Command::Snapshots { profile, .. }
            | Command::Mount { profile, .. }
            | Command::Umount { profile }
            | Command::Restore { profile, .. }
            | Command::Prune { profile, .. }
            | Command::Grow { profile, .. }
            | Command::Trim { profile }
            | Command::AcceptRollback { profile, .. }
            | Command::Verify { profile, .. }
            | Command::Schedule { profile, .. }
            | Command::RecoverKey { profile, .. }
            | Command::Keys {
                action:
                    KeysAction::Verify { profile, .. }
                    | KeysAction::ExportKit { profile, .. }
                    | KeysAction::Rotate { profile, .. },
            }
            | Command::Diff { profile, .. }
            | Command::Find { profile, .. } => profile,
            Command::GenerateAssets { .. } => return None,
        };
        Some(&t.name)
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage.into()
            } else {
                Exit::Ok.into()
            };
        }
    };
    crate::logging::set_level(if cli.quiet { -1 } else { cli.verbose as i8 });
    if let Err(e) = crate::signals::install() {
        return ops::fail(e).into();
    }
    if let Command::GenerateAssets { dir } = &cli.command {
        return crate::assets::generate(dir, <Cli as clap::CommandFactory>::command())
            .map_or_else(ops::fail, |()| Exit::Ok)
            .into();
    }
    let Some(name) = cli.command.profile() else {
        return Exit::Usage.into();
    };
    let profile = match Profile::resolve(name) {
        Ok(p) => p,
        Err(e) => return ops::fail(e).into(),
    };
    let code = match &cli.command {
        Command::Init { .. } => ops::init::init(&profile),
        Command::Run { dry_run: true, .. } => ops::run::dry_run::dry_run(&profile),
        Command::Run { allow_shrink, .. } => ops::run::run(&profile, *allow_shrink),
        Command::Validate { connect, json, .. } => {
            ops::maintenance::validate(&profile, *connect, *json)
        }
        Command::Status { json, .. } => ops::status::status(&profile, *json),
        Command::Cleanup { .. } => ops::maintenance::cleanup(&profile),
        Command::Snapshots { json, .. } => ops::restore::list(&profile, *json),
        Command::Mount {
            dir,
            allow_untrusted_target,
            ..
        } => ops::restore::mount_cmd(&profile, dir, *allow_untrusted_target),
        Command::Umount { .. } => ops::restore::umount_cmd(&profile),
        Command::Restore {
            snapshot,
            target,
            paths,
            force,
            allow_untrusted_target,
            no_check,
            delete,
            ..
        } => ops::restore::restore(
            &profile,
            snapshot,
            target,
            paths,
            ops::restore::RestoreOptions {
                force: *force,
                allow_untrusted: *allow_untrusted_target,
                check: !*no_check,
                delete: *delete,
            },
        ),
        Command::Diff { a, b, .. } => ops::history::diff(&profile, a, b),
        Command::Find { pattern, .. } => ops::history::find(&profile, pattern),
        Command::Grow { size, online, .. } => ops::grow::grow(&profile, size, *online),
        Command::Trim { .. } => ops::trim::trim(&profile),
        Command::Schedule {
            on_calendar,
            on_failure,
            install,
            verify_read_data,
            verify_on_calendar,
            ..
        } => ops::schedule::schedule(
            &profile,
            on_calendar,
            on_failure.as_deref(),
            *install,
            verify_read_data.map(|pct| (pct, verify_on_calendar.as_str())),
        ),
        Command::Keys {
            action: KeysAction::Verify { identity, json, .. },
        } => ops::keys::verify(&profile, identity.as_deref(), *json),
        Command::Keys {
            action: KeysAction::ExportKit { dir, .. },
        } => ops::keys::export_kit(&profile, dir),
        Command::Keys {
            action: KeysAction::Rotate { reencrypt, .. },
        } => ops::rotate::rotate(&profile, *reencrypt),
        Command::RecoverKey {
            identity, force, ..
        } => ops::maintenance::recover_key(&profile, identity, *force),
        Command::Verify {
            read_data, json, ..
        } => ops::verify::verify(&profile, *read_data, *json),
        Command::AcceptRollback { force, .. } => ops::prune::accept_rollback(&profile, *force),
        Command::Prune { dry_run, json, .. } => ops::prune::prune(&profile, *dry_run, *json),
        Command::GenerateAssets { .. } => Exit::Usage,
    };
    code.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Man pages and completions come from this parser (src/assets.rs).
    #[test]
    fn writes_man_pages_and_completions() {
        let tmp = tempfile::tempdir().unwrap();
        crate::assets::generate(tmp.path(), Cli::command()).unwrap();
        let read = |p: &str| std::fs::read_to_string(tmp.path().join(p)).unwrap();
        let main = read("man/e2ebackup.1");
        assert!(main.contains(".SH SYNOPSIS"), "{main}");
        for sub in Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
        {
            let name = sub.get_name();
            // roff escapes hyphens: `recover\-key`
            let roff = name.replace('-', "\\-");
            assert!(main.contains(&roff), "e2ebackup.1 does not name `{name}`");
            assert!(!read(&format!("man/e2ebackup-{name}.1")).is_empty());
        }
        let kv = read("man/e2ebackup-keys-verify.1");
        assert!(kv.contains("identity") && kv.contains(env!("CARGO_PKG_VERSION")));
        // The hidden generator itself stays out of the pages and the completions.
        assert!(!tmp.path().join("man/e2ebackup-generate-assets.1").exists());
        assert!(!main.contains("generate"));
        for (_, file) in crate::assets::COMPLETIONS {
            let text = read(&format!("completions/{file}"));
            assert!(text.contains("restore"), "{file}");
            assert!(!text.contains("generate-assets"), "{file}");
        }
    }
}
