//! The emulator's integration tests, one binary, a module per protocol: each drives the
//! emulator through its public API with a client written here, from Apple's (or, for
//! `fcm`, Google's) description of the protocol.

mod binary;
mod cli;
mod fcm;
mod http2;
mod node_apn;
mod untrusted;
