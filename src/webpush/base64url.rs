//! Base64url as Web Push writes it (RFC 4648, section 5): what browsers put in a
//! subscription's keys, what web-push tools print for a VAPID key, what the `vapid`
//! authorization carries. Read with or without `=` padding, written without.

use base64::alphabet::URL_SAFE;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// Reads both forms: `PushSubscription.toJSON()` pads nothing, some servers that
/// re-encode the keys do.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The bytes of `text`, or `None` when it is not base64url (never says which character,
/// so no caller echoes key material).
pub fn decode(text: &str) -> Option<Vec<u8>> {
    LENIENT.decode(text).ok()
}

/// `bytes` in base64url without padding.
pub fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_optional_and_the_standard_alphabet_refused() {
        assert_eq!(decode("BTBZMqHH6r4Tts7J_aSIgg").unwrap().len(), 16);
        assert_eq!(
            decode("BTBZMqHH6r4Tts7J_aSIgg=="),
            decode("BTBZMqHH6r4Tts7J_aSIgg")
        );
        assert_eq!(decode("BTBZMqHH6r4Tts7J/aSIgg"), None);
        assert_eq!(decode("not base64!"), None);
        assert_eq!(encode(&[0xfb, 0xff]), "-_8");
    }
}
