//! Serving one TCP connection of the FCM emulator: TLS (ALPN `h2`), the HTTP/2
//! handshake, then a loop over new streams, answered streams and the run-time controls
//! (GOAWAY, drop, stall, shutdown) shared with the APNs mode. Streams run as futures
//! inside the connection's task, as in the APNs mode.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use super::{request, Shared};
use crate::connection::{dropped, tls_accept};
use crate::stats::Counters;
use crate::Control;

const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shutdown waits for a connection's streams to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    cancel: CancellationToken,
) {
    let span = tracing::debug_span!("fcm connection", id, %peer);
    serve_connection(&shared, tcp, id, cancel)
        .instrument(span)
        .await
}

async fn serve_connection(shared: &Shared, tcp: TcpStream, id: u64, cancel: CancellationToken) {
    let _open = shared.counters.connection_opened();
    let mut control = shared.control.subscribe();
    let at_start = *control.borrow_and_update();
    let handshake = async {
        let tls = tls_accept(&shared.acceptor, tcp).await?;
        let h2 = h2::server::Builder::new()
            .max_concurrent_streams(shared.max_streams)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(tls)
            .await?;
        anyhow::Ok(h2)
    };
    let mut h2 = tokio::select! {
        _ = cancel.cancelled() => return,
        _ = dropped(&mut control, at_start.drops) => return,
        done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match done {
            Ok(Ok(h2)) => h2,
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
    // What changed during the handshake is compared with the state at the start.
    control.mark_changed();
    let mut seen = at_start;
    let mut answering = FuturesUnordered::new();
    let mut accepted: u64 = 0;
    let mut going_away = false;
    let mut go_away = |h2: &mut h2::server::Connection<_, Bytes>, accepted: u64| {
        if !going_away {
            going_away = true;
            h2.graceful_shutdown();
            Counters::bump(&shared.counters.goaways_sent);
            debug!(requests = accepted, "GOAWAY sent");
        }
    };
    let mut drain_until: Option<Instant> = None;
    loop {
        let stalled = seen.stalled;
        let drained = async {
            match drain_until {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled(), if drain_until.is_none() => {
                if stalled {
                    break;
                }
                go_away(&mut h2, accepted);
                drain_until = Some(Instant::now() + DRAIN_TIMEOUT);
            }
            _ = drained => break,
            changed = control.changed() => {
                if changed.is_err() {
                    break;
                }
                let now: Control = *control.borrow_and_update();
                if now.drops != seen.drops {
                    debug!("dropping the connection");
                    break;
                }
                if now.goaways != seen.goaways {
                    go_away(&mut h2, accepted);
                }
                seen = now;
            }
            Some(_) = answering.next(), if !stalled => {}
            next = h2.accept(), if !stalled => match next {
                None => break,
                Some(Ok((request, respond))) => {
                    accepted += 1;
                    if shared.goaway_every == Some(accepted) {
                        go_away(&mut h2, accepted);
                    }
                    let (head, body) = request.into_parts();
                    answering.push(request::handle(shared, id, head, body, respond));
                }
                Some(Err(error)) => {
                    debug!(%error, "connection failed");
                    break;
                }
            },
        }
    }
    let abandoned = answering.len() as u64;
    if abandoned > 0 {
        shared
            .counters
            .streams_abandoned
            .fetch_add(abandoned, std::sync::atomic::Ordering::Relaxed);
    }
    debug!("connection closed");
}
