//! The profile's hooks: shell commands run around `run` (before, after, failed, finally).
//!
//! Semantics follow borgmatic's, which administrators of this kind of tool already know:
//! - `before` runs once the local lock is held and before anything else is touched; exit 75
//!   (EX_TEMPFAIL, "target unavailable") skips the run without an error, any other failure
//!   fails the run. Commands of one hook run in order; `before` and `after` stop at the first
//!   failure, `failed` and `finally` run every command (they report, they do not decide).
//! - `after` runs after a successful run and its teardown, `failed` after a failed one, then
//!   `finally` always, last. Hooks therefore never see a mounted container.
//!
//! Every command runs as `sh -c CMD` in `/` through [`Cmd::run_in_group`]: stdin from
//! /dev/null, its output on our stderr (so it lands in the same mail or journal as ours), in
//! its own process group (a timeout kills the whole group), and with the context in
//! `E2EBACKUP_*` variables.

use std::os::unix::process::ExitStatusExt;

use anyhow::{Context, Result};

use crate::cmd::{Cmd, Ended};
use crate::error::Exit;
use crate::profile::{Commands, Profile};
use crate::{info, warn};

/// Exit status of a `before` command that means "target unavailable: skip this run".
pub const SKIP: i32 = 75;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Before,
    After,
    Failed,
    Finally,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Before => "before",
            Stage::After => "after",
            Stage::Failed => "failed",
            Stage::Finally => "finally",
        }
    }

    fn commands(self, p: &Profile) -> &Commands {
        match self {
            Stage::Before => &p.hooks.before,
            Stage::After => &p.hooks.after,
            Stage::Failed => &p.hooks.failed,
            Stage::Finally => &p.hooks.finally,
        }
    }

    /// Whether a failing command stops the remaining commands of this hook.
    fn stops_at_failure(self) -> bool {
        matches!(self, Stage::Before | Stage::After)
    }
}

/// What the hooks are told about the run (empty for `before`).
#[derive(Debug, Clone, Default)]
pub struct RunContext {
    pub snapshot: Option<String>,
    pub exit: Option<Exit>,
    pub result: Option<String>,
    pub error: Option<String>,
    /// How many source files the run could not read, and the file that lists them.
    pub unread: Option<(usize, std::path::PathBuf)>,
}

/// How a `before` hook ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Before {
    Proceed,
    /// A command exited 75: the run is skipped, successfully.
    Skip {
        command: String,
    },
}

/// Run the `before` hook.
pub fn before(p: &Profile) -> Result<Before> {
    match run_stage(p, Stage::Before, &RunContext::default()) {
        Ok(()) => Ok(Before::Proceed),
        Err(e) => match e.downcast_ref::<HookFailed>() {
            Some(f) if f.code == Some(SKIP) => Ok(Before::Skip {
                command: f.command.clone(),
            }),
            _ => Err(e),
        },
    }
}

/// A hook command that did not succeed.
#[derive(Debug, thiserror::Error)]
#[error("{stage} hook `{command}` {how}")]
pub struct HookFailed {
    pub stage: &'static str,
    pub command: String,
    pub code: Option<i32>,
    how: String,
}

