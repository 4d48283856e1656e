//! Property tests of every parser of untrusted bytes in the daemon: random and mutated
//! input never panics, and what is accepted is consistent with what was given.
//! - the binary protocol's error packets and feedback tuples (from the gateway);
//! - APNs answers (status and body from the server);
//! - the config file (from the operator).

use std::path::Path;
use std::time::UNIX_EPOCH;

use pgpushd::apns::binary::frame::{decode_feedback, ErrorPacket, ERROR_PACKET_LEN};
use pgpushd::apns::http2::response::{verdict, Answer};
use pgpushd::config::Config;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn error_packets_decode_or_refuse(bytes in any::<[u8; ERROR_PACKET_LEN]>()) {
        match ErrorPacket::decode(&bytes) {
            Ok(p) => {
                prop_assert_eq!(bytes[0], 8);
                prop_assert_eq!(p.encode(), bytes);
            }
            Err(_) => prop_assert_ne!(bytes[0], 8),
        }
    }

    #[test]
    fn feedback_tuples_never_read_past_the_input(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut rest = &bytes[..];
        while let Some((t, used)) = decode_feedback(rest) {
            prop_assert!(used >= 6 && used <= rest.len());
            prop_assert_eq!(used, 6 + t.token.len());
            rest = &rest[used..];
        }
    }

    #[test]
    fn any_answer_has_a_verdict(status in any::<u16>(), body in proptest::collection::vec(any::<u8>(), 0..300), id in proptest::option::of("[ -~]{0,40}")) {
        let _ = verdict(&Answer { status, apns_id: id, body: body.into() }, UNIX_EPOCH);
    }

    #[test]
    fn any_json_answer_has_a_verdict(status in 100u16..600, reason in "[A-Za-z]{0,30}", timestamp in any::<i64>()) {
        let body = format!(r#"{{"reason":"{reason}","timestamp":{timestamp}}}"#);
        let _ = verdict(&Answer { status, apns_id: None, body: body.into_bytes().into() }, UNIX_EPOCH);
    }

    #[test]
    fn a_mutated_config_file_is_an_error_or_a_config(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cut in any::<usize>(),
    ) {
        let example = include_str!("../../systemd/pgpushd.toml");
        let mut bytes = example.as_bytes().to_vec();
        for (at, byte) in flips {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = Config::from_file_str(Path::new("/etc/pgpushd/pgpushd.toml"), text, None);
        }
    }

    /// Real sections and keys with random values, durations from tiny to absurd
    /// (`"584000000000y"` once made the daemon panic downstream).
    #[test]
    fn random_values_for_real_keys_are_an_error_or_a_config(
        lines in proptest::collection::vec(
            (
                prop_oneof![
                    Just("database"), Just("retry"), Just("daemon"), Just("log"),
                    Just("metrics"), Just("retention"), Just("apps.default"),
                    Just("apps.default.token"), Just("apps.default.certificate"),
                ],
                prop_oneof![
                    Just("url"), Just("poll_interval"), Just("batch_size"),
                    Just("max_batches_in_flight"), Just("keepalive_interval"),
                    Just("connect_timeout"), Just("awake_poll_interval"), Just("awake_linger"),
                    Just("max_attempts"), Just("backoff_base"), Just("backoff_max"),
                    Just("shutdown_timeout"), Just("level"), Just("listen"), Just("sent"),
                    Just("interval"), Just("topic"), Just("endpoint"), Just("protocol"),
                    Just("connections"), Just("request_timeout"), Just("binary_settle"),
                    Just("feedback_interval"), Just("key_file"), Just("key_id"),
                    Just("team_id"), Just("file"),
                ],
                prop_oneof![
                    "\"[0-9]{1,22}(ns|us|ms|s|m|h|d|y)\"",
                    "-?[0-9]{1,25}",
                    "\"[ -~]{0,30}\"",
                    Just("true".to_owned()),
                ],
            ),
            1..8,
        ),
    ) {
        let mut text = String::from("[database]\nurl = \"postgres://u@h/d\"\n");
        for (section, key, value) in lines {
            text.push_str(&format!("[{section}]\n{key} = {value}\n"));
        }
        if let Ok(c) = Config::from_file_str(Path::new("/etc/pgpushd/pgpushd.toml"), &text, None) {
            every_duration_is_usable(&c);
        }
    }
}

/// What the daemon does with durations (`Instant + d`, `d * 2`) cannot overflow.
fn every_duration_is_usable(c: &Config) {
    let d = &c.database;
    let mut all = vec![
        d.poll_interval,
        d.keepalive_interval,
        d.connect_timeout,
        d.awake_poll_interval,
        d.awake_linger,
        c.retry.backoff_base,
        c.retry.backoff_max,
        c.daemon.shutdown_timeout,
        c.retention.interval,
    ];
    all.extend(
        [c.retention.sent, c.retention.failed, c.retention.expired]
            .into_iter()
            .flatten(),
    );
    for app in c.apps.values() {
        all.push(app.request_timeout);
        all.push(app.binary.settle);
        all.extend(app.binary.feedback.as_ref().map(|f| f.interval));
    }
    let now = std::time::Instant::now();
    for d in all {
        assert!(
            d.checked_mul(4)
                .and_then(|d4| now.checked_add(d4))
                .is_some(),
            "{d:?} in {c:?}"
        );
    }
}
