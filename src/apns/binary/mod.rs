//! The retired APNs binary protocol, a second transport per app.

pub mod frame;
