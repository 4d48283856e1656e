//! An app's connections to its push service: `connections` long-lived HTTP/2 connections, each kept up by its
//! own supervisor task, requests spread over them by fewest requests in flight.
//!
//! A connection that worked (it answered a request or a PING, or lived a while) is
//! replaced at once when it dies or is told to go away, however short its life: a busy
//! front end (APNs's) sends a graceful GOAWAY every few hundred requests, and that is no
//! trouble. Its successor opens as soon as the GOAWAY arrives, while its streams drain.
//! Only a connection that cannot be opened, or dies before answering anything, counts as
//! trouble: its slot waits a capped, jittered backoff, so a flapping server is not
//! hammered, and requests go to the other connections meanwhile. A request the server
//! never processed is sent again on another connection, a bounded number of times.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::connection::{ConnectOptions, Connection, RequestError};
use super::Answer;
use crate::backoff::backoff;

/// A connection that lived this long ended normally even if it answered nothing (an idle
/// one); its successor opens at once.
const STABLE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub connect: ConnectOptions,
    pub connections: usize,
    /// Backoff between failed connection attempts.
    pub reconnect_base: Duration,
    pub reconnect_max: Duration,
    /// How often a request the server never processed is sent again.
    pub max_resends: u32,
    /// How long a request waits for a connection and a stream on it before it gives up
    /// (it never left: [`PoolError::Busy`]). The request timeout starts after.
    pub stream_wait: Duration,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PoolError {
    /// No connection can be had now; the next attempt is `retry_after` away.
    #[error("{reason}")]
    Unavailable {
        reason: String,
        retry_after: Duration,
    },
    /// Sent `attempts` times, never processed.
    #[error("no answer after {attempts} tries; last: {last}")]
    Unanswered { attempts: u32, last: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Stream(String),
    /// No stream was free in time: the request never left, so it was no attempt.
    #[error("no HTTP/2 stream free within {0:?}")]
    Busy(Duration),
}

#[derive(Clone)]
enum Slot {
    /// The supervisors start with the first request.
    Idle,
    Connecting,
    Up(Arc<Connection>),
    Down {
        error: String,
        until: Instant,
    },
}

pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    app: String,
    opts: PoolOptions,
    slots: Vec<Mutex<Slot>>,
    changed: Notify,
    started: Once,
    shutdown: CancellationToken,
    /// Where the search for the least busy connection starts, so ties rotate.
    next: AtomicUsize,
}

impl Pool {
    pub fn new(app: &str, opts: PoolOptions) -> Pool {
        let slots = (0..opts.connections.max(1))
            .map(|_| Mutex::new(Slot::Idle))
            .collect();
        Pool {
            inner: Arc::new(Inner {
                app: app.to_owned(),
                opts,
                slots,
                changed: Notify::new(),
                started: Once::new(),
                shutdown: CancellationToken::new(),
                next: AtomicUsize::new(0),
            }),
        }
    }

    /// Sends one request, again on another connection if the server never processed it.
    /// `make` builds the request afresh for each try.
    pub async fn send(
        &self,
        make: impl Fn() -> http::Request<()>,
        body: Bytes,
    ) -> Result<Answer, PoolError> {
        self.send_tries(make, body, self.inner.opts.max_resends + 1)
            .await
    }

    /// Sends one request that must not be made twice (APNs's channel create: each one
    /// makes a channel): again on another connection only if it never left. Once it went
    /// out, a connection lost or gone away before the answer is no proof the server did
    /// not act on it, so the failure is returned, not sent again ([`PoolError::Unanswered`]
    /// after one try).
    pub async fn send_once(
        &self,
        make: impl Fn() -> http::Request<()>,
        body: Bytes,
    ) -> Result<Answer, PoolError> {
        self.send_tries(make, body, 1).await
    }

