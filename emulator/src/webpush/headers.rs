//! The push request's own headers (RFC 8030 §5.2–§5.4, and the content coding of RFC
//! 8291 §4), each checked by a pure function: `TTL`, `Urgency`, `Topic` and
//! `Content-Encoding`. A problem is answered 400 (415 for the content coding), naming
//! the header.

use std::fmt;

/// The TTL the service keeps a message at most, and says so in its answer's `TTL` header
/// when asked for more (RFC 8030 §5.2 lets a push service shorten it): 60 days, as
/// Mozilla's push service does.
pub const MAX_TTL_SECS: u64 = 60 * 24 * 60 * 60;

/// A header's problem; the text is what the answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    NoTtl,
    BadTtl(String),
    BadUrgency(String),
    TopicTooLong(usize),
    TopicAlphabet(String),
    EmptyTopic,
    /// No `Content-Encoding` on a push with a body.
    NoContentEncoding,
    ContentEncoding(String),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::NoTtl => f.write_str("no TTL header (RFC 8030 §5.2 requires one)"),
            HeaderError::BadTtl(v) => write!(
                f,
                "the TTL header {v:?} is not a number of seconds (a non-negative integer)"
            ),
            HeaderError::BadUrgency(v) => write!(
                f,
                "the Urgency header {v:?} is not one of very-low, low, normal, high"
            ),
            HeaderError::TopicTooLong(n) => {
                write!(
                    f,
                    "the Topic header is {n} characters; at most 32 are allowed"
                )
            }
            HeaderError::TopicAlphabet(v) => write!(
                f,
                "the Topic header {v:?} has characters outside the base64url alphabet"
            ),
            HeaderError::EmptyTopic => f.write_str("the Topic header is empty"),
            HeaderError::NoContentEncoding => f.write_str(
                "a push with a body needs Content-Encoding: aes128gcm (RFC 8291); none was given",
            ),
            HeaderError::ContentEncoding(v) => write!(
                f,
                "the Content-Encoding {v:?} is not supported; Web Push uses aes128gcm (RFC 8291)"
            ),
        }
    }
}

impl std::error::Error for HeaderError {}

/// `TTL: delta-seconds` (one or more digits). Numbers too large for 64 bits count as
/// the largest, as HTTP caches do with delta-seconds.
pub fn ttl(value: Option<&str>) -> Result<u64, HeaderError> {
    let value = value.ok_or(HeaderError::NoTtl)?.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeaderError::BadTtl(value.to_owned()));
    }
    Ok(value.parse().unwrap_or(u64::MAX))
}

/// RFC 8030 §5.3's urgencies, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Urgency {
    VeryLow,
    Low,
    Normal,
    High,
}

impl Urgency {
    pub fn as_str(self) -> &'static str {
        match self {
            Urgency::VeryLow => "very-low",
            Urgency::Low => "low",
            Urgency::Normal => "normal",
            Urgency::High => "high",
        }
    }

    /// The ABNF's quoted strings are case-insensitive (RFC 5234 §2.3), so `High` is
    /// `high`.
    pub fn parse(text: &str) -> Option<Urgency> {
        [
            Urgency::VeryLow,
            Urgency::Low,
            Urgency::Normal,
            Urgency::High,
        ]
        .into_iter()
        .find(|u| u.as_str().eq_ignore_ascii_case(text.trim()))
    }
}

