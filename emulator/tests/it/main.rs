//! The emulator's integration tests, one binary, a module per protocol: each drives the
//! emulator through its public API with a client written here, from Apple's description
//! of the protocol.

mod binary;
mod cli;
mod http2;
mod node_apn;
mod untrusted;
