//! APNs: requests, answers, credentials and connections of the HTTP/2 provider API.

pub mod push_type;