impl fmt::Display for Urgency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Urgency`, when present; absent means `normal` to the service (returned as `None`,
/// so the record says what was sent).
pub fn urgency(value: Option<&str>) -> Result<Option<Urgency>, HeaderError> {
    value
        .map(|v| Urgency::parse(v).ok_or_else(|| HeaderError::BadUrgency(v.to_owned())))
        .transpose()
}

/// `Topic`, when present: 1 to 32 characters of the base64url alphabet (RFC 8030 §5.4).
pub fn topic(value: Option<&str>) -> Result<Option<String>, HeaderError> {
    let Some(topic) = value else { return Ok(None) };
    if topic.is_empty() {
        return Err(HeaderError::EmptyTopic);
    }
    if topic.chars().count() > 32 {
        return Err(HeaderError::TopicTooLong(topic.chars().count()));
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(HeaderError::TopicAlphabet(topic.to_owned()));
    }
    Ok(Some(topic.to_owned()))
}

/// `Content-Encoding` must be `aes128gcm` (content codings are case-insensitive, RFC
/// 9110 §8.4.1). A push without a body needs none: RFC 8030 §5 allows a message with no
/// data, which the browser shows as a push event without data.
///
/// Another coding is answered 415 Unsupported Media Type, which RFC 9110 §15.5.16 names
/// for "a content coding ... not supported" by the target resource; `aesgcm`, the coding
/// of earlier drafts, gets 415 as well.
pub fn content_encoding(value: Option<&str>, has_body: bool) -> Result<(), HeaderError> {
    match value.map(str::trim) {
        Some(v) if v.eq_ignore_ascii_case("aes128gcm") => Ok(()),
        Some(v) => Err(HeaderError::ContentEncoding(v.to_owned())),
        None if has_body => Err(HeaderError::NoContentEncoding),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(ttl(Some("0")), Ok(0));
        assert_eq!(ttl(Some("60")), Ok(60));
        assert_eq!(ttl(Some(" 86400 ")), Ok(86400));
        assert_eq!(ttl(Some("99999999999999999999999")), Ok(u64::MAX));
        assert_eq!(ttl(None), Err(HeaderError::NoTtl));
        for bad in ["", "-1", "+5", "1.5", "ten", "1e3", "0x10"] {
            assert_eq!(
                ttl(Some(bad)),
                Err(HeaderError::BadTtl(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn urgencies() {
        assert_eq!(urgency(None), Ok(None));
        assert_eq!(urgency(Some("very-low")), Ok(Some(Urgency::VeryLow)));
        assert_eq!(urgency(Some("low")), Ok(Some(Urgency::Low)));
        assert_eq!(urgency(Some("normal")), Ok(Some(Urgency::Normal)));
        assert_eq!(urgency(Some("High")), Ok(Some(Urgency::High)));
        for bad in ["", "urgent", "very low", "verylow", "10"] {
            assert_eq!(
                urgency(Some(bad)),
                Err(HeaderError::BadUrgency(bad.into())),
                "{bad}"
            );
        }
        assert!(Urgency::VeryLow < Urgency::High);
    }

    #[test]
    fn topics() {
        assert_eq!(topic(None), Ok(None));
        assert_eq!(topic(Some("news_1-A")), Ok(Some("news_1-A".into())));
        let longest = "a".repeat(32);
        assert_eq!(topic(Some(&longest)), Ok(Some(longest.clone())));
        assert_eq!(
            topic(Some(&"a".repeat(33))),
            Err(HeaderError::TopicTooLong(33))
        );
        assert_eq!(topic(Some("")), Err(HeaderError::EmptyTopic));
        for bad in ["a b", "a+b", "a/b", "a=", "é"] {
            assert_eq!(
                topic(Some(bad)),
                Err(HeaderError::TopicAlphabet(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn content_encodings() {
        assert_eq!(content_encoding(Some("aes128gcm"), true), Ok(()));
        assert_eq!(content_encoding(Some("AES128GCM"), true), Ok(()));
        assert_eq!(content_encoding(None, false), Ok(()));
        assert_eq!(content_encoding(Some("aes128gcm"), false), Ok(()));
        assert_eq!(
            content_encoding(None, true),
            Err(HeaderError::NoContentEncoding)
        );
        assert_eq!(
            content_encoding(Some("aesgcm"), true),
            Err(HeaderError::ContentEncoding("aesgcm".into()))
        );
        assert_eq!(
            content_encoding(Some("gzip"), false),
            Err(HeaderError::ContentEncoding("gzip".into()))
        );
    }
}
