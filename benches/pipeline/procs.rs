//! The processes under test: the emulator and the daemon, each the release binary in its
//! own process, and what /proc says about them (CPU time, peak RSS) and about PostgreSQL.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The binary cargo built for this bench (`cargo bench` builds the package's binaries).
pub const BIN: &str = env!("CARGO_BIN_EXE_pgpushd");

pub const TOPIC: &str = "com.example.bench";
pub const KEY_ID: &str = "BENCHKEY01";
pub const TEAM_ID: &str = "BENCHTEAM1";

/// Files shared by every process of a bench run: the signing key, the emulator's CA,
/// configs and logs.
pub struct Workdir {
    pub dir: tempfile::TempDir,
    /// `[database]` keys every daemon of the run gets (`--awake-poll-interval`).
    pub database_keys: String,
}

impl Workdir {
    pub fn new() -> anyhow::Result<Workdir> {
        let dir = tempfile::Builder::new()
            .prefix("pgpushd-bench-")
            .tempdir()?;
        let key = pgpushd_emulator::jwt::generate_signing_key()?;
        fs::write(dir.path().join("AuthKey.p8"), key)?;
        fs::create_dir(dir.path().join("tls"))?;
        Ok(Workdir {
            dir,
            database_keys: String::new(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn key_file(&self) -> PathBuf {
        self.path("AuthKey.p8")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.path("tls/ca.pem")
    }

    /// The daemon's config for this run: the shipped defaults for batching, in-flight
    /// batches and connections; only what must point at this set-up is written.
    pub fn daemon_config(&self, db_url: &str, endpoint: &str) -> anyhow::Result<PathBuf> {
        self.daemon_config_with(db_url, endpoint, "", None)
    }

    /// The same, with `database` keys added to `[database]`, and metrics served on
    /// `metrics` when given.
    pub fn daemon_config_with(
        &self,
        db_url: &str,
        endpoint: &str,
        database: &str,
        metrics: Option<std::net::SocketAddr>,
    ) -> anyhow::Result<PathBuf> {
        let metrics = metrics.map_or(String::new(), |a| format!("[metrics]\nlisten = \"{a}\"\n"));
        let text = format!(
            r#"[database]
url = "{db_url}"
poll_interval = "5s"
{keys}
{database}
{app}
{metrics}"#,
            keys = self.database_keys,
            app = self.app_toml("default", endpoint, &self.key_file()),
        );
        let path = self.path("pgpushd.toml");
        fs::write(&path, text)?;
        Ok(path)
    }

    /// `[apps.NAME]` with token auth (`key_file`, the bench's key and team ids) against
    /// `endpoint`, trusting the emulator's CA.
    pub fn app_toml(&self, name: &str, endpoint: &str, key_file: &Path) -> String {
        format!(
            r#"
[apps.{name}]
topic = "{TOPIC}"
endpoint = "{endpoint}"
ca_file = "{ca}"

[apps.{name}.token]
key_file = "{key}"
key_id = "{KEY_ID}"
team_id = "{TEAM_ID}"
"#,
            ca = self.ca_file().display(),
            key = key_file.display(),
        )
    }
}

/// A free loopback port's address (for the daemon's metrics).
pub fn free_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One counter or gauge from the daemon's `/metrics` (HTTP/1.0, no client library).
pub fn scrape(addr: std::net::SocketAddr, series: &str) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .ok_or_else(|| anyhow::anyhow!("no {series} in the daemon's metrics"))
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub started: Instant,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGINT and wait (up to 30 s) for a clean exit: the emulator flushes its record
    /// file, the daemon drains.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // SIGINT: what both the daemon and perf take as "stop cleanly".
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("process {} did not stop within 30 s of SIGINT", self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

pub struct EmulatorProc {
    pub proc: Proc,
    pub endpoint: String,
    /// Kept open: the emulator prints more after the endpoint, and a closed pipe would
    /// kill it.
    _stdout: BufReader<std::process::ChildStdout>,
}

/// Where the producer scenario runs each side: `taskset` CPU lists for PostgreSQL with
/// the application's writers, and for the daemon with the emulator. Apart, they stand
/// for the production layout, where the daemon and APNs are other hosts than the
/// database: the application's insert rate then pays for the daemon's work in the
/// database (claims, outcome writes, NOTIFY), not for its TLS and HTTP/2 or the
/// emulator's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Placement {
    pub database: String,
    pub daemon: String,
}

impl Placement {
    /// The last CPU for the daemon and the emulator, the others for the database and the
    /// writers; `None` on one CPU or without `taskset`.
    pub fn apart() -> Option<Placement> {
        // The CPUs this bench may use (it is not pinned here, between scenarios).
        let cpus = std::thread::available_parallelism().ok()?.get();
        let taskset = Command::new("taskset")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (cpus >= 2 && taskset).then(|| Placement {
            database: format!("0-{}", cpus - 2),
            daemon: format!("{}", cpus - 1),
        })
    }
}

/// `pgpushd`, on `cpus` when given.
fn pgpushd_on(cpus: Option<&str>) -> Command {
    match cpus {
        Some(cpus) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", cpus, BIN]);
            cmd
        }
        None => Command::new(BIN),
    }
}

/// Moves every thread of `pid`, and of its children when asked, onto `cpus` (a
/// `taskset` list); processes they start later inherit it.
pub fn pin(pid: i32, cpus: &str, with_children: bool) -> anyhow::Result<()> {
    let mut pids = vec![pid];
    if with_children {
        pids.extend(children(pid));
    }
    for p in pids {
        // A child may exit meanwhile: only the parent must succeed.
        let ok = Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &p.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok && p == pid {
            bail!("taskset could not move process {pid} to CPUs {cpus}");
        }
    }
    Ok(())
}

/// Starts `pgpushd emulator` with token auth on a free port, answering after `latency`,
/// writing every request to `record` when given.
pub fn start_emulator(
    work: &Workdir,
    latency: Duration,
    record: Option<&Path>,
) -> anyhow::Result<EmulatorProc> {
    start_emulator_on(work, latency, record, None)
}

/// [`start_emulator`], on `cpus` when given.
pub fn start_emulator_on(
    work: &Workdir,
    latency: Duration,
    record: Option<&Path>,
    cpus: Option<&str>,
) -> anyhow::Result<EmulatorProc> {
    let mut cmd = pgpushd_on(cpus);
    cmd.arg("emulator")
        .args(["--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(work.path("tls"))
        .arg("--token-key")
        .arg(work.key_file())
        .args(["--key-id", KEY_ID, "--team-id", TEAM_ID, "--topic", TOPIC])
        .arg("--latency")
        .arg(format!("{}ms", latency.as_millis()));
    if let Some(path) = record {
        cmd.arg("--record").arg(path);
    }
    spawn_emulator(
        work,
        &mut cmd,
        "emulator.log",
        "APNs emulator listening on ",
    )
}

/// Spawns an emulator (`cmd`, its log in `work`'s `log`) and reads the line it prints
/// once it listens: `banner`, then its endpoint.
pub fn spawn_emulator(
    work: &Workdir,
    cmd: &mut Command,
    log: &str,
    banner: &str,
) -> anyhow::Result<EmulatorProc> {
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(work.path(log))?)
        .spawn()
        .context("starting the emulator")?;
    let stdout = child.stdout.take().expect("piped");
    let proc = Proc {
        child,
        started: Instant::now(),
    };
    let mut stdout = BufReader::new(stdout);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let Some(endpoint) = line
        .trim()
        .strip_prefix(banner)
        .and_then(|rest| rest.split_whitespace().next())
    else {
        bail!(
            "the emulator did not start: {line:?}; its log: {}",
            fs::read_to_string(work.path(log)).unwrap_or_default()
        );
    };
    Ok(EmulatorProc {
        endpoint: endpoint.to_owned(),
        proc,
        _stdout: stdout,
    })
}

/// Starts `pgpushd run --config FILE`; the clock of a drain starts here.
pub fn start_daemon(work: &Workdir, config: &Path) -> anyhow::Result<Proc> {
    start_daemon_on(work, config, None)
}

/// [`start_daemon`], on `cpus` when given.
pub fn start_daemon_on(work: &Workdir, config: &Path, cpus: Option<&str>) -> anyhow::Result<Proc> {
    let log = fs::File::create(work.path("daemon.log"))?;
    let started = Instant::now();
    let child = pgpushd_on(cpus)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting the daemon")?;
    Ok(Proc { child, started })
}

/// With `PGPUSHD_BENCH_PERF=FILE` in the environment, `perf record` samples the daemon
/// (attached to its pid) into FILE until it stops: for finding out what limits a drain.
pub fn perf_attach(pid: i32) -> anyhow::Result<Option<Proc>> {
    let Some(file) = std::env::var_os("PGPUSHD_BENCH_PERF") else {
        return Ok(None);
    };
    let child = Command::new("perf")
        .args(["record", "-F", "999", "--call-graph", "dwarf,16384", "-o"])
        .arg(file)
        .args(["-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf (PGPUSHD_BENCH_PERF is set)")?;
    Ok(Some(Proc {
        child,
        started: Instant::now(),
    }))
}

/// Clock ticks per second for /proc times.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Fields of /proc/PID/stat after the command name (field 3 onwards).
fn stat_fields(pid: i32) -> Option<Vec<u64>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse::<i64>().unwrap_or(0).max(0) as u64)
            .collect(),
    )
}

/// utime + stime of a process, in ticks (0 once it is gone).
pub fn cpu_ticks(pid: i32) -> u64 {
    // Fields 14 and 15 (utime, stime): indexes 11 and 12 from field 3.
    stat_fields(pid).map_or(0, |f| f[11] + f[12])
}

/// The parent of a process.
fn ppid(pid: i32) -> Option<i32> {
    stat_fields(pid).map(|f| f[1] as i32)
}

/// The postmaster listening on `port` (its command line has `-p PORT`).
pub fn postmaster_pid(port: u16) -> Option<i32> {
    let port = port.to_string();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_postgres = args.first().is_some_and(|a| a.ends_with(b"postgres"));
        let on_port = args
            .windows(2)
            .any(|w| w[0] == b"-p" && w[1] == port.as_bytes());
        if is_postgres && on_port {
            return Some(pid);
        }
    }
    None
}

/// CPU ticks of the whole PostgreSQL cluster: the postmaster, its children alive now, and
/// the children it has reaped (cutime + cstime).
pub fn postgres_ticks(postmaster: i32) -> u64 {
    let Some(f) = stat_fields(postmaster) else {
        return 0;
    };
    f[11] + f[12] + f[13] + f[14] + children(postmaster).map(cpu_ticks).sum::<u64>()
}

/// The processes whose parent is `pid`, now.
fn children(pid: i32) -> impl Iterator<Item = i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(move |child| ppid(*child) == Some(pid))
}

