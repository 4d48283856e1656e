//! APNs: requests, answers, credentials and connections of the HTTP/2 provider API.

pub mod push_type;
pub mod request;
pub mod response;

/// The first 8 hex digits of a device token: enough to find it, too little to use it.
pub fn short_token(token: &str) -> &str {
    match token.char_indices().nth(8) {
        Some((i, _)) => &token[..i],
        None => token,
    }
}
