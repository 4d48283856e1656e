//! A throwaway PostgreSQL cluster from the machine's server binaries, for `pgpushd demo`,
//! the tests and the benchmarks.
//!
//! `initdb` into a temporary directory, then `postgres` on 127.0.0.1 and a free port with
//! its socket in that directory. When run as root (initdb refuses root) the cluster runs as
//! the `postgres` user, or `nobody`. The binaries are found through `PGPUSHD_PG_BINDIR`,
//! `pg_config --bindir`, or the newest `/usr/lib/postgresql/*/bin`.
//! Dropping a [`DevDb`] stops the server and deletes the directory.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Overrides where the server binaries are looked for.
pub const BINDIR_ENV: &str = "PGPUSHD_PG_BINDIR";

/// How long a cluster may take to initialise or start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running (or stopped) throwaway cluster.
pub struct DevDb {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
    fsync: bool,
    /// (uid, gid) the server runs as, when we are root.
    run_as: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
    /// `ssl = on` with `server.crt` and `server.key` in the cluster's directory.
    tls: bool,
    /// `pg_stat_statements` preloaded (with utility statements), for the benchmark.
    stat_statements: bool,
    server: Option<Child>,
}

impl DevDb {
    /// Initialises and starts a cluster with fsync off (fast, for tests and the demo).
    pub fn start() -> anyhow::Result<DevDb> {
        DevDb::start_with(false)
    }

    /// `fsync = true` for benchmarks that should pay what production pays.
    pub fn start_with(fsync: bool) -> anyhow::Result<DevDb> {
        let mut db = DevDb::init(fsync)?;
        db.start_server()?;
        Ok(db)
    }

    /// The benchmark's cluster: `fsync` as asked, and `pg_stat_statements` preloaded when
    /// the server has it (the bench reports what the daemon asks of the database per row);
    /// `CREATE EXTENSION pg_stat_statements` in a database then reads it.
    pub fn start_for_bench(fsync: bool) -> anyhow::Result<DevDb> {
        let mut db = DevDb::init(fsync)?;
        db.stat_statements = db.has_stat_statements();
        db.start_server()?;
        Ok(db)
    }

    /// Whether the server's library directory holds `pg_stat_statements`.
    pub fn has_stat_statements(&self) -> bool {
        let pkglibdir = Command::new(self.bindir.join("pg_config"))
            .arg("--pkglibdir")
            .output()
            .ok()
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        pkglibdir
            .into_iter()
            .chain(self.bindir.parent().map(|p| p.join("lib")))
            .any(|dir| dir.join("pg_stat_statements.so").exists())
    }

    /// A cluster with `ssl = on`, serving this certificate (PEM, with any intermediates
    /// after it) and key (PEM). Its URLs still say `sslmode=disable`; replace that to
    /// connect with TLS.
    pub fn start_tls(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<DevDb> {
        let mut db = DevDb::init(false)?;
        for (name, content) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = db.dir.path().join(name);
            fs::write(&path, content).with_context(|| format!("writing {name}"))?;
            // The server refuses a key others can read.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            if let Some((uid, gid)) = db.run_as {
                nix::unistd::chown(&path, Some(uid), Some(gid))?;
            }
        }
        db.tls = true;
        db.start_server()?;
        Ok(db)
    }

    fn init(fsync: bool) -> anyhow::Result<DevDb> {
        let bindir = find_bindir()?;
        let dir = tempfile::Builder::new()
            .prefix("pgpushd-devdb-")
            .tempdir()
            .context("creating a directory for the throwaway cluster")?;
        let run_as = unprivileged_user()?;
        if let Some((uid, gid)) = run_as {
            nix::unistd::chown(dir.path(), Some(uid), Some(gid))
                .context("handing the cluster directory to the postgres user")?;
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))?;
        }
        let db = DevDb {
            dir,
            bindir,
            port: free_port()?,
            fsync,
            run_as,
            tls: false,
            stat_statements: false,
            server: None,
        };
        db.initdb()?;
        Ok(db)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd.env_remove("PGDATA").env("LC_ALL", "C");
        cmd
    }

    fn initdb(&self) -> anyhow::Result<()> {
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Starts the server (again, after [`DevDb::stop`]) on the same port and data.
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        if self.server.is_some() {
            return Ok(());
        }
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening the server log")?;
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(&self.log_path(), Some(uid), Some(gid))?;
        }
        let fsync = if self.fsync { "on" } else { "off" };
        let mut cmd = self.command("postgres");
        if self.tls {
            cmd.args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!(
                    "ssl_cert_file={}",
                    self.dir.path().join("server.crt").display()
                ))
                .arg("-c")
                .arg(format!(
                    "ssl_key_file={}",
                    self.dir.path().join("server.key").display()
                ));
        }
        if self.stat_statements {
            cmd.args(["-c", "shared_preload_libraries=pg_stat_statements"])
                .args(["-c", "pg_stat_statements.track_utility=on"]);
        }
        let child = cmd
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", &format!("fsync={fsync}")])
            .args(["-c", "max_connections=200"])
            .args(["-c", "shared_buffers=256MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        self.server = Some(child);
        self.wait_ready()
    }

    /// `postmaster.pid`'s last line says `ready` once connections are accepted.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid_file = self.data_dir().join("postmaster.pid");
        loop {
            if let Ok(text) = fs::read_to_string(&pid_file) {
                if text.lines().nth(7).is_some_and(|l| l.trim() == "ready") {
                    return Ok(());
                }
            }
            if let Some(status) = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.server = None;
                bail!(
                    "postgres exited ({status}) before it was ready; its log: {}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres not ready after {START_TIMEOUT:?}; its log: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (fast shutdown: open connections are ended), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let _ = child.wait();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let out = self
            .command("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url("postgres"))
            .arg("-c")
            .arg(format!("CREATE DATABASE \"{name}\""))
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "CREATE DATABASE {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(self.url(name))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for DevDb {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `Some` when we are root and must hand the cluster to another user.
fn unprivileged_user() -> anyhow::Result<Option<(nix::unistd::Uid, nix::unistd::Gid)>> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Some(user) = nix::unistd::User::from_name(name)? {
            return Ok(Some((user.uid, user.gid)));
        }
    }
    bail!("running as root, and neither a `postgres` nor a `nobody` user exists to run initdb as")
}

fn find_bindir() -> anyhow::Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        if has_server(&dir) {
            return Ok(dir);
        }
        bail!(
            "{BINDIR_ENV}={} holds no initdb and postgres",
            dir.display()
        );
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).ok_or_else(|| {
        anyhow::anyhow!(
            "no PostgreSQL server binaries found (tried {BINDIR_ENV}, pg_config --bindir, \
             /usr/lib/postgresql/*/bin): install PostgreSQL's server package \
             (Debian: apt-get install postgresql)"
        )
    })
}
