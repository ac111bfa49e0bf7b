//! `e2ebackup init PROFILE`: create the container once.
//!
//! Order matters for "bad input changes nothing": every check that can fail for a reason
//! the user must fix (profile, host key, server directory, existing container, existing
//! header backup, free space) runs before anything is created. The container is built
//! under a temporary name and renamed only when it is complete and closed, so a failed or
//! interrupted init leaves no half-made container that a later run could mistake for one.

use anyhow::{Context, Result};

use crate::error::{usage, Exit};
use crate::ops::finish;
use crate::profile::{Profile, Size};
use crate::session::Session;
use crate::stack::{ext4, luks, mount};
use crate::state::{self, LastRun};
use crate::{info, warn};

pub fn init(p: &Profile) -> Exit {
    let started = super::now();
    let mut s = match Session::begin(p, "init") {
        Ok(s) => s,
        Err(e) => return super::fail(e),
    };
    let result = work(p, &mut s);
    let (code, complete) = finish(s, &result);
    state::record_last_run(
        p,
        &LastRun {
            command: "init".into(),
            started,
            finished: super::now(),
            exit_code: code as i32,
            result: state::result_word(code).into(),
            error: result.as_ref().err().map(|e| format!("{e:#}")),
            snapshot: None,
            teardown_complete: complete,
            files_transferred: None,
            bytes_transferred: None,
            ..Default::default()
        },
    );
    if code == Exit::Ok {
        info!(
            "container {} created on {}; keep {} and {} safe (without the keyfile the data is lost)",
            p.remote_container(),
            p.server.host,
            p.container.keyfile.0.display(),
            p.header_backup().display()
        );
    }
    code
}

fn work(p: &Profile, s: &mut Session<'_>) -> Result<Exit> {
    let facts = s.connect()?.clone();
    if facts.container_size.is_some() {
        return Err(usage(format!(
            "{} already exists on {}; refusing to overwrite it",
            p.remote_container(),
            p.server.host
        )));
    }
    let header = p.header_backup();
    if header.exists() {
        return Err(usage(format!(
            "a LUKS header backup already exists at {}: it belongs to an existing container. \
             Move it away (and keep it) before creating a new container.",
            header.display()
        )));
    }
    let inodes = p.inode_count();
    let need = ext4::estimate_init_bytes(p.container.size.0, inodes);
    let journal = ext4::chosen_journal_bytes(p.container.size.0 - luks::HEADER_BYTES);
    match facts.free_bytes {
        Some(free) if free < need + journal + (64 << 20) => {
            return Err(anyhow::anyhow!(
                "{}:{} has {} free; init writes about {} (LUKS header, inode tables), the first \
                 runs {} more (the ext4 journal), and it wants 64M more to spare: free space \
                 there, or pick another server.path",
                p.server.host,
                p.server.path,
                Size(free),
                Size(need),
                Size(journal)
            ))
        }
        Some(free) if free < p.container.size.0 => warn!(
            "the server has {} free, less than the container's size {}: the sparse file can fill the server's disk",
            Size(free),
            p.container.size
        ),
        Some(free) => info!(
            "{}:{} has {} free; init writes about {}",
            p.server.host,
            p.server.path,
            Size(free),
            Size(need)
        ),
        None => warn!(
            "cannot tell the free space on {} (its SFTP server offers no statvfs@openssh.com); continuing",
            p.server.host
        ),
    }

    // The server directory is mounted and every name checked (a planted link is exit 6)
    // before the first thing is created, here or there.
    s.mount_server("init")?;
    let keyfile = &p.container.keyfile.0;
    if keyfile.exists() {
        info!("using the existing keyfile {}", keyfile.display());
        s.read_key()?;
    } else {
        info!(
            "creating keyfile {} (4096 random bytes, mode 0400)",
            keyfile.display()
        );
        s.use_key(luks::create_keyfile(keyfile)?);
    }

    let final_path = s.container_path();
    let partial_name = p.init_partial_name();
    info!(
        "creating sparse container {} ({})",
        p.remote_container(),
        p.container.size
    );
    // O_EXCL beneath the server directory, never following a link (fsutil::ServerDir);
    // removed again unless it is renamed to the container's name below.
    s.create_partial(&partial_name, p.container.size.0)?;
    let mark = s.mark();
    // The header is made here on the client and pinned before the server sees it; then it
    // is written to the server, and what the server has is checked against the pinned copy
    // at the open below (never the reverse: no byte read back from the server is pinned).
    info!("formatting LUKS2 on this client (aes-xts-plain64, 4096-byte sectors, keyfile slot with PBKDF2)");
    crate::signals::check()?;
    let header_tmp = header.with_file_name(format!(
        "{}.new",
        header.file_name().unwrap_or_default().to_string_lossy()
    ));
    let header_img = header.with_file_name(format!(
        "{}.format",
        header.file_name().unwrap_or_default().to_string_lossy()
    ));
    if let Some(dir) = header.parent() {
        crate::fsutil::secret_dir(dir)?;
    }
    let _ = std::fs::remove_file(&header_tmp);
    let _ = std::fs::remove_file(&header_img);
    luks::format_on_client(&header_img, &header_tmp, s.key()?)?;
    s.pin_header_at(header_tmp.clone());
    {
        use std::os::unix::fs::FileExt;
        let bytes = luks::pinned_bytes(&header_tmp)?;
        let f = s.server_dir()?.open_file(&partial_name, false)?;
        f.write_all_at(&bytes, 0)
            .and_then(|()| f.sync_all())
            .with_context(|| {
                format!(
                    "writing the LUKS2 header to {}",
                    s.container_path().display()
                )
            })?;
    }
    s.attach(&partial_name, false)?;
    let mapper = s.unlock(false, false)?;
    info!(
        "creating ext4 ({inodes} inodes written now; a {} journal, allocated as runs write it)",
        Size(journal)
    );
    ext4::mkfs(
        &mapper,
        &format!("e2eb-{}", &p.name.chars().take(11).collect::<String>()),
        inodes,
        journal,
    )?;
    let root = s.mount_fs(false)?;
    crate::snapshots::create_layout(&root)?;
    crate::generation::commit(p, &root, s.key()?, 0, &[])?;
    mount::syncfs(&root)?;
    s.close_to(mark)
        .context("could not close the new container cleanly; it was not committed")?;
    if !p.container.recovery_recipients.is_empty() {
        let rs: Vec<String> = p
            .container
            .recovery_recipients
            .iter()
            .map(|r| r.0.clone())
            .collect();
        let sealed = crate::escrow::seal(s.key()?, &rs)?;
        s.server_dir()?.replace(&p.escrow_server_name(), &sealed)?;
        crate::fsutil::write_atomic(&p.escrow_client(), &sealed)?;
        info!(
            "key escrow for {} recipient(s) stored as {} on the server and {} here",
            rs.len(),
            p.escrow_server_name(),
            p.escrow_client().display()
        );
    }
    // The pinned header first: once the container has its final name, every later command
    // checks the server's header against the client's copy, so that copy must exist by then.
    // A crash in between leaves a header and no container; a new `init` then says so.
    std::fs::rename(&header_tmp, &header)
        .with_context(|| format!("renaming {} to {}", header_tmp.display(), header.display()))?;
    if let Some(dir) = header.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all())?;
    }
    s.server_dir()?
        .rename(&partial_name, &p.container.file.0)
        .with_context(|| format!("committing {}", final_path.display()))?;
    Ok(Exit::Ok)
}
