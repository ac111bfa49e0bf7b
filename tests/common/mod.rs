//! Test fixture: a private sshd on 127.0.0.1 (its own host key, a client key, a server
//! directory), and profiles pointing at it. Needs root (sshd privilege separation, and the
//! tests that use it attach loop devices and mount). Dropped = sshd killed, files removed.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Print why a privileged test does nothing here (CI runs as root, so it runs there).
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() && Path::new("/usr/sbin/sshd").exists() {
        return false;
    }
    eprintln!("skipping {test}: needs root and openssh-server");
    true
}

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

fn keygen(path: &Path, comment: &str) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

impl Sshd {
    pub fn start() -> Sshd {
        let dir = tempfile::Builder::new()
            .prefix("e2eb-sshd")
            .tempdir()
            .unwrap();
        let d = dir.path();
        std::fs::create_dir_all("/run/sshd").unwrap();
        keygen(&d.join("host_key"), "test-host");
        keygen(&d.join("client_key"), "test-client");
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        std::fs::create_dir(d.join("server")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n\
             AllowTcpForwarding local\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), cfg).unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let key = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        let mut f = std::fs::File::create(d.join("known_hosts")).unwrap();
        let kt: Vec<&str> = key.split_whitespace().take(2).collect();
        writeln!(f, "[127.0.0.1]:{port} {} {}", kt[0], kt[1]).unwrap();
        Sshd { dir, port, child }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn server_dir(&self) -> PathBuf {
        self.path("server")
    }

    /// Write `<name>.yaml` for this server and return its path.
    pub fn profile(&self, name: &str, sources: &[&Path]) -> PathBuf {
        let srcs: Vec<String> = sources.iter().map(|s| s.display().to_string()).collect();
        let text = format!(
            "server:\n  host: 127.0.0.1\n  port: {port}\n  user: root\n  identity_file: {d}/client_key\n  \
             known_hosts: {d}/known_hosts\n  path: {d}/server\ncontainer:\n  file: test.luks\n  size: 256M\n  \
             keyfile: {d}/keys/test.key\nbackup:\n  sources: [{srcs}]\n",
            port = self.port,
            d = self.dir.path().display(),
            srcs = srcs.join(", ")
        );
        let p = self.path(&format!("{name}.yaml"));
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
