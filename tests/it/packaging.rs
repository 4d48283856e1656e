//! The Debian package (`cargo deb`: metadata in Cargo.toml, maintainer scripts in
//! `pkg/deb/`), made from the binary this test run already built (no second build):
//! listed, extracted into a throwaway root and checked against the unit it ships. Its
//! maintainer scripts run with recorders in place of every command that would change
//! the machine, in a mount namespace of their own where systemd appears to run. Then
//! dpkg installs, upgrades, removes and purges it for real, chrooted onto an overlay of
//! this machine's root (as root; SKIPPED otherwise).
//!
//! Needs `cargo deb` (cargo-deb) and `dpkg-deb`; says SKIPPED without them, and fails
//! without them under CI (`CI=true`; `.ci/run` installs cargo-deb).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The package, made once for every test of this module, and its contents.
struct Package {
    deb: PathBuf,
    /// `dpkg-deb -x`: the files as they would be installed.
    root: PathBuf,
    /// `dpkg-deb -e`: control, conffiles and the maintainer scripts.
    control: PathBuf,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// The package, or `None` (having said SKIPPED) when the tools are missing.
fn package() -> Option<&'static Package> {
    static PACKAGE: OnceLock<Option<Package>> = OnceLock::new();
    let made = PACKAGE.get_or_init(|| {
        if !works(&cargo(), &["deb", "--version"]) || !works("dpkg-deb", &["--version"]) {
            return None;
        }
        Some(make_package())
    });
    if made.is_none() {
        crate::support::skip_without(
            "cargo-deb (cargo install cargo-deb --locked) or dpkg-deb, which the packaging \
             tests need",
        );
    }
    made.as_ref()
}

fn make_package() -> Package {
    // A target directory of its own holding only `release/pgpushd`, this run's binary:
    // `cargo deb --no-build` packages it as it would a release build, and never takes
    // the lock of the target directory this test runs from. Stripped (a copy: the
    // test binary keeps its symbols), the package is 5 MB rather than 30.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packaging");
    let _ = std::fs::remove_dir_all(&dir);
    let release = dir.join("target/release");
    std::fs::create_dir_all(&release).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_pgpushd"), release.join("pgpushd")).unwrap();
    let deb = dir.join("pgpushd.deb");
    run(Command::new(cargo())
        .args([
            "deb",
            "--no-build",
            "--offline",
            "--fast",
            "--strip",
            "-p",
            "pgpushd",
        ])
        .arg("--manifest-path")
        .arg(Path::new(ROOT).join("Cargo.toml"))
        .arg("--output")
        .arg(&deb)
        .env("CARGO_TARGET_DIR", dir.join("target")));
    let (root, control) = (dir.join("root"), dir.join("control"));
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    Package { deb, root, control }
}

impl Package {
    fn field(&self, name: &str) -> String {
        stdout(Command::new("dpkg-deb").arg("-f").arg(&self.deb).arg(name))
            .trim()
            .to_owned()
    }

