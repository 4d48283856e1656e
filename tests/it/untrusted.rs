//! Property tests of every parser of untrusted bytes in the daemon: random and mutated
//! input never panics, and what is accepted is consistent with what was given.
//! - the binary protocol's error packets and feedback tuples (from the gateway);
//! - APNs answers (status and body from the server);
//! - the config file (from the operator);
//! - a proxy's answer to CONNECT (from the network), and proxy URLs and `NO_PROXY` lists
//!   (from the environment).

use std::path::Path;
use std::time::UNIX_EPOCH;

use pgpushd::apns::binary::frame::{decode_feedback, ErrorPacket, ERROR_PACKET_LEN};
use pgpushd::apns::http2::response::{verdict, Answer};
use pgpushd::config::Config;
use pgpushd::host_list::HostList;
use pgpushd::proxy::{handshake, Proxy, TunnelError};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

/// The handshake against a peer that answers `answer` and then closes its side.
fn connect_answered(answer: &[u8]) -> Result<(), TunnelError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (mut client, mut proxy_side) = tokio::io::duplex(64 * 1024);
        proxy_side.write_all(answer).await.unwrap();
        proxy_side.shutdown().await.unwrap();
        let proxy = Proxy::parse("http://127.0.0.1:3128").unwrap();
        let result = handshake(&mut client, &proxy, "api.push.apple.com:443").await;
        drop(proxy_side);
        result
    })
}

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
    fn random_bytes_from_a_proxy_never_open_a_tunnel_unless_they_say_2xx(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        if connect_answered(&bytes).is_ok() {
            prop_assert!(bytes.starts_with(b"HTTP/1."));
            let status = bytes.splitn(2, |b| *b == b' ').nth(1).unwrap();
            prop_assert_eq!(status[0], b'2');
        }
    }

    #[test]
    fn a_proxys_status_decides_the_tunnel(
        minor in 0u8..2,
        code in 100u16..600,
        reason in "[ -~]{0,40}",
        headers in proptest::collection::vec("[A-Za-z-]{1,20}: [ -~]{0,60}", 0..5),
        bare_lf in any::<bool>(),
        tunnel_bytes in proptest::collection::vec(any::<u8>(), 0..50),
    ) {
        let eol = if bare_lf { "\n" } else { "\r\n" };
        let mut answer = format!("HTTP/1.{minor} {code} {reason}{eol}");
        for h in &headers {
            answer.push_str(h);
            answer.push_str(eol);
        }
        answer.push_str(eol);
        let mut bytes = answer.into_bytes();
        bytes.extend_from_slice(&tunnel_bytes);
        match connect_answered(&bytes) {
            Ok(()) => prop_assert!((200..300).contains(&code)),
            Err(TunnelError::Refused { status, .. }) => {
                prop_assert!(!(200..300).contains(&code));
                prop_assert!(status.starts_with(&code.to_string()), "{}", status);
                prop_assert!(!status.contains(['\r', '\n']));
            }
            Err(e) => prop_assert!(false, "{}", e),
        }
    }

    #[test]
    fn proxy_urls_and_no_proxy_lists_never_panic_nor_show_a_password(
        before in "[ -~]{0,30}",
        after in "[ -~]{0,30}",
        host in "[ -~]{0,30}",
        port in any::<u16>(),
    ) {
        for url in [
            format!("{before}u:zqxpassword@{after}"),
            format!("{before}u:zqxpassword@{after}://{host}"),
        ] {
            if let Err(e) = Proxy::parse(&url) {
                prop_assert!(!e.contains("zqxpassword"), "{}", e);
            }
        }
        if let Ok(p) = Proxy::parse(&format!("http://{after}")) {
            prop_assert!(p.port != 0);
        }
        let _ = HostList::parse(&before).matches(&host, port);
        let _ = HostList::parse(&format!("{before},{after}")).matches(&after, port);
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
                    Just("metrics"), Just("retention"), Just("network"), Just("apps.default"),
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
                    Just("team_id"), Just("file"), Just("proxy"),
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
