//! APNs: requests, answers, credentials and connections of the HTTP/2 provider API.

pub mod identity;
pub mod jwt;
pub mod push_type;
pub mod request;
pub mod response;
#[cfg(test)]
mod testutil;

/// The first 8 hex digits of a device token: enough to find it, too little to use it.
pub fn short_token(token: &str) -> &str {
    match token.char_indices().nth(8) {
        Some((i, _)) => &token[..i],
        None => token,
    }
}

/// OpenSSL's reasons ("bad decrypt", "unsupported"), without file names and line numbers
/// of OpenSSL's own source, and never any data.
pub(crate) fn openssl_reason(e: &openssl::error::ErrorStack) -> String {
    let reasons: Vec<&str> = e.errors().iter().filter_map(|e| e.reason()).collect();
    match reasons.is_empty() {
        true => "unknown OpenSSL error".to_owned(),
        false => reasons.join(", "),
    }
}
