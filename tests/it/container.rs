//! The container image (`Containerfile`), built the README's way and run with podman:
//! `cargo build --release`, then `podman build` with the binary beside it, then
//! `check-config`, `migrate` and `run` through the image against this test's PostgreSQL
//! and the APNs emulator (host network). The daemon delivers rows inserted meanwhile,
//! answers /healthz, passes the image's health check, and `podman stop` (SIGTERM) ends
//! it with exit 0 after draining the batches in flight.
//!
//! These machines reach no image registry: the base image, Debian 12 slim under its
//! usual name, is made once from the Debian mirror apt uses (`debootstrap --variant=
//! minbase`, then `podman import`) and kept; the build's `apt-get install` reaches the
//! same mirror through the host network. podman runs with runc and cgroupfs (crun
//! refuses these machines' hybrid cgroups) and no default ulimits, from a containers.conf
//! of the test's own. As root only (rootful podman).
//!
//! Needs podman, runc and debootstrap; says SKIPPED without them, fails without them
//! under CI (`CI=true`; `.ci/run` installs them).
//!
//! Cost on 2 cores: the release build (6 min from nothing; `.ci/run` builds it before
//! the tests, and then it is a no-op here), the base image (under a minute, once), the
//! image (15 s cold, mostly apt; 2 s once podman caches all but a new binary), the
//! scenario (8 s). Images of older binaries stay behind as dangling layers of podman's
//! build cache: `podman image prune` clears them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{
    count, counts, free_port, http_get, insert_rows, skip_without, token_app_toml, wait_for,
    wait_for_status, ApnsSetup, TestDb,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The Containerfile's base, under the name a registry would give it.
const BASE: &str = "docker.io/library/debian:bookworm-slim";
const IMAGE: &str = "localhost/pgpushd-test:latest";
/// Where the container finds its credentials (mounted one file each).
const SECRETS: &str = "/run/secrets";

/// podman as these machines run it: the settings live in a containers.conf of the
/// test's own, named by CONTAINERS_CONF in every call.
#[derive(Clone)]
struct Podman {
    conf: PathBuf,
}

impl Podman {
    fn new(dir: &Path) -> Podman {
        let conf = dir.join("containers.conf");
        std::fs::write(
            &conf,
            "[containers]\n\
             # No default ulimits: podman's defaults exceed what this machine allows.\n\
             default_ulimits = []\n\
             [engine]\n\
             # crun refuses these machines' hybrid cgroups; runc and cgroupfs work.\n\
             runtime = \"runc\"\n\
             cgroup_manager = \"cgroupfs\"\n",
        )
        .unwrap();
        Podman { conf }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("podman");
        cmd.args(args).env("CONTAINERS_CONF", &self.conf);
        for v in crate::support::PROXY_VARIABLES {
            cmd.env_remove(v);
        }
        cmd
    }

    fn output(&self, args: &[&str]) -> Output {
        output(&mut self.command(args))
    }

    /// Runs it and fails the test unless it succeeds; returns its stdout.
    fn run(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// [`Podman::output`] off the runtime's threads (the emulator answers on them).
    async fn output_async(&self, args: &[&str]) -> Output {
        let (podman, args): (Podman, Vec<String>) =
            (self.clone(), args.iter().map(|a| a.to_string()).collect());
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            podman.output(&args)
        })
        .await
        .unwrap()
    }

    fn size(&self, image: &str) -> u64 {
        self.run(&["image", "inspect", "--format", "{{.Size}}", image])
            .trim()
            .parse()
            .unwrap()
    }
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn run(cmd: &mut Command) {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The first tool this test needs that is missing.
fn missing() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("root (the container test runs rootful podman)");
    }
    [
        ("podman", "podman"),
        ("runc", "runc"),
        (
            "debootstrap",
            "debootstrap (the base image is made with it)",
        ),
    ]
    .into_iter()
    .find(|(program, _)| !works(program, &["--version"]))
    .map(|(_, what)| what)
}

/// The Debian mirror apt uses for bookworm (deb822 sources first, then sources.list),
/// or Debian's own.
fn debian_mirror() -> String {
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    for stanza in deb822.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
        };
        if field("Suites:").split_whitespace().any(|s| s == "bookworm") {
            if let Some(uri) = field("URIs:").split_whitespace().next() {
                return uri.to_owned();
            }
        }
    }
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    for line in list.lines() {
        // deb [options] URI suite components
        let words: Vec<&str> = line
            .split_whitespace()
            .filter(|w| !w.starts_with('[') && !w.ends_with(']'))
            .collect();
        if let ["deb", uri, "bookworm", ..] = words[..] {
            return uri.to_owned();
        }
    }
    "http://deb.debian.org/debian".to_owned()
}