    /// The package names in Depends, without versions or alternatives' bars.
    fn depends(&self) -> BTreeSet<String> {
        self.field("Depends")
            .split([',', '|'])
            .filter_map(|d| d.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    fn installed(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn text(&self, path: &str) -> String {
        std::fs::read_to_string(self.installed(path))
            .unwrap_or_else(|e| panic!("{path} is not in the package: {e}"))
    }

    /// `dpkg-deb -c`: each path with its mode and owner as the archive holds them.
    fn listing(&self) -> Vec<(String, String, String)> {
        stdout(Command::new("dpkg-deb").arg("-c").arg(&self.deb))
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let path = f[5].trim_start_matches('.').trim_end_matches('/');
                (path.to_owned(), f[0].to_owned(), f[1].to_owned())
            })
            .collect()
    }

    /// The unit's settings, comments left out.
    fn unit(&self) -> Vec<(String, String)> {
        self.text("/usr/lib/systemd/system/pgpushd.service")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect()
    }

    fn unit_setting(&self, key: &str) -> String {
        let values: Vec<String> = self
            .unit()
            .into_iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(values.len(), 1, "{key}: {values:?}");
        values[0].clone()
    }
}

#[test]
fn every_path_the_unit_names_is_in_the_package_made_by_postinst_or_a_dependency() {
    let Some(p) = package() else { return };
    let depends = p.depends();
    // The directories postinst makes (the unit's credentials directory).
    let made: Vec<String> = recorded_calls(p, "postinst", &["configure"], &[], &[])
        .lines
        .iter()
        .filter_map(|c| c.strip_prefix("mkdir -p -m 0700 "))
        .map(str::to_owned)
        .collect();
    let mut checked = Vec::new();
    for (key, value) in p.unit() {
        for word in value.split_whitespace() {
            let word = word.strip_prefix("file://").unwrap_or(word);
            // LoadCredential=ID:PATH: a directory, which postinst makes.
            let path = match word.split_once(':') {
                Some((_, path)) if key == "LoadCredential" => {
                    assert!(
                        made.iter().any(|m| m == path),
                        "{path}: postinst made {made:?}"
                    );
                    checked.push(format!("{key}: {path}"));
                    continue;
                }
                _ => word,
            };
            if !path.starts_with('/') {
                continue;
            }
            let must_exist = path;
            checked.push(format!("{key}: {path}"));
            if p.installed(must_exist).exists() {
                continue;
            }
            // Not ours: a package this one depends on must hold it.
            let owner = Command::new("dpkg")
                .args(["-S", must_exist])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let owner = owner.as_deref().and_then(|o| o.split(':').next());
            assert!(
                owner.is_some_and(|o| depends.contains(o)),
                "{key} names {must_exist}, which is neither in the package nor in a \
                 package it depends on (owner here: {owner:?}; Depends: {depends:?})"
            );
        }
    }
    // The ones that matter are among them.
    for expected in [
        "ExecStart: /usr/bin/pgpushd",
        "ExecStart: /etc/pgpushd/pgpushd.toml",
        "ExecReload: /bin/kill",
        "Documentation: /usr/share/doc/pgpushd/README.md",
    ] {
        assert!(checked.iter().any(|c| c == expected), "{checked:?}");
    }
    assert!(checked
        .iter()
        .any(|c| c == "LoadCredential: /etc/pgpushd/credentials"));
}

/// The template unit for one daemon per database ships beside the unit, as written.
#[test]
fn the_package_ships_the_template_unit() {
    let Some(p) = package() else { return };
    let shipped = p.text("/usr/lib/systemd/system/pgpushd@.service");
    let source = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/pgpushd@.service"),
    )
    .unwrap();
    assert_eq!(shipped, source);
    assert!(shipped.contains("ExecStart=/usr/bin/pgpushd run --config /etc/pgpushd/%i.toml"));
}

#[test]
fn the_packaged_binary_runs_and_is_the_packages_version() {
    let Some(p) = package() else { return };
    let bin = p.installed("/usr/bin/pgpushd");
    let mode = std::fs::metadata(&bin).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    let version = stdout(Command::new(&bin).arg("--version"));
    let deb_version = p.field("Version");
    let upstream = deb_version
        .rsplit_once('-')
        .map_or(&*deb_version, |(u, _)| u);
    assert_eq!(version.trim(), format!("pgpushd {upstream}"));
    assert_eq!(p.field("Package"), "pgpushd");
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(p.field("Architecture"), arch.trim());
}

#[test]
fn the_config_is_a_conffile_that_only_root_and_the_service_group_read() {
    let Some(p) = package() else { return };
    let conffiles = std::fs::read_to_string(p.control.join("conffiles")).unwrap();
    assert_eq!(
        conffiles.lines().collect::<Vec<_>>(),
        ["/etc/pgpushd/pgpushd.toml"]
    );
    // Byte for byte the example config the docs and tests describe.
    assert_eq!(
        p.text("/etc/pgpushd/pgpushd.toml"),
        std::fs::read_to_string(Path::new(ROOT).join("systemd/pgpushd.toml")).unwrap()
    );
    let listing = p.listing();
    let entry = listing
        .iter()
        .find(|(path, _, _)| path == "/etc/pgpushd/pgpushd.toml")
        .unwrap();
    // dpkg unpacks it root:root 0640; postinst's statoverride adds the group (below).
    assert_eq!((&*entry.1, &*entry.2), ("-rw-r-----", "0/0"), "{entry:?}");
    // Everything else is root's and world-readable.
    for (path, mode, owner) in &listing {
        assert_eq!(owner, "0/0", "{path}");
        if path != "/etc/pgpushd/pgpushd.toml" && !mode.starts_with('d') {
            assert!(
                mode.ends_with("r--") || mode.ends_with("r-x"),
                "{path} {mode}"
            );
        }
    }
}

