//! A real HTTP proxy for the proxy tests: Debian's `tinyproxy`, started per test in the
//! foreground (`tinyproxy -d -c FILE`) with a generated config (127.0.0.1 only, no
//! ConnectPort line so the emulator's random ports are allowed, Basic authentication
//! when asked), killed when dropped. Its log says which tunnels it was asked for.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::skip_without;

/// Whether `tinyproxy` can be run; says SKIPPED when it cannot (fails under `CI=true`).
pub fn available(test: &str) -> bool {
    let ok = Command::new("tinyproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_without(&format!(
            "tinyproxy, for {test} (`tinyproxy -v` failed; apt-get install tinyproxy)"
        ));
    }
    ok
}

/// A running tinyproxy on 127.0.0.1.
pub struct Tinyproxy {
    child: Option<Child>,
    pub port: u16,
    credentials: Option<(String, String)>,
    dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// On a free port; `credentials` turn on Basic authentication.
    pub fn start(credentials: Option<(&str, &str)>) -> Tinyproxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Tinyproxy::start_on(port, credentials)
    }

    /// On `port` (a restart on the port a killed one had).
    pub fn start_on(port: u16, credentials: Option<(&str, &str)>) -> Tinyproxy {
        let mut proxy = Tinyproxy {
            child: None,
            port,
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
            dir: tempfile::tempdir().unwrap(),
        };
        proxy.run();
        proxy
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("tinyproxy.log")
    }

    fn run(&mut self) {
        let conf = self.dir.path().join("tinyproxy.conf");
        let mut text = format!(
            "Port {}\nListen 127.0.0.1\nTimeout 600\nMaxClients 100\nLogLevel Connect\n\
             LogFile \"{}\"\n",
            self.port,
            self.log_file().display()
        );
        if let Some((user, password)) = &self.credentials {
            text.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        std::fs::write(&conf, text).unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("stderr")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Up once it accepts (a restart may wait for the port to be free again).
        let give_up = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "tinyproxy exited with {status}: {}{}",
                    std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default(),
                    std::fs::read_to_string(self.log_file()).unwrap_or_default()
                );
            }
            assert!(Instant::now() < give_up, "tinyproxy did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT`, without credentials.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://user:password@127.0.0.1:PORT`.
    pub fn url_with(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// The `host:port` of every CONNECT it was asked for so far, in order.
    pub fn connects(&self) -> Vec<String> {
        std::fs::read_to_string(self.log_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let request = l.split_once("): CONNECT ")?.1;
                Some(request.split(' ').next()?.to_owned())
            })
            .collect()
    }

    /// SIGKILL: every tunnel through it breaks at once, and the port refuses.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the same settings.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        self.kill();
    }
}
