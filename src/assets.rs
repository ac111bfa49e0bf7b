//! Man pages and shell completions, generated from the clap definition in [`crate::cli`]
//! (so they never drift from `--help`). Run by packaging (`scripts/build-deb.sh`) through the
//! hidden `e2ebackup generate-assets DIR` command; not something users call.
//!
//! Writes `DIR/man/e2ebackup.1`, one page per subcommand (`e2ebackup-run.1`,
//! `e2ebackup-keys-verify.1`, ...), and `DIR/completions/{e2ebackup.bash,_e2ebackup,e2ebackup.fish}`.

use std::path::Path;

use anyhow::{Context, Result};
use clap_complete::Shell;

/// Completion files, named as bash-completion, zsh and fish look them up.
pub const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "e2ebackup.bash"),
    (Shell::Zsh, "_e2ebackup"),
    (Shell::Fish, "e2ebackup.fish"),
];

/// Generate every man page and completion file under `dir` (created if missing).
pub fn generate(dir: &Path, cli: clap::Command) -> Result<()> {
    let man = dir.join("man");
    let comp = dir.join("completions");
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // Built first, as clap_mangen::generate_to does: that names the subcommand pages
    // `e2ebackup-run` and so on.
    let mut cmd = cli.clone().disable_help_subcommand(true);
    cmd.build();
    man_pages(&cmd, &man).with_context(|| format!("writing man pages to {}", man.display()))?;
    let mut visible = visible(&cli);
    for (shell, name) in COMPLETIONS {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut visible, "e2ebackup", &mut out);
        let path = comp.join(name);
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One page for `cmd` and each visible subcommand, every page footed with the version
/// (clap_mangen puts it only on the main page).
fn man_pages(cmd: &clap::Command, dir: &Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, dir)?;
    }
    clap_mangen::Man::new(cmd.clone())
        .source(concat!("e2ebackup ", env!("CARGO_PKG_VERSION")))
        .manual("e2ebackup manual")
        .generate_to(dir)?;
    Ok(())
}

/// `cmd` without its hidden subcommands: clap_complete would offer them (it only skips
/// hidden arguments), and clap cannot remove a subcommand, so the top level is rebuilt.
fn visible(cmd: &clap::Command) -> clap::Command {
    let mut out = clap::Command::new("e2ebackup")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(cmd.is_subcommand_required_set());
    if let Some(a) = cmd.get_about() {
        out = out.about(a.clone());
    }
    for a in cmd.get_arguments() {
        out = out.arg(a.clone());
    }
    for s in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        out = out.subcommand(s.clone());
    }
    out
}