#[test]
fn the_docs_and_the_monitoring_files_are_shipped() {
    let Some(p) = package() else { return };
    let doc = "/usr/share/doc/pgpushd";
    for file in ["README.md", "ARCHITECTURE.md", "copyright"] {
        assert!(p.installed(&format!("{doc}/{file}")).is_file(), "{file}");
    }
    for dir in ["docs", "sql", "contrib/grafana", "contrib/prometheus"] {
        let shipped: Vec<_> = std::fs::read_dir(Path::new(ROOT).join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(!shipped.is_empty(), "{dir}");
        for name in shipped {
            let path = format!("{doc}/{dir}/{}", name.to_str().unwrap());
            assert!(p.installed(&path).is_file(), "{path} is missing");
        }
    }
    // The README's links into docs/ resolve there too.
    assert!(p
        .text(&format!("{doc}/README.md"))
        .contains("(docs/operations.md"));
}

#[test]
fn the_sysusers_entry_creates_the_user_and_group_the_unit_runs_as() {
    let Some(p) = package() else { return };
    let (user, group) = (p.unit_setting("User"), p.unit_setting("Group"));
    let entry = p.text("/usr/lib/sysusers.d/pgpushd.conf");
    let line = entry
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap();
    assert!(line.starts_with(&format!("u {user} ")), "{line}");
    if !works("systemd-sysusers", &["--version"]) {
        // The entry's text is checked; applying it needs the tool.
        return crate::support::skip_without("systemd-sysusers");
    }
    // Applied for real, to a copy of the extracted tree: the user and its group appear in
    // its /etc, not the machine's.
    let scratch = tempfile::tempdir().unwrap();
    let sysusers = scratch.path().join("usr/lib/sysusers.d");
    std::fs::create_dir_all(&sysusers).unwrap();
    std::fs::create_dir(scratch.path().join("etc")).unwrap();
    std::fs::write(sysusers.join("pgpushd.conf"), &entry).unwrap();
    run(Command::new("systemd-sysusers").arg(format!("--root={}", scratch.path().display())));
    let passwd = std::fs::read_to_string(scratch.path().join("etc/passwd")).unwrap();
    let groups = std::fs::read_to_string(scratch.path().join("etc/group")).unwrap();
    let fields: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{user}:")))
        .unwrap_or_else(|| panic!("no {user} in\n{passwd}"))
        .split(':')
        .collect();
    let gid = groups
        .lines()
        .find(|l| l.starts_with(&format!("{group}:")))
        .unwrap_or_else(|| panic!("no {group} in\n{groups}"))
        .split(':')
        .nth(2)
        .unwrap();
    assert_eq!(fields[3], gid, "{user}'s primary group is {group}");
    assert!(fields[2].parse::<u32>().unwrap() < 1000, "a system user");
    assert_eq!(fields[6], "/usr/sbin/nologin");
}

/// What a maintainer script called, one command a line, whether systemd appeared to
/// run, and what it printed.
struct Calls {
    lines: Vec<String>,
    booted: bool,
    said: String,
}

impl Calls {
    /// Compares with `expected`, leaving out the calls a script rightly skips where
    /// systemd does not run (when no mount namespace could pretend it does).
    fn are(&self, expected: &[&str]) {
        let expected: Vec<&str> = expected
            .iter()
            .copied()
            .filter(|c| {
                self.booted || !(c.starts_with("systemctl ") || c.starts_with("deb-systemd-"))
            })
            .collect();
        assert_eq!(self.lines, expected);
    }
}

/// Runs a maintainer script with `args`, each command it may call replaced by a recorder
/// (PATH holds nothing else, so a command it calls that is not listed fails the script),
/// leaving out the recorders named in `without`. `overridden`: the paths that already have
/// a dpkg-statoverride. Where root may make a mount namespace, `/run/systemd/system`
/// exists inside it, as on a machine booted with systemd; else the machine's own says.
fn recorded_calls(
    p: &Package,
    script: &str,
    args: &[&str],
    without: &[&str],
    overridden: &[&str],
) -> Calls {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = dir.path().join("calls");
    std::fs::write(&log, "").unwrap();
    let recorders = [
        ("systemctl", ""),
        ("systemd-sysusers", ""),
        ("adduser", ""),
        (
            "dpkg-statoverride",
            // `--list PATH` succeeds for the paths in $OVERRIDDEN.
            "[ \"$1\" = --list ] || exit 0\n\
             case \" $OVERRIDDEN \" in *\" $2 \"*) exit 0 ;; *) exit 1 ;; esac\n",
        ),
        // `getent passwd pgpushd`: no such user.
        ("getent", "exit 2\n"),
        ("deb-systemd-invoke", ""),
        ("rm", ""),
        ("mkdir", ""),
        ("rmdir", ""),
    ];
    for (name, body) in recorders {
        if without.contains(&name) {
            continue;
        }
        let path = bin.join(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"{name} $*\" >> \"$CALLS\"\n{body}exit 0\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let script = p.control.join(script);
    let namespace = works("unshare", &["--mount", "true"]);
    let mut cmd = if namespace {
        // /run is a tmpfs of the namespace's own: the machine's is untouched.
        let mut c = Command::new("unshare");
        c.args([
            "--mount",
            "/bin/sh",
            "-c",
            "mount -t tmpfs pgpushd-test /run && mkdir -p /run/systemd/system \
             && PATH=\"$RECORDERS\" exec /bin/sh \"$@\"",
            "sh",
        ]);
        c
    } else {
        let mut c = Command::new("/bin/sh");
        c.env("PATH", &bin);
        c
    };
    let out = cmd
        .arg(&script)
        .args(args)
        .env("RECORDERS", &bin)
        .env("CALLS", &log)
        .env("OVERRIDDEN", overridden.join(" "))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Calls {
        lines: std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect(),
        booted: namespace || Path::new("/run/systemd/system").is_dir(),
        said: String::from_utf8(out.stdout).unwrap(),
    }
}

#[test]
fn the_maintainer_scripts_are_valid_shell() {
    let Some(p) = package() else { return };
    for script in ["postinst", "prerm", "postrm"] {
        let path = p.control.join(script);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "{script}");
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("#!/bin/sh\n"));
        run(Command::new("sh").arg("-n").arg(&path));
        // The packaged script is the one in pkg/deb/.
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(Path::new(ROOT).join("pkg/deb").join(script)).unwrap()
        );
    }
}