    async fn send_tries(
        &self,
        make: impl Fn() -> http::Request<()>,
        body: Bytes,
        attempts: u32,
    ) -> Result<Answer, PoolError> {
        let mut tries = 0;
        // Waiting for a connection and a stream, across tries that never left.
        let mut deadline = Instant::now() + self.inner.opts.stream_wait;
        loop {
            let conn = self.acquire(deadline).await?;
            let wait = deadline.saturating_duration_since(Instant::now());
            match conn.send_within(make(), body.clone(), wait).await {
                Ok(answer) => return Ok(answer),
                Err(RequestError::NoStream(_)) => {
                    return Err(PoolError::Busy(self.inner.opts.stream_wait))
                }
                // It never left: another connection, no try spent, within the wait.
                Err(RequestError::NotSent(why)) => {
                    debug!(app = %self.inner.app, conn = conn.id(), reason = %why,
                           "request not sent; trying another connection");
                    if Instant::now() >= deadline {
                        return Err(PoolError::Busy(self.inner.opts.stream_wait));
                    }
                    tokio::task::yield_now().await;
                }
                Err(RequestError::NotProcessed(why)) => {
                    debug!(app = %self.inner.app, conn = conn.id(), tries, reason = %why,
                           "request not processed; sending it again");
                    tries += 1;
                    if tries == attempts {
                        return Err(PoolError::Unanswered {
                            attempts,
                            last: why,
                        });
                    }
                    deadline = Instant::now() + self.inner.opts.stream_wait;
                }
                Err(RequestError::Timeout(after)) => return Err(PoolError::Timeout(after)),
                Err(RequestError::Stream(why)) => return Err(PoolError::Stream(why)),
            }
        }
    }

    /// Connections up and usable now.
    pub fn open_connections(&self) -> usize {
        self.inner
            .slots
            .iter()
            .filter(|slot| matches!(&*slot.lock().unwrap(), Slot::Up(c) if c.usable()))
            .count()
    }

    /// `Err` with the last connection error when no connection is up and none can be had.
    pub fn health(&self) -> Result<(), String> {
        let mut error = None;
        for slot in &self.inner.slots {
            match &*slot.lock().unwrap() {
                Slot::Down { error: e, .. } => error = Some(e.clone()),
                _ => return Ok(()),
            }
        }
        error.map_or(Ok(()), Err)
    }

