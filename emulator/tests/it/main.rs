//! The emulator's integration tests, one binary, a module per protocol: each drives the
//! emulator through its public API with a client written here, from Apple's (or, for
//! `fcm`, Google's; for `webpush`, the RFCs') description of the protocol.

mod binary;
mod channels;
mod cli;
mod fcm;
mod http2;
mod node_apn;
mod untrusted;
mod webpush;

/// A tool a test needs is missing: the test says SKIPPED and returns, except under
/// `CI=true`, where every tool must be installed and a missing one fails the test.
pub fn skip_without(tool: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{tool} is missing, and CI=true: every tool the tests use must be there");
    }
    eprintln!("SKIPPED: {tool} is missing");
}