const SETUP: [&str; 6] = [
    "dpkg-statoverride --list /etc/pgpushd",
    "dpkg-statoverride --update --add root pgpushd 0750 /etc/pgpushd",
    "dpkg-statoverride --list /etc/pgpushd/pgpushd.toml",
    "dpkg-statoverride --update --add root pgpushd 0640 /etc/pgpushd/pgpushd.toml",
    "mkdir -p -m 0700 /etc/pgpushd/credentials",
    "systemctl --system daemon-reload",
];

#[test]
fn postinst_creates_the_user_and_sets_the_configs_group_but_never_starts_the_service() {
    let Some(p) = package() else { return };
    // A first install, and an upgrade: the same, and no (re)start either time.
    for args in [&["configure"][..], &["configure", "0.0.9-1"]] {
        let mut expected = vec!["systemd-sysusers /usr/lib/sysusers.d/pgpushd.conf"];
        expected.extend(SETUP);
        recorded_calls(p, "postinst", args, &[], &[]).are(&expected);
    }

    // Without systemd-sysusers: adduser makes the same user as the sysusers entry.
    let mut expected = vec![
        "getent passwd pgpushd",
        "adduser --system --group --no-create-home --home / --shell /usr/sbin/nologin \
         --gecos pgpushd push notification daemon pgpushd",
    ];
    expected.extend(SETUP);
    recorded_calls(p, "postinst", &["configure"], &["systemd-sysusers"], &[]).are(&expected);
    let entry = p.text("/usr/lib/sysusers.d/pgpushd.conf");
    assert!(
        entry.contains("u pgpushd - \"pgpushd push notification daemon\" / /usr/sbin/nologin"),
        "{entry}"
    );

    // An admin's own override of the config's owner or mode is kept.
    recorded_calls(
        p,
        "postinst",
        &["configure"],
        &[],
        &["/etc/pgpushd/pgpushd.toml"],
    )
    .are(&[
        "systemd-sysusers /usr/lib/sysusers.d/pgpushd.conf",
        SETUP[0],
        SETUP[1],
        SETUP[2],
        SETUP[4],
        SETUP[5],
    ]);

    // dpkg's error unwinding calls nothing at all.
    for args in [&["abort-upgrade", "0.2.0-1"][..], &["abort-remove"]] {
        recorded_calls(p, "postinst", args, &[], &[]).are(&[]);
    }
}