/// The CPU time of each PostgreSQL process, in nanoseconds: the postmaster's and its live
/// children's by pid (the scheduler's own count, /proc/PID/schedstat, not clock ticks),
/// and the children it has reaped (cutime + cstime, converted from ticks).
#[derive(Debug, Clone, Default)]
pub struct PostgresCpu {
    pub by_pid: std::collections::HashMap<i32, u64>,
    pub reaped_ns: u64,
}

pub fn postgres_cpu(postmaster: i32) -> PostgresCpu {
    let mut cpu = PostgresCpu::default();
    let Some(f) = stat_fields(postmaster) else {
        return cpu;
    };
    cpu.reaped_ns = ((f[13] + f[14]) as f64 / clock_ticks() * 1e9) as u64;
    for pid in std::iter::once(postmaster).chain(children(postmaster)) {
        let ns = fs::read_to_string(format!("/proc/{pid}/schedstat"))
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse().ok());
        if let Some(ns) = ns {
            cpu.by_pid.insert(pid, ns);
        }
    }
    cpu
}

/// The machine's CPUs, from /proc/stat: all of them, whatever this process is pinned to
/// (`available_parallelism` counts only the CPUs it may run on).
pub fn machine_cpus() -> usize {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let n = text
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    n.max(1)
}

/// (busy, total) ticks of the whole machine, from /proc/stat.
pub fn machine_ticks() -> (u64, u64) {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// VmHWM (peak resident set) of a process, in MiB.
pub fn peak_rss_mb(pid: i32) -> Option<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU used by the parts of the set-up over an interval, in cores (1.0 = one core busy).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CpuUse {
    pub daemon: f64,
    pub emulator: f64,
    pub postgres: f64,
    /// The bench process itself (pollers, producers, the raw client).
    pub bench: f64,
    /// Everything busy on the machine, other users included.
    pub machine: f64,
    /// Busy, but none of the above: other users of the machine (noise).
    pub others: f64,
}

impl CpuUse {
    /// The mean of several intervals' figures (equal weights).
    pub fn mean<'a>(uses: impl IntoIterator<Item = &'a CpuUse>) -> CpuUse {
        let (mut sum, mut n) = (CpuUse::default(), 0.0);
        for u in uses {
            sum.daemon += u.daemon;
            sum.emulator += u.emulator;
            sum.postgres += u.postgres;
            sum.bench += u.bench;
            sum.machine += u.machine;
            sum.others += u.others;
            n += 1.0;
        }
        if n > 0.0 {
            for f in [
                &mut sum.daemon,
                &mut sum.emulator,
                &mut sum.postgres,
                &mut sum.bench,
                &mut sum.machine,
                &mut sum.others,
            ] {
                *f /= n;
            }
        }
        sum
    }
}

