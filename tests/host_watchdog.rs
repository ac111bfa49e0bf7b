//! The I/O watchdog against a real hung server (issue 14), on the host: sshd on 127.0.0.1
//! with the external sftp-server, sshfs, a direct-I/O loop device over the container file.
//! The sftp-server is stopped with SIGSTOP while a read through the loop device is pending
//! (sshd keeps answering keepalives); the watchdog must abort the connection so the read
//! fails, and the ordinary teardown must then complete.
//!
//! Privileged (root): run with `--test-threads=1`.

mod common;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Recover, Sshd};
use e2ebackup::stack::{loopdev, mount, sshfs};
use e2ebackup::teardown::Stack;
use e2ebackup::watchdog::Watchdog;

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()
}

/// sftp-server processes descended from `ancestor` (our sshd).
fn sftp_servers_under(ancestor: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() != "sftp-server" {
            continue;
        }
        let mut p = pid;
        while let Some(pp) = ppid(p) {
            if pp == ancestor {
                v.push(pid);
                break;
            }
            if pp <= 1 {
                break;
            }
            p = pp;
        }
    }
    v
}

fn signal(pids: &[u32], sig: nix::sys::signal::Signal) {
    for p in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p as i32), sig);
    }
}

#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_watchdog_aborts_a_hung_sftp_server() {
    let sshd = Sshd::start_external_sftp();
    let p = sshd.load_profile("hung", &[Path::new("/nonexistent")]);
    let work = common::private_tempdir();
    let journal = work.path().join("undo.json");
    let _guard = Recover::new(&journal);
    let mut stack = Stack::persistent(journal.clone(), "test").unwrap();

    // The container, written on the "server" directly: 16 MiB of data.
    let file = sshd.server_dir().join("test.luks");
    std::fs::write(&file, vec![7u8; 16 << 20]).unwrap();

    let mnt = work.path().join("server");
    let daemon =
        sshfs::mount(&mut stack, &p.server, &mnt).unwrap_or_else(|e| panic!("sshfs mount: {e:#}"));
    let backing = mnt.join("test.luks");
    let f = e2ebackup::fsutil::ServerDir::open(&mnt, "server")
        .and_then(|d| d.open_file("test.luks", true))
        .unwrap_or_else(|e| panic!("open: {e:#}"));
    let l =
        loopdev::attach(&mut stack, &f, &backing, true).unwrap_or_else(|e| panic!("attach: {e:#}"));
    drop(f);
    let dev = l.device.clone();

    let limit = Duration::from_secs(4);
    let wd = Watchdog::start("127.0.0.1", &mnt, Some(daemon), &backing, limit);
    let dio = |offset: u64| -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev)?;
        let mut buf = vec![0u8; 8192];
        // O_DIRECT needs an aligned buffer: use an aligned window of a larger one.
        let off = buf.as_ptr().align_offset(4096);
        f.read_exact_at(&mut buf[off..off + 4096], offset)
    };
    dio(0).expect("a read through the healthy stack");

    let sftp = sftp_servers_under(sshd.pid());
    assert!(!sftp.is_empty(), "no sftp-server process under sshd");
    signal(&sftp, nix::sys::signal::Signal::SIGSTOP);
    let stopped = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = {
        let dio_dev = dev.clone();
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&dio_dev);
            let r = f.and_then(|f| {
                let mut buf = vec![0u8; 8192];
                let off = buf.as_ptr().align_offset(4096);
                f.read_exact_at(&mut buf[off..off + 4096], 8 << 20)
            });
            let _ = tx.send(r.map_err(|e| e.to_string()));
        })
    };
    let outcome = rx.recv_timeout(limit + Duration::from_secs(30));
    let waited = stopped.elapsed();
    // Whatever happened: let the server go again.
    signal(&sftp, nix::sys::signal::Signal::SIGCONT);
    signal(&sftp, nix::sys::signal::Signal::SIGTERM);
    let pending = e2ebackup::signals::pending();
    wd.stop();
    e2ebackup::signals::disarm();
    let outcome = outcome.unwrap_or_else(|_| {
        panic!(
            "the read through the hung server did not return within {} s",
            waited.as_secs()
        )
    });
    reader.join().unwrap();
    eprintln!(
        "read after SIGSTOP returned after {:.1} s: {outcome:?}",
        waited.as_secs_f64()
    );
    assert!(outcome.is_err(), "the read should fail after the abort");
    assert!(
        waited >= limit && waited < limit + Duration::from_secs(10),
        "aborted after {:.1} s, limit {} s",
        waited.as_secs_f64(),
        limit.as_secs()
    );
    assert_eq!(pending, Some("time-out"), "the main thread was not told");

    // The ordinary teardown completes after the abort.
    drop(l);
    let r = stack.unwind(&mut e2ebackup::stack::Real);
    assert!(r.complete(), "teardown after the abort: {:?}", r.failed);
    assert_eq!(
        mount::mounted_at(&mnt).unwrap(),
        None,
        "sshfs still mounted"
    );
    assert_eq!(loopdev::backing_file(&dev), None, "loop device attached");
    assert_eq!(sshfs::sshfs_process_for(&mnt), None, "sshfs still running");
}

/// `server.run_timeout` ends a command that outlives it as SIGTERM would (here a `before`
/// hook that sleeps, so that no LUKS is needed), with exit 1 and a message naming the key;
/// the `failed` hook afterwards is not cut short by the spent deadline.
#[test]
#[ignore = "needs root (sshd on 127.0.0.1, sshfs, loop devices); run as root with --include-ignored, as CI does"]
fn host_run_timeout_stops_the_command() {
    let sshd = Sshd::start();
    let name = "deadline";
    let path = sshd.profile(name, &[Path::new("/nonexistent")]);
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("  timeout: 10\n", "  timeout: 10\n  run_timeout: 2s\n")
        + "hooks:\n  before: sleep 30\n  failed: echo failed-hook-ran\n";
    std::fs::write(&path, text).unwrap();
    let _clean = common::RemoveOnDrop(vec![
        Path::new(e2ebackup::layout::RUN_DIR).join(name),
        Path::new(e2ebackup::layout::STATE_DIR).join(name),
        e2ebackup::layout::local_lock_path(name),
    ]);
    let t = Instant::now();
    let out = common::bin().arg("run").arg(&path).output().unwrap();
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", common::show(&out));
    assert!(err.contains("server.run_timeout (2s)"), "{err}");
    assert!(err.contains("failed-hook-ran"), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
}
