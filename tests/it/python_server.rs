//! The independent servers of the unkind tests: Python scripts in `tests/fixtures`
//! (Python's ssl, asyncio and h2, not our emulator). Each serves TLS with the certificate
//! and key it is given, prints `PORT n` once it listens, then a line per event, and may
//! read commands on its stdin.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use pgpushd_emulator::tls::CertificateAuthority;

use crate::support::skip_without;

/// Whether python3 can import `modules` (`"h2, ssl"`); a skip (a failure under
/// `CI=true`) naming `what` when not.
pub fn python_has(modules: &str, what: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_without(what);
    }
    ok
}

/// Whether python3 has Python's h2 (and the standard library's ssl and asyncio).
pub fn python_h2() -> bool {
    python_has(
        "h2, ssl, asyncio",
        "python3 with Python's h2 package (pip install h2)",
    )
}

/// A running fixture server; killed when dropped. Its lines are collected as they come.
pub struct PythonServer {
    child: Child,
    pub stdin: ChildStdin,
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl PythonServer {
    /// Starts `tests/fixtures/{script}` serving `{stem}.pem` and `{stem}.key` of `dir`,
    /// with `args`; returns once it said its port.
    pub fn start(script: &str, dir: &Path, stem: &str, args: &[&str]) -> PythonServer {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(script);
        let mut child = Command::new("python3")
            .arg(&fixture)
            .arg("--cert")
            .arg(dir.join(format!("{stem}.pem")))
            .arg("--key")
            .arg(dir.join(format!("{stem}.key")))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = out.next().and_then(Result::ok).unwrap_or_default();
        let Some(port) = first.strip_prefix("PORT ").and_then(|p| p.parse().ok()) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{script} said {first:?} instead of its port");
        };
        let lines = Arc::new(Mutex::new(Vec::new()));
        std::thread::spawn({
            let lines = lines.clone();
            move || {
                for line in out.map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            }
        });
        PythonServer {
            child,
            stdin,
            port,
            lines,
        }
    }

    /// Every line it printed after its port, so far.
    pub fn lines(&self) -> MutexGuard<'_, Vec<String>> {
        self.lines.lock().unwrap()
    }

    pub fn said(&self, what: impl Fn(&str) -> bool) -> bool {
        self.lines().iter().any(|l| what(l))
    }

    /// Its lines that start with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.lines()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new CA named `name`, and a certificate for localhost it issued, written to `dir` as
/// `{stem}.pem` and `{stem}.key`; the CA.
pub fn localhost_certificate(dir: &Path, stem: &str, name: &str) -> CertificateAuthority {
    let ca = CertificateAuthority::generate(name).unwrap();
    let issued = ca
        .issue_server(&["localhost"], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    std::fs::write(dir.join(format!("{stem}.pem")), &issued.cert_pem).unwrap();
    std::fs::write(dir.join(format!("{stem}.key")), &issued.key_pem).unwrap();
    ca
}

/// [`localhost_certificate`] as `server.pem` and `server.key`, its CA as `ca.pem`; that
/// file's path.
pub fn server_certificate(dir: &Path, name: &str) -> PathBuf {
    let ca = localhost_certificate(dir, "server", name);
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    ca_file
}