/// Run every command of one hook with the run's context. The first error (for `before` and
/// `after`, the one that stopped the hook) is returned; `failed` and `finally` go on after a
/// failing command.
pub fn run_stage(p: &Profile, stage: Stage, ctx: &RunContext) -> Result<()> {
    let mut first_err = None;
    for cmd in &stage.commands(p).0 {
        info!("{} hook: {cmd}", stage.name());
        if let Err(e) = run_one(p, stage, ctx, cmd) {
            if e.downcast_ref::<crate::error::Failure>().is_some() || stage.stops_at_failure() {
                return Err(e);
            }
            warn!("{e:#}");
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn env_for(p: &Profile, stage: Stage, ctx: &RunContext) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("E2EBACKUP_PROFILE", p.name.clone()),
        (
            "E2EBACKUP_PROFILE_FILE",
            // Absolute: hooks run in `/`.
            std::path::absolute(&p.source_file)
                .unwrap_or_else(|_| p.source_file.clone())
                .display()
                .to_string(),
        ),
        ("E2EBACKUP_HOOK", stage.name().to_string()),
        // cron and systemd give hooks a minimal PATH; give them the standard one.
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
    ];
    if let Some(s) = &ctx.snapshot {
        env.push(("E2EBACKUP_SNAPSHOT", s.clone()));
    }
    if let Some(x) = ctx.exit {
        env.push(("E2EBACKUP_EXIT_CODE", (x as i32).to_string()));
    }
    if let Some(r) = &ctx.result {
        env.push(("E2EBACKUP_RESULT", r.clone()));
    }
    if let Some(e) = &ctx.error {
        env.push(("E2EBACKUP_ERROR", e.clone()));
    }
    if let Some((n, list)) = &ctx.unread {
        env.push(("E2EBACKUP_UNREAD_FILES", n.to_string()));
        env.push(("E2EBACKUP_UNREAD_LIST", list.display().to_string()));
    }
    env
}

fn run_one(p: &Profile, stage: Stage, ctx: &RunContext, cmd: &str) -> Result<()> {
    let mut c = Cmd::new("sh")?.arg("-c").arg(cmd).current_dir("/");
    for (k, v) in env_for(p, stage, ctx) {
        c = c.env(k, v);
    }
    let status = match c
        .run_in_group(p.hooks.timeout.std())
        .with_context(|| format!("the {} hook `{cmd}`", stage.name()))?
    {
        Ended::Exited(st) => st,
        Ended::TimedOut => {
            return Err(HookFailed {
                stage: stage.name(),
                command: cmd.to_string(),
                code: None,
                how: format!("timed out after {} and was killed", p.hooks.timeout),
            }
            .into())
        }
    };
    if status.success() {
        return Ok(());
    }
    let how = match (status.code(), status.signal()) {
        (Some(c), _) => format!("failed with exit status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "failed".to_string(),
    };
    Err(HookFailed {
        stage: stage.name(),
        command: cmd.to_string(),
        code: status.code(),
        how,
    }
    .into())
}

/// The hooks that follow a run: `after` or `failed`, then `finally`. Returns the exit
/// status to report: a failing `after` or `finally` hook turns success into 3 (the snapshot is
/// committed, but something the administrator asked for did not happen).
pub fn after_run(p: &Profile, code: Exit, ctx: &RunContext) -> Exit {
    let mut code = code;
    let ctx = RunContext {
        exit: Some(code),
        ..ctx.clone()
    };
    let succeeded = matches!(code, Exit::Ok | Exit::Warnings);
    let stage = if succeeded {
        Stage::After
    } else {
        Stage::Failed
    };
    if let Err(e) = run_stage(p, stage, &ctx) {
        warn!("{e:#}");
        if code == Exit::Ok {
            code = Exit::Warnings;
        }
    }
    // A failing `after` hook turned success into warnings: `finally` sees the new verdict.
    let result = if ctx.exit == Some(code) {
        ctx.result.clone()
    } else {
        Some(crate::state::result_word(code).to_string())
    };
    let ctx = RunContext {
        exit: Some(code),
        result,
        ..ctx
    };
    if let Err(e) = run_stage(p, Stage::Finally, &ctx) {
        warn!("{e:#}");
        if code == Exit::Ok {
            code = Exit::Warnings;
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(hooks: &str, dir: &std::path::Path) -> Profile {
        let text = format!(
            "server:\n  host: 127.0.0.1\n  user: u\n  identity_file: /k\n  known_hosts: /kh\n  path: /srv\n\
             container:\n  file: c.luks\n  size: 1G\n  keyfile: /key\n\
             backup:\n  sources: [/etc]\nhooks:\n{hooks}"
        );
        Profile::parse(&dir.join("hooked.yaml"), &text).unwrap()
    }

    #[test]
    fn unread_files_are_in_the_environment() {
        let d = tempfile::tempdir().unwrap();
        let p = profile("", d.path());
        let ctx = RunContext {
            unread: Some((2, d.path().join("unread-files"))),
            ..Default::default()
        };
        let env = env_for(&p, Stage::After, &ctx);
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("E2EBACKUP_UNREAD_FILES").as_deref(), Some("2"));
        assert_eq!(
            get("E2EBACKUP_UNREAD_LIST"),
            Some(d.path().join("unread-files").display().to_string())
        );
        let env = env_for(&p, Stage::After, &RunContext::default());
        assert!(!env.iter().any(|(n, _)| n.starts_with("E2EBACKUP_UNREAD")));
    }

    fn log_cmd(log: &std::path::Path) -> String {
        format!(
            "echo \"$E2EBACKUP_HOOK profile=$E2EBACKUP_PROFILE snap=${{E2EBACKUP_SNAPSHOT-}} \
             exit=${{E2EBACKUP_EXIT_CODE-}} result=${{E2EBACKUP_RESULT-}} err=${{E2EBACKUP_ERROR-}}\" >> {}",
            log.display()
        )
    }

    fn hooks_yaml(log: &std::path::Path, extra_before: &str, after: &str) -> String {
        let l = log_cmd(log);
        format!(
            "  before:\n    - '{l}'\n{extra_before}  after: ['{l}', '{after}']\n  failed: '{l}'\n  \
             finally: ['false', '{l}']\n  timeout: 5s\n"
        )
    }

    fn lines(log: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn success_fires_before_after_finally_in_order_with_environment() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let p = profile(&hooks_yaml(&log, "", "true"), d.path());
        assert_eq!(before(&p).unwrap(), Before::Proceed);
        let ctx = RunContext {
            snapshot: Some("2026-11-23T010203Z".into()),
            result: Some("success".into()),
            ..Default::default()
        };
        // `finally` has a failing `false` first: it still runs the next command, and the
        // successful run is reported as "with warnings".
        assert_eq!(after_run(&p, Exit::Ok, &ctx), Exit::Warnings);
        assert_eq!(
            lines(&log),
            [
                "before profile=hooked snap= exit= result= err=",
                "after profile=hooked snap=2026-11-23T010203Z exit=0 result=success err=",
                "finally profile=hooked snap=2026-11-23T010203Z exit=0 result=success err=",
            ]
        );
    }

    #[test]
    fn failure_fires_failed_then_finally_with_the_error() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let p = profile(&hooks_yaml(&log, "", "true"), d.path());
        let ctx = RunContext {
            result: Some("failed".into()),
            error: Some("rsync failed".into()),
            ..Default::default()
        };
        assert_eq!(after_run(&p, Exit::Failed, &ctx), Exit::Failed);
        assert_eq!(
            lines(&log),
            [
                "failed profile=hooked snap= exit=1 result=failed err=rsync failed",
                "finally profile=hooked snap= exit=1 result=failed err=rsync failed",
            ]
        );
    }

    #[test]
    fn before_exit_75_skips_and_other_failures_stop_the_hook() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let p = profile(
            &hooks_yaml(&log, "    - 'exit 75'\n    - 'touch never'\n", "true"),
            d.path(),
        );
        assert_eq!(
            before(&p).unwrap(),
            Before::Skip {
                command: "exit 75".into()
            }
        );
        assert!(!std::path::Path::new("/never").exists());
        let p = profile(&hooks_yaml(&log, "    - 'exit 3'\n", "true"), d.path());
        let e = format!("{:#}", before(&p).unwrap_err());
        assert!(
            e.contains("before hook `exit 3` failed with exit status 3"),
            "{e}"
        );
        // A failing `after` command stops the rest of `after` and turns success into 3.
        let p = profile(&hooks_yaml(&log, "", "exit 9"), d.path());
        std::fs::remove_file(&log).unwrap();
        let ctx = RunContext {
            result: Some("success".into()),
            ..Default::default()
        };
        assert_eq!(after_run(&p, Exit::Ok, &ctx), Exit::Warnings);
        // ... and `finally` sees the new exit code and verdict.
        assert_eq!(
            lines(&log),
            [
                "after profile=hooked snap= exit=0 result=success err=",
                "finally profile=hooked snap= exit=3 result=success with warnings err=",
            ]
        );
    }

    #[test]
    fn a_hook_that_hangs_is_killed_with_its_children() {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pid");
        let p = profile(
            &format!(
                "  before: 'sleep 300 & echo $! > {}; wait'\n  timeout: 1\n",
                pidfile.display()
            ),
            d.path(),
        );
        let e = format!("{:#}", before(&p).unwrap_err());
        assert!(e.contains("timed out after 1s"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background `sleep` was in the hook's process group: it is gone (or a zombie
        // about to be reaped by init), not left running.
        let running = || {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            state
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next())
                .is_some_and(|s| s != "Z")
        };
        // SIGKILL is delivered asynchronously: give the kernel a moment.
        for _ in 0..100 {
            if !running() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!running(), "hook child {pid} still running");
    }
}
