//! `e2ebackup keys verify PROFILE [--identity FILE]`: will the keys still open the backup?
//!
//! Checked, without mounting anything: the keyfile unlocks the container's keyslot (a LUKS
//! test activation, no mapping is created), the client's pinned header matches the server's,
//! the server's and the client's key escrows are identical, and with `--identity`, that the
//! escrow decrypts to exactly this keyfile. Run it after changing recipients or moving keys,
//! and now and then from the timer: a key that no longer works is found before it is needed.

use std::path::Path;

use anyhow::{Context, Result};

use crate::error::{Exit, Failure};
use crate::ops::{fail_ref, finish, CheckReport};
use crate::profile::Profile;
use crate::session::Session;
use crate::stack::luks;
use crate::{info, warn};

pub fn verify(p: &Profile, identity: Option<&Path>, json: bool) -> Exit {
    let mut rep = CheckReport::new(p, "keys verify");
    let mut s = match Session::begin(p, "keys-verify") {
        Ok(s) => s,
        Err(e) => return rep.conclude(fail_ref(&e), Some(&e), json),
    };
    let r = work(p, &mut s, identity, &mut rep.problems);
    let code = finish(s, &r).0;
    rep.conclude(code, r.as_ref().err(), json)
}

fn work(
    p: &Profile,
    s: &mut Session<'_>,
    identity: Option<&Path>,
    problems: &mut Vec<String>,
) -> Result<Exit> {
    s.read_key()?;
    let facts = s.connect()?.clone();
    if facts.container_size.is_none() {
        return Err(crate::error::usage(format!(
            "no container {}",
            p.remote_container()
        )));
    }
    s.mount_server("keys-verify")?;
    let dev = s.attach(&p.container.file.0, true)?;
    let header = s.pinned_header()?;
    match &header {
        Some(h) => info!("pinned header {} matches the server's", h.display()),
        None => problems.push(format!(
            "no pinned header at {}",
            p.header_backup().display()
        )),
    }
    // A test activation: the keyslot is decrypted, no device-mapper mapping is created.
    let key = s.key()?;
    match luks::keyslot_for(&dev, header.as_deref(), key) {
        Ok(slot) => info!(
            "keyfile {} opens keyslot {slot}",
            p.container.keyfile.0.display()
        ),
        Err(e) => problems.push(format!("{e:#}")),
    }
    if !p.container.recovery_recipients.is_empty() {
        let server = s
            .server_dir()?
            .read_bounded(&p.escrow_server_name(), crate::escrow::MAX_BYTES)
            .and_then(|o| o.context("not there"));
        let client =
            crate::fsutil::read_local_bounded(&p.escrow_client(), crate::escrow::MAX_BYTES)
                .map(|(b, _)| b);
        match (&server, &client) {
            (Ok(a), Ok(b)) if a == b => {
                info!("the server's and the client's key escrows are identical")
            }
            (Ok(_), Ok(_)) => {
                problems.push("the server's and the client's key escrows differ".into())
            }
            (Err(e), _) => problems.push(format!("no key escrow on the server: {e:#}")),
            (_, Err(e)) => problems.push(format!(
                "no key escrow at {}: {e}",
                p.escrow_client().display()
            )),
        }
        // The client's own copy first: the server could hand over an escrow of its own
        // making (it may hold the recovery public key too).
        if let (Some(id), Ok(sealed)) = (identity, client.as_ref().or(server.as_ref())) {
            match crate::escrow::open(sealed, id) {
                Ok(k) if k.bytes() == key.bytes() => {
                    info!(
                        "{} opens the escrow, and it holds this keyfile",
                        id.display()
                    )
                }
                Ok(_) => problems.push("the escrow holds a DIFFERENT key than the keyfile".into()),
                Err(e) => problems.push(format!("{e:#}")),
            }
        } else if identity.is_none() {
            info!("pass --identity FILE to also test that a recovery identity opens the escrow");
        }
    } else {
        warn!("no recovery_recipients: losing the keyfile would lose every backup");
    }
    if problems.is_empty() {
        info!("keys verify: all good");
        return Ok(Exit::Ok);
    }
    for pr in problems.iter() {
        crate::logging::emit(-2, "PROBLEM: ", format_args!("{pr}"));
    }
    Err(Failure::Security(format!("keys verify found {} problem(s)", problems.len())).into())
}
