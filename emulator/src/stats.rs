//! Counters of what the emulator did, kept in atomics (no lock on the request path) and
//! read as a [`Stats`] snapshot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of the emulator's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests answered (any status).
    pub requests: u64,
    /// Requests answered, by status.
    pub by_status: BTreeMap<u16, u64>,
    pub connections_accepted: u64,
    pub connections_open: u64,
    /// TLS or HTTP/2 handshakes that failed (no client certificate, no ALPN `h2`, ...).
    pub handshakes_failed: u64,
    /// Connections sent a GOAWAY (`goaway_every`, `goaway_all`, shutdown).
    pub goaways_sent: u64,
    /// Streams refused (`REFUSED_STREAM`) because the client opened more than allowed.
    pub streams_refused: u64,
    /// Streams the client reset, or whose connection died, before they were answered.
    pub streams_abandoned: u64,
    /// Requests being handled now (reading the payload or waiting out the latency).
    pub requests_in_flight: u64,
    /// Broadcasts answered on the push listener (any status; also in `requests`).
    pub broadcasts: u64,
    /// Channel management calls answered on the channels listener (not in `requests`).
    pub channel_calls: u64,
    /// Channel management calls answered, by status.
    pub channel_calls_by_status: BTreeMap<u16, u64>,
    /// Channels made by management calls (not those of
    /// [`Emulator::create_channel`](crate::Emulator::create_channel)).
    pub channels_created: u64,
    /// Channels deleted by management calls (not those of
    /// [`Emulator::delete_channel`](crate::Emulator::delete_channel)).
    pub channels_deleted: u64,
}

impl Stats {
    /// Requests answered with `status`.
    pub fn count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Channel management calls answered with `status`.
    pub fn channel_count(&self, status: u16) -> u64 {
        self.channel_calls_by_status
            .get(&status)
            .copied()
            .unwrap_or(0)
    }
}

const STATUSES: usize = 600;

pub(crate) struct Counters {
    by_status: Box<[AtomicU64]>,
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub goaways_sent: AtomicU64,
    pub streams_refused: AtomicU64,
    pub streams_abandoned: AtomicU64,
    requests_in_flight: AtomicU64,
    pub broadcasts: AtomicU64,
    channel_calls_by_status: Box<[AtomicU64]>,
    pub channels_created: AtomicU64,
    pub channels_deleted: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            by_status: (0..STATUSES).map(|_| AtomicU64::new(0)).collect(),
            connections_accepted: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            handshakes_failed: AtomicU64::new(0),
            goaways_sent: AtomicU64::new(0),
            streams_refused: AtomicU64::new(0),
            streams_abandoned: AtomicU64::new(0),
            requests_in_flight: AtomicU64::new(0),
            broadcasts: AtomicU64::new(0),
            channel_calls_by_status: (0..STATUSES).map(|_| AtomicU64::new(0)).collect(),
            channels_created: AtomicU64::new(0),
            channels_deleted: AtomicU64::new(0),
        }
    }
}

impl Counters {
    pub fn answered(&self, status: u16) {
        let slot = usize::from(status).min(STATUSES - 1);
        self.by_status[slot].fetch_add(1, Relaxed);
    }

    pub fn channel_call(&self, status: u16) {
        let slot = usize::from(status).min(STATUSES - 1);
        self.channel_calls_by_status[slot].fetch_add(1, Relaxed);
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Counts a connection as open until the guard is dropped.
    pub fn connection_opened(&self) -> OpenConnection<'_> {
        self.connections_accepted.fetch_add(1, Relaxed);
        self.connections_open.fetch_add(1, Relaxed);
        OpenConnection(self)
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn request_started(&self) -> InFlight<'_> {
        self.requests_in_flight.fetch_add(1, Relaxed);
        InFlight(self)
    }

    pub fn snapshot(&self) -> Stats {
        let by_status = by_status_of(&self.by_status);
        let channel_calls_by_status = by_status_of(&self.channel_calls_by_status);
        Stats {
            broadcasts: self.broadcasts.load(Relaxed),
            channel_calls: channel_calls_by_status.values().sum(),
            channel_calls_by_status,
            channels_created: self.channels_created.load(Relaxed),
            channels_deleted: self.channels_deleted.load(Relaxed),
            requests: by_status.values().sum(),
            by_status,
            connections_accepted: self.connections_accepted.load(Relaxed),
            connections_open: self.connections_open.load(Relaxed),
            handshakes_failed: self.handshakes_failed.load(Relaxed),
            goaways_sent: self.goaways_sent.load(Relaxed),
            streams_refused: self.streams_refused.load(Relaxed),
            streams_abandoned: self.streams_abandoned.load(Relaxed),
            requests_in_flight: self.requests_in_flight.load(Relaxed),
        }
    }
}

fn by_status_of(counters: &[AtomicU64]) -> BTreeMap<u16, u64> {
    counters
        .iter()
        .enumerate()
        .filter_map(|(status, n)| {
            let n = n.load(Relaxed);
            (n > 0).then_some((status as u16, n))
        })
        .collect()
}

pub(crate) struct OpenConnection<'a>(&'a Counters);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
    }
}

pub(crate) struct InFlight<'a>(&'a Counters);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.requests_in_flight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_counts() {
        let c = Counters::default();
        c.answered(200);
        c.answered(200);
        c.answered(410);
        let open = c.connection_opened();
        let s = c.snapshot();
        assert_eq!(
            (s.requests, s.count(200), s.count(410), s.count(500)),
            (3, 2, 1, 0)
        );
        assert_eq!((s.connections_accepted, s.connections_open), (1, 1));
        drop(open);
        assert_eq!(c.snapshot().connections_open, 0);
    }
}