#[test]
fn removal_stops_the_service_and_purge_undoes_what_postinst_did() {
    let Some(p) = package() else { return };
    recorded_calls(p, "prerm", &["remove"], &[], &[])
        .are(&["deb-systemd-invoke stop pgpushd.service"]);
    // An upgrade leaves the running daemon alone until the admin has migrated.
    recorded_calls(p, "prerm", &["upgrade", "0.2.0-1"], &[], &[]).are(&[]);
    recorded_calls(p, "postrm", &["remove"], &[], &[]).are(&["systemctl --system daemon-reload"]);
    let overridden = ["/etc/pgpushd/pgpushd.toml", "/etc/pgpushd"];
    recorded_calls(p, "postrm", &["purge"], &[], &overridden).are(&[
        "dpkg-statoverride --list /etc/pgpushd/pgpushd.toml",
        "dpkg-statoverride --remove /etc/pgpushd/pgpushd.toml",
        "dpkg-statoverride --list /etc/pgpushd",
        "dpkg-statoverride --remove /etc/pgpushd",
        "rm -f /etc/systemd/system/multi-user.target.wants/pgpushd.service",
        "rmdir --ignore-fail-on-non-empty /etc/pgpushd/credentials /etc/pgpushd",
        "systemctl --system daemon-reload",
    ]);
}

/// Issue 20, item 11: a first install says what to edit for the unit to start, in the
/// unit's own terms: where the credential files go (its `LoadCredential=` directory), how
/// the config names them (where systemd puts that directory's files), which keys.
#[test]
fn postinst_says_where_the_credentials_go_and_what_to_edit() {
    let Some(p) = package() else { return };
    let unit = p.text("/usr/lib/systemd/system/pgpushd.service");
    let credentials = crate::systemd::load_credentials(&unit);
    let [(id, directory)] = &credentials[..] else {
        panic!("{credentials:?}")
    };
    let note = recorded_calls(p, "postinst", &["configure"], &[], &[]).said;
    for expected in [
        format!("{}/", directory.display()),
        "/etc/pgpushd/pgpushd.toml".to_owned(),
        format!("\"/run/credentials/pgpushd.service/{id}_FILE\""),
        "[database] url".to_owned(),
        "key_file".to_owned(),
        "passphrase_file".to_owned(),
        "service_account_file".to_owned(),
        "'pgpushd migrate'".to_owned(),
        "'systemctl enable --now pgpushd'".to_owned(),
    ] {
        assert!(note.contains(&expected), "no {expected} in:\n{note}");
    }
    assert_eq!(
        directory.to_str(),
        Some(crate::systemd::CREDENTIALS_DIRECTORY)
    );
    // An upgrade says to migrate and restart, not the first install's steps.
    let note = recorded_calls(p, "postinst", &["configure", "0.0.9-1"], &[], &[]).said;
    assert!(note.contains("upgraded from 0.0.9-1"), "{note}");
    assert!(!note.contains("To set it up"), "{note}");
}

/// What the script below prints after each step, `@name value` lines.
const ON_A_COPY: &str = r#"
set -e
show() {
    echo "@owner $(stat -c '%U:%G %a' /etc/pgpushd) $(stat -c '%U:%G %a' /etc/pgpushd/pgpushd.toml) $(stat -c '%U:%G %a' /etc/pgpushd/credentials)"
}
echo "@note $(dpkg -i /pgpushd.deb | grep -c 'credential files in /etc/pgpushd/credentials/')"
echo "@user $(getent passwd pgpushd | cut -d: -f1,6,7)"
show
if setpriv --reuid pgpushd --regid pgpushd --clear-groups cat /etc/pgpushd/pgpushd.toml >/dev/null 2>&1; then
    echo "@service-reads-config yes"
