//! One gateway connection: TLS, then notifications read as they stream in until the
//! client closes, one is refused, or the emulator shuts the connection down.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use openssl::ssl::Ssl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use super::frame::{self, Status};
use super::{record_of, Shared};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After an error response, how long to go on reading (and discarding) what the client
/// still sends before closing. Closing a socket with unread data in it resets the
/// connection, and a reset can destroy the error response before the client reads it.
const LINGER: Duration = Duration::from_secs(2);

pub(super) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    cancel: CancellationToken,
) {
    let span = tracing::debug_span!("binary connection", id, %peer);
    serve_connection(&shared, tcp, id, cancel)
        .instrument(span)
        .await
}

async fn serve_connection(shared: &Shared, tcp: TcpStream, id: u64, cancel: CancellationToken) {
    let counters = &shared.counters;
    counters.connections_accepted.fetch_add(1, Relaxed);
    counters.connections_open.fetch_add(1, Relaxed);
    let _open = OpenGuard(shared);
    let mut shutdowns = shared.shutdowns.subscribe();
    shutdowns.borrow_and_update();
    let tls = tokio::select! {
        _ = cancel.cancelled() => return,
        tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(shared, tcp)) => tls,
    };
    let mut tls = match tls {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            counters.handshakes_failed.fetch_add(1, Relaxed);
            debug!(error = format!("{error:#}"), "handshake failed");
            return;
        }
        Err(_) => {
            counters.handshakes_failed.fetch_add(1, Relaxed);
            debug!("handshake timed out");
            return;
        }
    };
    debug!("connection ready");
    let mut buf = BytesMut::with_capacity(16 * 1024);
    // The identifier of the last notification taken: what status 10 names.
    let mut last_taken = 0;
    loop {
        loop {
            let refusal = match frame::decode(&buf) {
                Ok(None) => break,
                Ok(Some((n, used))) => {
                    buf.advance(used);
                    let status = match frame::check(&n) {
                        Ok(()) => shared.verdict(n.token.as_deref().unwrap_or_default()),
                        Err(status) => status,
                    };
                    shared.count(status);
                    if shared.recorder.wanted() {
                        shared.recorder.record(record_of(&n, id, status));
                    }
                    if status == Status::NoErrors {
                        last_taken = n.identifier.unwrap_or(last_taken);
                        continue;
                    }
                    Refusal {
                        status,
                        identifier: n.identifier.unwrap_or(0),
                    }
                }
                Err(malformed) => {
                    debug!(message = %malformed.message, "malformed notification");
                    shared.count(malformed.status);
                    Refusal {
                        status: malformed.status,
                        identifier: malformed.identifier,
                    }
                }
            };
            debug!(status = %refusal.status, identifier = refusal.identifier, "refused");
            refuse(shared, &mut tls, refusal, buf.len()).await;
            return;
        }
        let shutdown = Refusal {
            status: Status::Shutdown,
            identifier: last_taken,
        };
        tokio::select! {
            _ = cancel.cancelled() => {
                shared.count(Status::Shutdown);
                return refuse(shared, &mut tls, shutdown, buf.len()).await;
            }
            Ok(()) = shutdowns.changed() => {
                shared.count(Status::Shutdown);
                return refuse(shared, &mut tls, shutdown, buf.len()).await;
            }
            read = tls.read_buf(&mut buf) => match read {
                Ok(0) => {
                    debug!("closed by the client");
                    return;
                }
                Ok(_) => {}
                Err(error) => {
                    debug!(%error, "read failed");
                    return;
                }
            },
        }
    }
}

async fn accept(shared: &Shared, tcp: TcpStream) -> anyhow::Result<SslStream<TcpStream>> {
    let ssl = Ssl::new(shared.acceptor.context())?;
    let mut tls = SslStream::new(ssl, tcp)?;
    Pin::new(&mut tls).accept().await?;
    Ok(tls)
}

/// Writes the error response and closes the sending side (TLS close_notify, then FIN),
/// then discards what the client still sends until it closes too (or for [`LINGER`]).
/// `unread`: bytes already received and never decoded, discarded too.
async fn refuse(shared: &Shared, tls: &mut SslStream<TcpStream>, refusal: Refusal, unread: usize) {
    let discarded = &shared.counters.discarded_bytes;
    discarded.fetch_add(unread as u64, Relaxed);
    if refusal.status != Status::Shutdown && !shared.error_delay.is_zero() {
        // The `error_delay` fault: a gateway slow to report the refusal.
        let _ = tokio::time::timeout(shared.error_delay, async {
            let mut sink = [0; 8192];
            while let Ok(n @ 1..) = tls.read(&mut sink).await {
                discarded.fetch_add(n as u64, Relaxed);
            }
        })
        .await;
    }
    if tls
        .write_all(&frame::error_response(refusal.status, refusal.identifier))
        .await
        .is_err()
        || tls.flush().await.is_err()
    {
        return;
    }
    let _ = tokio::time::timeout(LINGER, async {
        let _ = tls.shutdown().await;
        let mut sink = [0; 8192];
        while let Ok(n @ 1..) = tls.read(&mut sink).await {
            discarded.fetch_add(n as u64, Relaxed);
        }
    })
    .await;
}

/// What the error response says: why, and which notification.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    status: Status,
    identifier: u32,
}

struct OpenGuard<'a>(&'a Shared);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.counters.connections_open.fetch_sub(1, Relaxed);
    }
}
