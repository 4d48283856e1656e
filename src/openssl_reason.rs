//! OpenSSL's errors as one line for a user: what went wrong loading a key or certificate.

/// OpenSSL's reasons ("bad decrypt", "unsupported"), without file names and line numbers
/// of OpenSSL's own source, and never any data.
pub fn openssl_reason(e: &openssl::error::ErrorStack) -> String {
    let reasons: Vec<&str> = e.errors().iter().filter_map(|e| e.reason()).collect();
    match reasons.is_empty() {
        true => "unknown OpenSSL error".to_owned(),
        false => reasons.join(", "),
    }
}