fi
if ! setpriv --reuid pgpushd --regid pgpushd --clear-groups ls /etc/pgpushd/credentials >/dev/null 2>&1; then
    echo "@service-reads-credentials-directory no"
fi
echo "@version $(/usr/bin/pgpushd --version)"
# The key where earlier packages' unit loaded it: the upgrade says to move it.
echo key > /etc/pgpushd/AuthKey_ABC123DEFG.p8
echo "@upgrade-note $(dpkg -i /pgpushd.deb | grep -c 'no longer loads /etc/pgpushd/AuthKey_ABC123DEFG.p8')"
show
ln -s /usr/lib/systemd/system/pgpushd.service /etc/systemd/system/multi-user.target.wants/pgpushd.service
dpkg --remove pgpushd >/dev/null
echo "@after-remove $(test -e /etc/pgpushd/pgpushd.toml && echo config-kept) $(test -d /etc/pgpushd/credentials && echo credentials-kept)"
dpkg --purge pgpushd >/dev/null 2>&1
echo "@after-purge $(ls -A /etc/pgpushd) $(dpkg-statoverride --list | grep -c pgpushd || true) overrides $(test -L /etc/systemd/system/multi-user.target.wants/pgpushd.service && echo enabled) user:$(getent passwd pgpushd | cut -d: -f1)"
rm /etc/pgpushd/AuthKey_ABC123DEFG.p8
dpkg -i /pgpushd.deb >/dev/null
dpkg --purge pgpushd >/dev/null
echo "@after-second-purge $(test -e /etc/pgpushd && echo config-dir)"
"#;

#[test]
fn the_package_installs_upgrades_and_purges_on_a_copy_of_this_machine() {
    let Some(p) = package() else { return };
    // dpkg for real, in a chroot onto an overlay of this machine's root, in a mount
    // namespace of its own: the machine itself is untouched.
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: installing on an overlay of / needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (upper, work, merged) = (
        dir.path().join("upper"),
        dir.path().join("work"),
        dir.path().join("merged"),
    );
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::copy(&p.deb, upper.join("pgpushd.deb")).unwrap();
    let setup = format!(
        "mount -t overlay overlay -o lowerdir=/,upperdir={},workdir={} {m} || exit 97
         mount --bind /proc {m}/proc && mount --bind /dev {m}/dev \
         && mount -t tmpfs tmpfs {m}/run && mount -t tmpfs tmpfs {m}/tmp \
         && mkdir -p {m}/etc/systemd/system/multi-user.target.wants \
         && exec chroot {m} /bin/sh -c \"$SCRIPT\"",
        upper.display(),
        work.display(),
        m = merged.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--fork", "/bin/sh", "-c", &setup])
        .env("SCRIPT", ON_A_COPY)
        .output()
        .unwrap();
    if out.status.code() == Some(97) {
        eprintln!(
            "SKIPPED: no overlay of / here: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said: Vec<&str> = text.lines().filter(|l| l.starts_with('@')).collect();
    let version = format!(
        "@version pgpushd {}",
        p.field("Version").rsplit_once('-').unwrap().0
    );
    assert_eq!(
        said,
        [
            "@note 1",
            "@user pgpushd:/:/usr/sbin/nologin",
            "@owner root:pgpushd 750 root:pgpushd 640 root:root 700",
            "@service-reads-config yes",
            "@service-reads-credentials-directory no",
            &version,
            "@upgrade-note 1",
            // An upgrade keeps them.
            "@owner root:pgpushd 750 root:pgpushd 640 root:root 700",
            "@after-remove config-kept credentials-kept",
            // Purge: no config, no empty credentials directory, no overrides, no enable
            // link; the admin's key and the user stay.
            "@after-purge AuthKey_ABC123DEFG.p8 0 overrides  user:pgpushd",
            // With nothing of the admin's left, nothing at all.
            "@after-second-purge ",
        ]
    );
}
