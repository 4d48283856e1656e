//! Serving one TCP connection of the Web Push emulator: TLS, then HTTP/2 if ALPN chose
//! `h2`, else HTTP/1.1 with keep-alive (also for a client offering no ALPN), both by
//! hyper; and the run-time controls shared with the other modes. GOAWAY is hyper's
//! graceful shutdown: on HTTP/2 a GOAWAY frame, on HTTP/1.1 closing the connection
//! once the request in flight is answered. A drop closes the socket at once.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use openssl::ssl::Ssl;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_openssl::SslStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use super::{request, Shared};
use crate::connection::dropped;
use crate::stats::Counters;
use crate::Control;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shutdown waits for a connection's requests to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    cancel: CancellationToken,
) {
    let span = tracing::debug_span!("webpush connection", id, %peer);
    serve_connection(shared, tcp, id, cancel)
        .instrument(span)
        .await
}

/// The TLS handshake; whether ALPN chose `h2`.
async fn tls_accept(
    shared: &Shared,
    tcp: TcpStream,
) -> anyhow::Result<(SslStream<TcpStream>, bool)> {
    let ssl = Ssl::new(shared.acceptor.context())?;
    let mut tls = SslStream::new(ssl, tcp)?;
    Pin::new(&mut tls).accept().await.context("TLS handshake")?;
    let h2 = tls.ssl().selected_alpn_protocol() == Some(b"h2");
    if shared.http2_only && !h2 {
        bail!("the client did not offer ALPN h2 (the emulator serves HTTP/2 only)");
    }
    Ok((tls, h2))
}

async fn serve_connection(shared: Arc<Shared>, tcp: TcpStream, id: u64, cancel: CancellationToken) {
    let _open = shared.counters.connection_opened();
    let mut control = shared.control.subscribe();
    let at_start = *control.borrow_and_update();
    let (tls, h2) = tokio::select! {
        _ = cancel.cancelled() => return,
        _ = dropped(&mut control, at_start.drops) => return,
        done = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls_accept(&shared, tcp)) => match done {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                Counters::bump(&shared.counters.handshakes_failed);
                debug!(error = format!("{error:#}"), "handshake failed");
                return;
            }
            Err(_) => {
                Counters::bump(&shared.counters.handshakes_failed);
                debug!("handshake timed out");
                return;
            }
        },
    };
    // goaway_every: the service counts requests and asks the loop below to go away.
    let requests = Arc::new(AtomicU64::new(0));
    let go_away_now = Arc::new(Notify::new());
    let service = {
        let (shared, go_away_now) = (shared.clone(), go_away_now.clone());
        service_fn(move |req| {
            let n = requests.fetch_add(1, Ordering::Relaxed) + 1;
            if shared.goaway_every == Some(n) {
                go_away_now.notify_one();
            }
            request::handle(shared.clone(), id, req)
        })
    };
    let io = TokioIo::new(tls);
    let drive = Drive {
        shared: &shared,
        cancel,
        control,
        seen: at_start,
        go_away_now,
    };
    if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(shared.max_streams)
            .serve_connection(io, service);
        drive.run(conn, |c| c.graceful_shutdown()).await;
    } else {
        let conn = http1::Builder::new()
            .keep_alive(true)
            .serve_connection(io, service);
        drive.run(conn, |c| c.graceful_shutdown()).await;
    }
    debug!("connection closed");
}

/// Runs a hyper connection while watching the controls.
struct Drive<'a> {
    shared: &'a Shared,
    cancel: CancellationToken,
    control: tokio::sync::watch::Receiver<Control>,
    seen: Control,
    go_away_now: Arc<Notify>,
}

impl Drive<'_> {
    async fn run<C>(mut self, conn: C, graceful: impl Fn(Pin<&mut C>))
    where
        C: std::future::Future<Output = Result<(), hyper::Error>>,
    {
        let mut conn = std::pin::pin!(conn);
        // What changed during the handshake is compared with the state at the start.
        self.control.mark_changed();
        let mut going_away = false;
        let mut go_away = |conn: Pin<&mut C>| {
            if !going_away {
                going_away = true;
                graceful(conn);
                Counters::bump(&self.shared.counters.goaways_sent);
                debug!("going away");
            }
        };
        let mut drain_until: Option<Instant> = None;
        loop {
            let stalled = self.seen.stalled;
            let drained = async {
                match drain_until {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.cancel.cancelled(), if drain_until.is_none() => {
                    if stalled {
                        break;
                    }
                    go_away(conn.as_mut());
                    drain_until = Some(Instant::now() + DRAIN_TIMEOUT);
                }
                _ = drained => break,
                changed = self.control.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now: Control = *self.control.borrow_and_update();
                    if now.drops != self.seen.drops {
                        debug!("dropping the connection");
                        break;
                    }
                    if now.goaways != self.seen.goaways {
                        go_away(conn.as_mut());
                    }
                    self.seen = now;
                }
                _ = self.go_away_now.notified() => go_away(conn.as_mut()),
                done = conn.as_mut(), if !stalled => {
                    if let Err(error) = done {
                        debug!(%error, "connection failed");
                    }
                    break;
                }
            }
        }
    }
}