/// Makes [`BASE`] unless podman has it: Debian 12 minbase, trimmed as the slim image is
/// (no apt lists or cached packages, no docs, man pages or translations, and dpkg told to
/// keep it so).
fn ensure_base_image(podman: &Podman, dir: &Path) {
    if works_podman(podman, &["image", "exists", BASE]) {
        return;
    }
    let started = Instant::now();
    let rootfs = dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    let mirror = debian_mirror();
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&rootfs)
        .arg(&mirror));
    run(Command::new("sh")
        .args([
            "-ec",
            r#"cd "$1"
            rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/* \
                var/log/bootstrap.log usr/share/doc/* usr/share/man/* usr/share/info/*
            find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
            cat >etc/dpkg/dpkg.cfg.d/slim <<EOF
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
            tar -c . | podman import --change 'CMD ["bash"]' - "$2" >/dev/null"#,
            "sh",
        ])
        .arg(&rootfs)
        .arg(BASE)
        .env("CONTAINERS_CONF", &podman.conf));
    std::fs::remove_dir_all(&rootfs).unwrap();
    eprintln!(
        "container: made the base image {BASE} from {mirror} in {:.0?}",
        started.elapsed()
    );
}

fn works_podman(podman: &Podman, args: &[&str]) -> bool {
    podman
        .command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The release binary, built as the README says (`cargo build --release`) in this run's
/// target directory; a run of `cargo test --release` has it already. Cargo locks each
/// profile's directory apart, so the build does not wait for the `cargo test` running
/// this.
fn release_binary() -> PathBuf {
    let test_binary = Path::new(env!("CARGO_BIN_EXE_pgpushd"));
    let profile_dir = test_binary.parent().unwrap();
    if profile_dir.file_name().unwrap() == "release" {
        return test_binary.to_owned();
    }
    let target_dir = profile_dir.parent().unwrap();
    let started = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    run(Command::new(cargo)
        .args(["build", "--release", "--locked", "--bin", "pgpushd"])
        .arg("--manifest-path")
        .arg(Path::new(ROOT).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target_dir));
    eprintln!(
        "container: cargo build --release in {:.0?}",
        started.elapsed()
    );
    target_dir.join("release/pgpushd")
}

/// `podman build` of the Containerfile with the binary beside it: a context holding what
/// `.dockerignore` leaves of a checkout after `cargo build --release`, the binary.
fn build_image(podman: &Podman, dir: &Path, binary: &Path) {
    let context = dir.join("context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(context.join("target/release")).unwrap();
    std::fs::copy(
        Path::new(ROOT).join(".dockerignore"),
        context.join(".dockerignore"),
    )
    .unwrap();
    let placed = context.join("target/release/pgpushd");
    if std::fs::hard_link(binary, &placed).is_err() {
        std::fs::copy(binary, &placed).unwrap();
    }
    let started = Instant::now();
    let containerfile = Path::new(ROOT).join("Containerfile");
    podman.run(&[
        "build",
        // Docker's format: an OCI image has no HEALTHCHECK.
        "--format",
        "docker",
        // Only the base made above, never a registry.
        "--pull=never",
        // apt-get reaches the mirror the way the host does.
        "--network",
        "host",
        "--tag",
        IMAGE,
        "--file",
        containerfile.to_str().unwrap(),
        context.to_str().unwrap(),
    ]);
    eprintln!("container: podman build in {:.0?}", started.elapsed());
}

/// A container removed however the test ends.
struct Container<'a> {
    podman: &'a Podman,
    name: String,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .command(&["rm", "--force", "--time", "0", &self.name])
            .output();
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_checks_migrates_delivers_answers_health_and_drains_on_stop() {
    if let Some(tool) = missing() {
        skip_without(tool);
        return;
    }
    let started = Instant::now();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("container");
    std::fs::create_dir_all(&dir).unwrap();
    let podman = Podman::new(&dir);
    let binary = tokio::task::spawn_blocking({
        let (podman, dir) = (podman.clone(), dir.clone());
        move || {
            ensure_base_image(&podman, &dir);
            let binary = release_binary();
            build_image(&podman, &dir, &binary);
            binary
        }
    })
    .await
    .unwrap();
    let (size, base_size) = (podman.size(IMAGE), podman.size(BASE));
    let added = size - base_size;
    eprintln!(
        "container: the image is {:.1} MB, {:.1} MB above its base (binary: {:.1} MB unstripped)",
        size as f64 / 1e6,
        added as f64 / 1e6,
        std::fs::metadata(&binary).unwrap().len() as f64 / 1e6,
    );
    assert!(
        added < 40_000_000,
        "the image adds {added} bytes to its base"
    );
    let user = podman.run(&["image", "inspect", "--format", "{{.Config.User}}", IMAGE]);
    assert_eq!(user.trim(), "10001:10001", "the image runs as root");
    let prepared = started.elapsed();

    // The database URL comes from the environment, the credentials from files mounted
    // one by one (their directory is the test's, closed to the container's user).
    let db = TestDb::unmigrated().await;
    let apns = ApnsSetup::new(|c| c.keep_records = 0).await;
    let metrics_port = free_port();
    let config = apns.dir.path().join("pgpushd.toml");
    let app = token_app_toml(
        &apns.emulator.endpoint(),
        &Path::new(SECRETS).join("ca.pem"),
        &Path::new(SECRETS).join("AuthKey.p8"),
    );
    std::fs::write(
        &config,
        format!(
            "[database]\nbatch_size = 100\nmax_batches_in_flight = 4\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n{app}"
        ),
    )
    .unwrap();
    let mount = |file: &str, at: &str| {
        let host = apns.dir.path().join(file);
        std::fs::set_permissions(&host, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        format!("{}:{at}:ro", host.display())
    };
    let mounts = [
        mount("pgpushd.toml", "/etc/pgpushd/pgpushd.toml"),
        mount("AuthKey.p8", &format!("{SECRETS}/AuthKey.p8")),
        mount("ca.pem", &format!("{SECRETS}/ca.pem")),
    ];
    let database_url = format!("PGPUSHD_DATABASE_URL={}", db.url);
    let mut common = vec!["--network", "host", "--env", &database_url];
    for m in &mounts {
        common.extend(["--volume", m]);
    }
    let once = |command: &'static str| {
        let mut args = vec!["run", "--rm"];
        args.extend(&common);
        args.extend([IMAGE, command]);
        args
    };

    let checked = podman.run(&once("check-config"));
    assert!(
        checked.contains("/etc/pgpushd/pgpushd.toml: OK (1 app(s))"),
        "{checked}"
    );
    podman.run(&once("migrate"));
    let client = db.client().await;
    insert_rows(&client, 1, 50).await;

    // `run` is the image's command; podman stop waits up to --stop-timeout, longer than
    // the daemon's drain (shutdown_timeout, 20 s). No health check timer: it needs
    // systemd, the test runs the check itself.
    let name = format!("pgpushd-test-{}", std::process::id());
    let container = Container {
        podman: &podman,
        name: name.clone(),
    };
    let mut args = vec![
        "run",
        "--detach",
        "--name",
        &name,
        "--stop-timeout",
        "30",
        "--health-interval",
        "disable",
    ];
    args.extend(&common);
    args.push(IMAGE);
    podman.run(&args);
    let running = Instant::now();

    wait_for_status(&client, "sent", 50, Duration::from_secs(30)).await;
    insert_rows(&client, 51, 100).await;
    wait_for_status(&client, "sent", 150, Duration::from_secs(30)).await;
    assert_eq!(apns.emulator.stats().by_status.get(&200), Some(&150));

    let (status, body) = http_get(metrics_port, "/healthz");
    assert_eq!(status, 200, "{body}");
    let health = podman
        .output_async(&["healthcheck", "run", &container.name])
        .await;
    assert!(health.status.success(), "{}", text(&health));

    // The drain: rows in flight when podman stop sends SIGTERM are sent and recorded
    // before the daemon exits 0. Each answer now takes 2 s; the 300 new rows are three
    // batches, all claimed and in flight at once (4 may be).
    apns.emulator.set_latency(Duration::from_secs(2));
    insert_rows(&client, 151, 300).await;
    wait_for(
        "300 requests in flight",
        Duration::from_secs(10),
        || async {
            let (_, metrics) = http_get(metrics_port, "/metrics");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix("pgpushd_push_requests_in_flight "))
                .is_some_and(|n| n.trim() == "300")
                .then_some(())
        },
    )
    .await;
    let before = count(&client, "sent").await;
    let stopping = Instant::now();
    let stop = podman.output_async(&["stop", &container.name]).await;
    assert!(stop.status.success(), "{}", text(&stop));
    let stopped_in = stopping.elapsed();
    let exit = podman.run(&[
        "inspect",
        "--format",
        "{{.State.ExitCode}}",
        &container.name,
    ]);
    let logs = text(&podman.output(&["logs", &container.name]));
    assert_eq!(exit.trim(), "0", "{logs}");
    assert!(
        logs.contains("SIGTERM") && logs.contains("finishing the batches in flight"),
        "no drain: {logs}"
    );
    assert_eq!(before, 150, "the stop came after the answers: no drain");
    let after = counts(&client).await;
    assert_eq!(after.get("sent"), Some(&450), "{after:?}");
    assert_eq!(after.len(), 1, "{after:?}");
    // Nothing held either.
    let held: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
             WHERE c.relname = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0);
    eprintln!(
        "container: prepared in {prepared:.0?}, ran {:.0?}, stopped (drained 300) in {stopped_in:.0?}",
        running.elapsed()
    );
    drop(container);
}