    /// The connection for the next request: the usable one with the fewest requests in
    /// flight; waits for one that is being opened, up to `deadline`.
    async fn acquire(&self, deadline: Instant) -> Result<Arc<Connection>, PoolError> {
        let inner = &self.inner;
        self.start();
        loop {
            let changed = inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if inner.shutdown.is_cancelled() {
                return Err(PoolError::Unavailable {
                    reason: "shutting down".into(),
                    retry_after: Duration::ZERO,
                });
            }
            let n = inner.slots.len();
            let first = inner.next.fetch_add(1, Ordering::Relaxed);
            let mut best: Option<Arc<Connection>> = None;
            let mut opening = false;
            let mut down: Option<(String, Instant)> = None;
            for i in 0..n {
                match &*inner.slots[(first + i) % n].lock().unwrap() {
                    Slot::Up(c) if c.usable() => {
                        if best.as_ref().is_none_or(|b| c.in_flight() < b.in_flight()) {
                            best = Some(c.clone());
                        }
                    }
                    Slot::Down { error, until } => {
                        if down.as_ref().is_none_or(|(_, u)| until < u) {
                            down = Some((error.clone(), *until));
                        }
                    }
                    _ => opening = true,
                }
            }
            if let Some(conn) = best {
                return Ok(conn);
            }
            let now = Instant::now();
            if !opening {
                if let Some((error, until)) = down {
                    if until > deadline || now >= deadline {
                        return Err(PoolError::Unavailable {
                            reason: error,
                            retry_after: until.saturating_duration_since(now),
                        });
                    }
                }
            }
            if now >= deadline {
                return Err(PoolError::Unavailable {
                    reason: format!(
                        "no {} connection came up in time",
                        inner.opts.connect.service
                    ),
                    retry_after: Duration::ZERO,
                });
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    fn start(&self) {
        self.inner.started.call_once(|| {
            for i in 0..self.inner.slots.len() {
                tokio::spawn(supervise(self.inner.clone(), i));
            }
        });
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.shutdown.cancel();
    }
}

impl Inner {
    fn set(&self, i: usize, slot: Slot) {
        *self.slots[i].lock().unwrap() = slot;
        self.changed.notify_waiters();
    }
}

/// Keeps slot `i` connected until shutdown.
async fn supervise(inner: Arc<Inner>, i: usize) {
    let opts = &inner.opts;
    let mut failures = 0u32;
    loop {
        inner.set(i, Slot::Connecting);
        let connected = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            c = Connection::connect(&opts.connect, &inner.shutdown) => c,
        };
        let error = match connected {
            Ok(conn) => {
                let conn = Arc::new(conn);
                inner.set(i, Slot::Up(conn.clone()));
                let up = Instant::now();
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = conn.retired() => {}
                }
                // Shutting down retires connections too: that is no trouble.
                if inner.shutdown.is_cancelled() {
                    return;
                }
                let lived = up.elapsed();
                // A graceful GOAWAY past stream 0: the server took requests on it.
                let graceful = conn
                    .goaway()
                    .is_some_and(|g| g.code == 0 && g.last_stream_id > 0);
                if conn.answers() > 0 || conn.pongs() > 0 || graceful || lived >= STABLE {
                    failures = 0;
                    info!(app = %inner.app, slot = i, answered = conn.answers(), ?lived,
                          goaway = ?conn.goaway(), service = opts.connect.service, "replacing the connection");
                    continue;
                }
                format!(
                    "the {} connection closed {lived:?} after it opened, having answered nothing",
                    opts.connect.service
                )
            }
            Err(e) => e.to_string(),
        };
        let wait = backoff(failures, opts.reconnect_base, opts.reconnect_max);
        failures = failures.saturating_add(1);
        warn!(app = %inner.app, slot = i, error = %error, retry_in = ?wait,
              service = opts.connect.service, "connection trouble");
        inner.set(
            i,
            Slot::Down {
                error,
                until: Instant::now() + wait,
            },
        );
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http2::TrustingEmulator;
    use crate::testutil::{eventually, TestEmulator};
    use pgpushd_emulator::EmulatorConfig;

    fn options(server: &TestEmulator, connections: usize) -> PoolOptions {
        PoolOptions {
            connect: server.connect_options(),
            connections,
            reconnect_base: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(200),
            max_resends: 3,
            stream_wait: Duration::from_secs(10),
        }
    }

    /// A push to device `n` (64 hex digits, as the emulator wants them).
    fn request(server: &TestEmulator, n: usize) -> impl Fn() -> http::Request<()> {
        let uri: http::Uri = format!("https://localhost:{}/3/device/{n:064x}", server.port())
            .parse()
            .unwrap();
        move || {
            let mut r = http::Request::new(());
            *r.method_mut() = http::Method::POST;
            *r.uri_mut() = uri.clone();
            r
        }
    }

    fn body() -> Bytes {
        Bytes::from_static(b"{}")
    }

    async fn send_many(
        pool: &Pool,
        server: &TestEmulator,
        n: usize,
    ) -> Vec<Result<Answer, PoolError>> {
        futures::future::join_all((0..n).map(|i| pool.send(request(server, i), body()))).await
    }

    /// Sends `n` requests while the server holds every one unanswered; once all `n` are
    /// in flight, runs `fault` (answering promptly from then on).
    async fn send_through(
        pool: &Pool,
        server: &TestEmulator,
        n: usize,
        fault: impl std::future::Future<Output = ()>,
    ) -> Vec<Result<Answer, PoolError>> {
        server.set_latency(Duration::from_secs(3600));
        let faulty = async {
            eventually(|| server.stats().requests_in_flight == n as u64).await;
            server.set_latency(Duration::ZERO);
            fault.await;
        };
        let (results, ()) = tokio::join!(send_many(pool, server, n), faulty);
        results
    }

    #[tokio::test]
    async fn connections_open_lazily_and_share_the_load() {
        let server = TestEmulator::open().await;
        let mut opts = options(&server, 2);
        opts.connect.request_timeout = Duration::from_millis(1000);
        let pool = Pool::new("default", opts);
        assert_eq!(server.stats().connections_accepted, 0);
        // The first request starts every connection; it waits for the first one up.
        server.set_latency(Duration::from_secs(3600));
        let (first, ()) = tokio::join!(pool.send(request(&server, 0xaa), body()), async {
            eventually(|| server.stats().requests_in_flight == 1).await;
            server.set_latency(Duration::ZERO);
        });
        assert_eq!(first, Err(PoolError::Timeout(Duration::from_millis(1000))));
        let all_up = || {
            pool.inner
                .slots
                .iter()
                .all(|s| matches!(&*s.lock().unwrap(), Slot::Up(_)))
        };
        eventually(all_up).await;
        let results = send_many(&pool, &server, 200).await;
        let ok = results
            .iter()
            .filter(|r| matches!(r, Ok(a) if a.status == 200))
            .count();
        assert_eq!(ok, 200);
        assert_eq!(server.stats().connections_accepted, 2);
        let records = server.records();
        assert_eq!(records.len(), 200);
        for conn in [1, 2] {
            let on_it = records.iter().filter(|r| r.connection == conn).count();
            assert!(
                on_it > 40 && on_it < 160,
                "{on_it} of 200 on connection {conn}"
            );
        }
        assert_eq!(pool.health(), Ok(()));
    }

    /// GOAWAY, then the connection closes with requests unanswered.
    #[tokio::test]
    async fn goaway_mid_flight_loses_nothing() {
        let server = TestEmulator::open().await;
        let pool = Pool::new("default", options(&server, 1));
        let results = send_through(&pool, &server, 30, async {
            server.goaway_all();
            eventually(|| server.stats().goaways_sent == 1).await;
            server.drop_connections();
        })
        .await;
        for r in &results {
            assert_eq!(r.as_ref().map(|a| a.status), Ok(200));
        }
        assert!(server.stats().connections_accepted >= 2);
    }

    #[tokio::test]
    async fn a_dropped_connection_mid_flight_loses_nothing() {
        let server = TestEmulator::open().await;
        let pool = Pool::new("default", options(&server, 2));
        let results = send_through(&pool, &server, 20, async { server.drop_connections() }).await;
        for r in &results {
            assert_eq!(r.as_ref().map(|a| a.status), Ok(200));
        }
        assert!(server.stats().connections_accepted >= 3);
    }

    #[tokio::test]
    async fn a_connection_that_stops_answering_pings_is_replaced() {
        let server = TestEmulator::open().await;
        let mut opts = options(&server, 1);
        opts.connect.ping_interval = Duration::from_millis(50);
        opts.connect.ping_timeout = Duration::from_millis(200);
        opts.connect.request_timeout = Duration::from_secs(15);
        let pool = Pool::new("default", opts);
        // The first connection hangs: no answers, no PING acks, the socket stays open.
        server.stall(true);
        let started = Instant::now();
        let (answer, ()) = tokio::join!(pool.send(request(&server, 0xaa), body()), async {
            eventually(|| server.stats().connections_accepted == 2).await;
            server.stall(false);
        });
        assert_eq!(answer.unwrap().status, 200);
        // Usually 2; a third when the second connection was still in its handshake when
        // the stall ended (the emulator's stall then keeps it) and was replaced in turn.
        assert!(server.stats().connections_accepted >= 2);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn resends_are_bounded() {
        let server = TestEmulator::open().await;
        server.set_latency(Duration::from_secs(3600));
        let pool = Pool::new("default", options(&server, 1));
        // Every connection is dropped as soon as a request is on it.
        let dropper = async {
            loop {
                eventually(|| server.stats().requests_in_flight >= 1).await;
                server.drop_connections();
                eventually(|| server.stats().requests_in_flight == 0).await;
            }
        };
        let result = tokio::select! {
            result = pool.send(request(&server, 0xaa), body()) => result,
            never = dropper => never,
        };
        match result {
            Err(PoolError::Unanswered { attempts: 4, last }) => {
                assert!(last.contains("connection lost"), "{last}")
            }
            other => panic!("{other:?}"),
        }
        eventually(|| server.stats().streams_abandoned == 4).await;
        assert_eq!(server.stats().requests, 0);
    }

    #[tokio::test]
    async fn a_request_sent_once_is_not_sent_again_after_its_connection_drops() {
        let server = TestEmulator::open().await;
        server.set_latency(Duration::from_secs(3600));
        let pool = Pool::new("default", options(&server, 1));
        let (result, ()) = tokio::join!(pool.send_once(request(&server, 0xaa), body()), async {
            eventually(|| server.stats().requests_in_flight >= 1).await;
            server.drop_connections();
        });
        match result {
            Err(PoolError::Unanswered { attempts: 1, last }) => {
                assert!(last.contains("connection lost"), "{last}")
            }
            other => panic!("{other:?}"),
        }
        eventually(|| server.stats().streams_abandoned == 1).await;
        assert_eq!(server.stats().connections_accepted, 1, "no second try");
    }

    #[tokio::test]
    async fn an_unreachable_server_makes_the_pool_unavailable() {
        let server = TestEmulator::open().await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut opts = options(&server, 2);
        opts.connect.port = listener.local_addr().unwrap().port();
        drop(listener);
        opts.reconnect_base = Duration::from_secs(60);
        opts.reconnect_max = Duration::from_secs(60);
        let pool = Pool::new("default", opts);
        match pool.send(request(&server, 0xaa), body()).await {
            Err(PoolError::Unavailable {
                reason,
                retry_after,
            }) => {
                assert!(
                    reason.starts_with("cannot connect to localhost:"),
                    "{reason}"
                );
                assert!(retry_after > Duration::from_secs(20), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
        assert!(pool.health().unwrap_err().starts_with("cannot connect"));
        assert_eq!(server.stats().connections_accepted, 0);
    }

    #[tokio::test]
    async fn a_short_outage_is_ridden_out() {
        let server = TestEmulator::open().await;
        // A port where nothing listens yet; the server comes up there in a moment.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut opts = options(&server, 1);
        opts.connect.port = port;
        let pool = Pool::new("default", opts);
        let (result, ()) = tokio::join!(pool.send(request(&server, 0xaa), body()), async {
            eventually(|| pool.health().is_err()).await;
            // Forward the port to the real server.
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            let target = server.addr();
            tokio::spawn(async move {
                while let Ok((mut a, _)) = listener.accept().await {
                    let mut b = tokio::net::TcpStream::connect(target).await.unwrap();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    });
                }
            });
        });
        assert_eq!(result.unwrap().status, 200);
        assert_eq!(pool.health(), Ok(()));
    }

    #[tokio::test]
    async fn dropping_the_pool_closes_its_connections() {
        let server = TestEmulator::open().await;
        let pool = Pool::new("default", options(&server, 1));
        pool.send(request(&server, 0xaa), body()).await.unwrap();
        let conn = match &*pool.inner.slots[0].lock().unwrap() {
            Slot::Up(c) => c.clone(),
            _ => panic!("the slot is up"),
        };
        drop(pool);
        tokio::time::timeout(Duration::from_secs(5), conn.retired())
            .await
            .unwrap();
        eventually(|| server.stats().connections_open == 0).await;
    }

    /// A server sending a graceful GOAWAY every 50 requests: each connection answered,
    /// so it is replaced at once, not after a backoff (a minute here).
    #[tokio::test]
    async fn a_connection_that_answered_is_replaced_at_once() {
        let server = TestEmulator::start(EmulatorConfig {
            goaway_every: Some(50),
            ..EmulatorConfig::default()
        })
        .await;
        let mut opts = options(&server, 2);
        opts.reconnect_base = Duration::from_secs(60);
        opts.reconnect_max = Duration::from_secs(60);
        let pool = Pool::new("default", opts);
        let started = Instant::now();
        for wave in 0..10 {
            let results = futures::future::join_all(
                (0..100).map(|i| pool.send(request(&server, wave * 100 + i), body())),
            )
            .await;
            for r in &results {
                assert_eq!(r.as_ref().map(|a| a.status), Ok(200), "wave {wave}");
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let goaways = server.stats().goaways_sent;
        assert!(goaways >= 5, "{goaways} GOAWAYs");
        assert_eq!(pool.health(), Ok(()));
    }
}
