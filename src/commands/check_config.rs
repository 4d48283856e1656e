//! `pgpushd check-config`: the file, and every file it names (keys, certificates, the
//! database's root certificate), loaded as `run` would, without connecting anywhere.

use std::path::Path;

use crate::config::Config;

/// Every problem of `config` (read from `path`), each a line naming the file; with a note
/// when a problem is a systemd credential, which a shell cannot read.
pub fn problems(path: &Path, config: &Config) -> Vec<String> {
    let mut problems: Vec<String> = config
        .database
        .check_tls_files()
        .into_iter()
        .map(|p| format!("{}: {p}", path.display()))
        .collect();
    problems.extend(crate::providers::check(config));
    if std::env::var_os("CREDENTIALS_DIRECTORY").is_none()
        && problems.iter().any(|p| p.contains("/run/credentials/"))
    {
        problems.push(
            "note: files under /run/credentials/ are systemd credentials, which exist only \
             inside the running service (the packaged unit copies them there from \
             /etc/pgpushd/credentials/): `systemctl start pgpushd` checks them (its problems \
             show in `systemctl status pgpushd`)"
                .to_owned(),
        );
    }
    problems
}