/// A snapshot of CPU counters, to subtract from a later one.
#[derive(Clone, Copy)]
pub struct CpuMark {
    at: Instant,
    daemon: u64,
    emulator: u64,
    postgres: u64,
    bench: u64,
    machine_busy: u64,
    machine_total: u64,
}

/// Whose CPU to count.
#[derive(Clone, Copy)]
pub struct Watched {
    pub daemon: Option<i32>,
    pub emulator: Option<i32>,
    pub postmaster: Option<i32>,
}

impl Watched {
    pub fn mark(&self) -> CpuMark {
        let (busy, total) = machine_ticks();
        CpuMark {
            at: Instant::now(),
            daemon: self.daemon.map_or(0, cpu_ticks),
            emulator: self.emulator.map_or(0, cpu_ticks),
            postgres: self.postmaster.map_or(0, postgres_ticks),
            bench: cpu_ticks(std::process::id() as i32),
            machine_busy: busy,
            machine_total: total,
        }
    }

    /// CPU used since `before`. `daemon_from_zero`: the daemon started after `before`
    /// (its counters began at zero).
    pub fn since(&self, before: &CpuMark, daemon_from_zero: bool) -> CpuUse {
        let now = self.mark();
        let hz = clock_ticks();
        let wall = now.at.duration_since(before.at).as_secs_f64().max(1e-3);
        let cores = |ticks: u64| ticks as f64 / hz / wall;
        let daemon_before = if daemon_from_zero { 0 } else { before.daemon };
        let total = (now.machine_total - before.machine_total).max(1) as f64;
        let ncpu = machine_cpus() as f64;
        let mut cpu = CpuUse {
            daemon: cores(now.daemon.saturating_sub(daemon_before)),
            emulator: cores(now.emulator.saturating_sub(before.emulator)),
            postgres: cores(now.postgres.saturating_sub(before.postgres)),
            bench: cores(now.bench.saturating_sub(before.bench)),
            machine: (now.machine_busy - before.machine_busy) as f64 / total * ncpu,
            others: 0.0,
        };
        cpu.others = (cpu.machine - cpu.daemon - cpu.emulator - cpu.postgres - cpu.bench).max(0.0);
        cpu
    }
}

/// Waits (up to `max_wait`) until the machine has been nearly idle for a second, so a
/// measurement does not start while another build is running; returns the busy cores of
/// the last second either way.
pub async fn wait_quiet(max_wait: Duration) -> f64 {
    let give_up = Instant::now() + max_wait;
    loop {
        let (busy0, total0) = machine_ticks();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (busy1, total1) = machine_ticks();
        let ncpu = machine_cpus() as f64;
        let busy = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64 * ncpu;
        if busy < 0.25 || Instant::now() > give_up {
            return busy;
        }
    }
}
