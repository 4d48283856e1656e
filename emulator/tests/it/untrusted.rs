//! Property tests of every parser of untrusted bytes the emulator has: random and mutated
//! input never panics, and what it accepts is consistent with what it was given.
//! - the binary protocol's frame decoder (commands 0, 1 and 2);
//! - request validation (path, method, headers, payload);
//! - provider tokens (JWT): a mutated token is never accepted.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{HeaderName, HeaderValue, Method, Request};
use pgpushd_emulator::binary::frame;
use pgpushd_emulator::jwt::TokenKey;
use pgpushd_emulator::validate::{self, AuthMode, Policy};
use proptest::prelude::*;

use crate::http2::{now_secs, sign};

/// A well-formed command-2 frame: token, payload, identifier, expiration, priority.
fn command_2(token: &[u8], payload: &[u8], id: u32) -> Vec<u8> {
    let mut items = Vec::new();
    for (item, data) in [
        (1u8, token.to_vec()),
        (2, payload.to_vec()),
        (3, id.to_be_bytes().to_vec()),
        (4, 0u32.to_be_bytes().to_vec()),
        (5, vec![10]),
    ] {
        items.push(item);
        items.extend_from_slice(&(data.len() as u16).to_be_bytes());
        items.extend_from_slice(&data);
    }
    let mut out = vec![2];
    out.extend_from_slice(&(items.len() as u32).to_be_bytes());
    out.extend_from_slice(&items);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_frame_decoder_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(Some((n, used))) = frame::decode(&bytes) {
            prop_assert!(used > 0 && used <= bytes.len());
            let _ = frame::check(&n);
        }
    }

    #[test]
    fn the_frame_decoder_never_panics_on_mutated_frames(
        payload in "[ -~]{0,64}",
        id in any::<u32>(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let good = command_2(&[7; 32], payload.as_bytes(), id);
        // The unmutated frame decodes whole, to what was written.
        let (n, used) = frame::decode(&good).unwrap().unwrap();
        prop_assert_eq!(used, good.len());
        prop_assert_eq!(n.identifier, Some(id));
        prop_assert_eq!(n.payload.as_deref(), Some(payload.as_bytes()));
        let mut bad = good.clone();
        for (at, byte) in flips {
            let at = at % bad.len();
            bad[at] = byte;
        }
        bad.truncate(cut % (bad.len() + 1));
        if let Ok(Some((n, used))) = frame::decode(&bad) {
            prop_assert!(used <= bad.len());
            let _ = frame::check(&n);
        }
    }

    #[test]
    fn request_validation_never_panics(
        path in "(/3/device/)?[0-9a-fA-Fz/]{0,80}",
        post in any::<bool>(),
        headers in proptest::collection::vec(
            (prop_oneof![
                Just("apns-push-type"), Just("apns-topic"), Just("apns-priority"),
                Just("apns-expiration"), Just("apns-collapse-id"), Just("apns-id"),
                Just("authorization"), Just("x-other"),
            ], "[ -~]{0,80}"),
            0..8,
        ),
        payload in proptest::collection::vec(any::<u8>(), 0..6000),
        token_auth in any::<bool>(),
    ) {
        let mut request = Request::builder()
            .method(if post { Method::POST } else { Method::GET })
            .uri(format!("https://localhost{}", if path.starts_with('/') { path } else { format!("/{path}") }));
        for (name, value) in &headers {
            if let Ok(value) = HeaderValue::from_str(value) {
                request = request.header(HeaderName::from_static(name), value);
            }
        }
        let Ok(request) = request.body(()) else { return Ok(()) };
        let (head, ()) = request.into_parts();
        let policy = Policy {
            bundle: Some("com.example.app".into()),
            auth: if token_auth { AuthMode::Token } else { AuthMode::Certificate },
        };
        if let Ok(checked) = validate::check(&head, &payload, &policy, |_| Ok(())) {
            // Accepted: a JSON object within the push type's limit.
            prop_assert!(!payload.is_empty() && payload.len() <= checked.push_type.max_payload());
            prop_assert!(serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&payload).is_ok());
        }
    }
}

const KEY_ID: &str = "ABC123DEFG";
const TEAM_ID: &str = "DEF123GHIJ";

#[test]
fn provider_tokens_random_or_mutated_are_refused_without_panicking() {
    let p8 = pgpushd_emulator::jwt::generate_signing_key().unwrap();
    let key = TokenKey::from_pem(&p8, KEY_ID, TEAM_ID).unwrap();
    let good = sign(&p8, KEY_ID, TEAM_ID, now_secs());
    assert!(key.verify(good.as_bytes(), now_secs()).is_ok());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(2000));
    runner
        .run(
            &(
                proptest::collection::vec(any::<u8>(), 0..300),
                proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            ),
            |(random, flips)| {
                let _ = key.verify(&random, now_secs());
                let mut bad = good.clone().into_bytes();
                for (at, byte) in flips {
                    let at = at % bad.len();
                    bad[at] = byte;
                }
                if bad != good.as_bytes() {
                    // base64url has spare bits in a segment's last character: a flip
                    // there decodes to the same bytes, which is still the same token.
                    let same = bad.split(|b| *b == b'.').count() == 3
                        && bad
                            .split(|b| *b == b'.')
                            .zip(good.as_bytes().split(|b| *b == b'.'))
                            .all(|(a, b)| {
                                URL_SAFE_NO_PAD.decode(a).ok() == URL_SAFE_NO_PAD.decode(b).ok()
                            });
                    if !same {
                        prop_assert!(key.verify(&bad, now_secs()).is_err());
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}
