//! TLS to PostgreSQL as libpq does it, against a real server with `ssl = on` and a
//! certificate from a CA of the test's own: what each `sslmode` trusts, root files as
//! bundles, `PGSSLMODE`/`PGSSLROOTCERT`, a missing root file as a config error, and the
//! server-side keepalives every connection asks for.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pgpushd::db::{self, PgEnv};
use pgpushd::devdb::DevDb;
use pgpushd::secret::Secret;
use pgpushd_emulator::tls::CertificateAuthority;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS cluster whose certificate (for `localhost` and 127.0.0.1) `right.pem` signed;
/// `wrong.pem` is another CA; `bundle.pem` holds the wrong CA, then the right one.
struct TlsDb {
    cluster: DevDb,
    dir: tempfile::TempDir,
}

impl TlsDb {
    fn start() -> TlsDb {
        let right = CertificateAuthority::generate("pgpushd test server CA").unwrap();
        let wrong = CertificateAuthority::generate("pgpushd test other CA").unwrap();
        let server = right
            .issue_server(&["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
            .unwrap();
        let cluster = DevDb::start_tls(&server.cert_pem, &server.key_pem).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("right.pem"), right.cert_pem()).unwrap();
        std::fs::write(dir.path().join("wrong.pem"), wrong.cert_pem()).unwrap();
        std::fs::write(
            dir.path().join("bundle.pem"),
            [wrong.cert_pem(), right.cert_pem()].concat(),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("home")).unwrap();
        TlsDb { cluster, dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The cluster's URL with these parameters instead of `sslmode=disable`.
    fn url(&self, params: &str) -> String {
        let base = self.cluster.url("postgres");
        let base = base.trim_end_matches("?sslmode=disable");
        if params.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{params}")
        }
    }

    /// `sslrootcert=<dir>/name`.
    fn root(&self, name: &str) -> String {
        format!("sslrootcert={}", self.file(name).display())
    }

    /// An environment with no PGSSL* and a home without `.postgresql/`.
    fn env(&self) -> PgEnv {
        PgEnv {
            sslmode: None,
            sslrootcert: None,
            home: Some(self.file("home")),
        }
    }

    async fn connect(&self, params: &str, env: &PgEnv) -> anyhow::Result<bool> {
        let url = Secret::new(self.url(params));
        let client = db::connect_with(&url, TIMEOUT, "test", env).await?;
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }
}

fn assert_refused(result: anyhow::Result<bool>, what: &str) {
    match result {
        Ok(_) => panic!("{what}: connected"),
        Err(e) => {
            let e = format!("{e:#}");
            assert!(e.contains("certificate verify failed"), "{what}: {e}");
        }
    }
}

#[tokio::test]
async fn each_sslmode_trusts_what_libpq_trusts() {
    let db = TlsDb::start();
    let env = db.env();
    let (right, wrong, bundle) = (
        db.root("right.pem"),
        db.root("wrong.pem"),
        db.root("bundle.pem"),
    );

    assert!(db
        .connect(&format!("sslmode=verify-full&{right}"), &env)
        .await
        .unwrap());
    assert_refused(
        db.connect(&format!("sslmode=verify-full&{wrong}"), &env)
            .await,
        "verify-full, wrong CA",
    );
    // A bundle: every certificate in it is a root, not only the first.
    assert!(db
        .connect(&format!("sslmode=verify-ca&{bundle}"), &env)
        .await
        .unwrap());
    assert!(db
        .connect(&format!("sslmode=verify-full&{bundle}"), &env)
        .await
        .unwrap());
    // require with a root file checks the chain, as verify-ca.
    assert_refused(
        db.connect(&format!("sslmode=require&{wrong}"), &env).await,
        "require, wrong CA",
    );
    assert!(db
        .connect(&format!("sslmode=require&{right}"), &env)
        .await
        .unwrap());
    // Without one, require and prefer encrypt without checking.
    assert!(db.connect("sslmode=require", &env).await.unwrap());
    assert!(db.connect("", &env).await.unwrap());
    assert!(!db.connect("sslmode=disable", &env).await.unwrap());
    // verify-ca without sslrootcert needs ~/.postgresql/root.crt ...
    let e = db.connect("sslmode=verify-ca", &env).await.unwrap_err();
    assert!(format!("{e:#}").contains("root.crt"), "{e:#}");
    // ... and uses it, as require does once it is there.
    let dot = db.file("home").join(".postgresql");
    std::fs::create_dir(&dot).unwrap();
    std::fs::copy(db.file("wrong.pem"), dot.join("root.crt")).unwrap();
    assert_refused(
        db.connect("sslmode=require", &env).await,
        "require, wrong ~/.postgresql/root.crt",
    );
    std::fs::copy(db.file("right.pem"), dot.join("root.crt")).unwrap();
    assert!(db.connect("sslmode=verify-ca", &env).await.unwrap());
}

#[tokio::test]
async fn pgsslmode_and_pgsslrootcert_apply_when_the_url_does_not_say() {
    let db = TlsDb::start();
    let env = |root: &str| PgEnv {
        sslmode: Some("verify-full".into()),
        sslrootcert: Some(db.file(root).display().to_string()),
        home: Some(db.file("home")),
    };
    assert!(db.connect("", &env("right.pem")).await.unwrap());
    assert_refused(
        db.connect("", &env("wrong.pem")).await,
        "PGSSLROOTCERT wrong",
    );
    // The URL wins over the environment.
    let url_root = db.root("right.pem");
    assert!(db.connect(&url_root, &env("wrong.pem")).await.unwrap());
    assert!(!db
        .connect("sslmode=disable", &env("wrong.pem"))
        .await
        .unwrap());
}

fn pgpushd(home: &Path) -> Command {
    let mut cmd = crate::support::pgpushd_command();
    cmd.env_remove("PGPUSHD_DATABASE_URL")
        .env_remove("RUST_LOG")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .env_remove("SSL_CERT_DIR")
        .env("HOME", home)
        .stdin(Stdio::null());
    cmd
}

/// Runs `pgpushd <command> --config` on a config holding only this URL.
fn run(mut cmd: Command, command: &str, dir: &Path, url: &str) -> (i32, String) {
    let config = dir.join(format!("{}.toml", rand_name()));
    std::fs::write(&config, format!("[database]\nurl = \"{url}\"\n")).unwrap();
    let out = cmd
        .arg(command)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn rand_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("config-{}", N.fetch_add(1, Ordering::Relaxed))
}

#[test]
fn the_system_roots_count_only_with_sslrootcert_system() {
    let db = TlsDb::start();
    let home = db.file("home");
    // The server's CA is the system's only root for these processes.
    let system = || {
        let mut cmd = pgpushd(&home);
        cmd.env("SSL_CERT_FILE", db.file("right.pem"));
        cmd
    };
    let (code, out) = run(
        system(),
        "migrate",
        db.dir.path(),
        &db.url(&format!("sslmode=verify-ca&{}", db.root("wrong.pem"))),
    );
    assert_eq!(
        code, 1,
        "verify-ca with a file trusted the system's roots: {out}"
    );
    assert!(out.contains("certificate verify failed"), "{out}");
    // sslrootcert=system: verify-full against the system's roots.
    let (code, out) = run(
        system(),
        "migrate",
        db.dir.path(),
        &db.url("sslrootcert=system"),
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(
        pgpushd(&home),
        "migrate",
        db.dir.path(),
        &db.url("sslrootcert=system"),
    );
    assert_eq!(code, 1, "{out}");
    // ... and nothing weaker, which is a config error.
    let (code, out) = run(
        system(),
        "check-config",
        db.dir.path(),
        &db.url("sslrootcert=system&sslmode=verify-ca"),
    );
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("weak sslmode"), "{out}");

    // PGSSLMODE and PGSSLROOTCERT from the process's environment, end to end.
    let from_env = |root: &str| {
        let mut cmd = pgpushd(&home);
        cmd.env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", db.file(root));
        cmd
    };
    let (code, out) = run(from_env("wrong.pem"), "migrate", db.dir.path(), &db.url(""));
    assert_eq!(code, 1, "PGSSLMODE/PGSSLROOTCERT ignored: {out}");
    assert!(out.contains("certificate verify failed"), "{out}");
    let (code, out) = run(from_env("right.pem"), "migrate", db.dir.path(), &db.url(""));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_missing_root_file_is_a_config_error_for_check_config_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let missing = dir.path().join("no-such-ca.pem");
    let url = format!(
        "postgres://pgpushd@127.0.0.1:1/app?sslmode=verify-full&sslrootcert={}",
        missing.display()
    );
    for command in ["check-config", "run"] {
        let (code, out) = run(pgpushd(&home), command, dir.path(), &url);
        assert_eq!(code, 78, "{command}: {out}");
        assert!(
            out.contains("database.url") && out.contains(&missing.display().to_string()),
            "{command}: {out}"
        );
    }
    // libpq's default file, when the mode needs it and it is not there.
    let (code, out) = run(
        pgpushd(&home),
        "check-config",
        dir.path(),
        "postgres://pgpushd@127.0.0.1:1/app?sslmode=verify-ca",
    );
    assert_eq!(code, 78, "{out}");
    assert!(out.contains(".postgresql/root.crt"), "{out}");
    // PGSSLROOTCERT names a file just as the URL does.
    let mut cmd = pgpushd(&home);
    cmd.env("PGSSLROOTCERT", &missing);
    let (code, out) = run(
        cmd,
        "check-config",
        dir.path(),
        "postgres://pgpushd@127.0.0.1:1/app?sslmode=require",
    );
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("no-such-ca.pem"), "{out}");
}

#[tokio::test]
async fn the_server_keeps_our_connection_alive_with_keepalives() {
    let cluster = DevDb::start().unwrap();
    // TCP (127.0.0.1): a Unix socket would report 0.
    let url = Secret::new(format!(
        "{}&options=-c%20search_path%3Dpublic",
        cluster.url("postgres")
    ));
    let client = db::connect(&url, TIMEOUT, "test").await.unwrap();
    for (name, value) in [
        ("tcp_keepalives_idle", "30"),
        ("tcp_keepalives_interval", "10"),
        ("tcp_keepalives_count", "3"),
        ("search_path", "public"),
    ] {
        let row = client
            .query_one("SELECT setting FROM pg_settings WHERE name = $1", &[&name])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), value, "{name}");
    }
    // The URL's own options come after ours: its tcp_keepalives_* win.
    let url = Secret::new(format!(
        "{}&options=-c%20tcp_keepalives_idle%3D45",
        cluster.url("postgres")
    ));
    let client = db::connect(&url, TIMEOUT, "test").await.unwrap();
    let row = client
        .query_one(
            "SELECT setting FROM pg_settings WHERE name = 'tcp_keepalives_idle'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "45");
}
