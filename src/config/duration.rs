//! serde glue for humantime durations ("5s", "30m", "1h 30m"), for
//! `#[serde(with = "duration")]` and, for keys whose absence means something,
//! `#[serde(with = "duration::optional")]`.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?}: {e} (write it like \"5s\", \"250ms\", \"30m\")"
        ))
    })
}

pub(super) mod optional {
    use serde::Deserializer;
    use std::time::Duration;

    // Only called when the key is present; the field's `#[serde(default)]` covers absence.
    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{parse, MINIMAL};

    #[test]
    fn bad_durations_say_how_to_write_them() {
        let e = parse("[database]\nurl = \"postgres://x@y/z\"\npoll_interval = \"5\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid duration \"5\""), "{e}");
    }

    /// Every duration key, with a value far past its bound. Before the bounds, each of
    /// these parsed, and the daemon panicked later (`Instant + d`, `sleep(d)`, `d * 2`).
    const EVERY_DURATION_KEY: [(&str, &str); 10] = [
        ("database", "poll_interval"),
        ("database", "keepalive_interval"),
        ("database", "connect_timeout"),
        ("retry", "backoff_base"),
        ("retry", "backoff_max"),
        ("apps.a", "request_timeout"),
        ("apps.a", "binary_settle"),
        ("apps.a", "feedback_interval"),
        ("retention", "interval"),
        ("daemon", "shutdown_timeout"),
    ];

    fn with_key(section: &str, key: &str, value: &str) -> String {
        let binary_app = "[apps.a]\nprotocol = \"binary\"\n";
        let cert = "[apps.a.certificate]\nfile = \"ck.pem\"\n";
        if section == "apps.a" {
            // A batch outlives four times any request (config::batch_outlives_requests).
            let batch = "max_batch_duration = \"1h\"\n";
            format!("{MINIMAL}{batch}{binary_app}{key} = \"{value}\"\n{cert}")
        } else if section == "database" {
            format!("{MINIMAL}{key} = \"{value}\"\n")
        } else {
            format!("{MINIMAL}[{section}]\n{key} = \"{value}\"\n")
        }
    }

    #[test]
    fn huge_durations_are_config_errors_naming_the_key() {
        for (section, key) in EVERY_DURATION_KEY {
            for huge in ["584000000000y", "100y", "10000000000000000000s"] {
                let e = parse(&with_key(section, key, huge))
                    .expect_err(&format!("{section}.{key} = {huge:?} was accepted"))
                    .to_string();
                assert!(
                    e.starts_with(&format!("/etc/pgpushd/pgpushd.toml: {section}.{key}: ")),
                    "{section}.{key} = {huge:?}: {e}"
                );
                assert!(e.contains("at most"), "{section}.{key} = {huge:?}: {e}");
            }
        }
    }

    #[test]
    fn durations_too_large_to_represent_name_the_key_too() {
        let e = parse(&with_key(
            "database",
            "poll_interval",
            "99999999999999999999999y",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("database.poll_interval"), "{e}");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn durations_at_their_bounds_are_accepted() {
        for (section, key, max) in [
            ("database", "poll_interval", "1h"),
            ("database", "keepalive_interval", "1h"),
            ("database", "connect_timeout", "10m"),
            ("retry", "backoff_max", "30d"),
            ("apps.a", "request_timeout", "10m"),
            ("apps.a", "binary_settle", "1m"),
            ("apps.a", "feedback_interval", "7d"),
            ("retention", "interval", "1d"),
            ("daemon", "shutdown_timeout", "1h"),
        ] {
            if let Err(e) = parse(&with_key(section, key, max)) {
                panic!("{section}.{key} = {max:?}: {e}");
            }
        }
    }
}
