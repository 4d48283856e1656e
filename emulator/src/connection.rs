//! Serving one TCP connection: TLS, the HTTP/2 handshake, then a loop over new streams,
//! answered streams and control events (GOAWAY, drop, stall, shutdown). The push
//! listener's connections take device pushes and broadcasts; the channels listener's,
//! channel management calls. Both have the same TLS, authentication, stream limits and
//! faults.
//!
//! A connection's streams run as futures inside its own task (not one task each): no
//! spawn per request, and stalling the connection is simply not polling it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::future::Either;
use futures::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::RecvStream;
use http::Request;
use openssl::ssl::{Ssl, SslAcceptor};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_openssl::SslStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use super::channels::{broadcast, management};
use super::jwt::ConnectionTokens;
use super::request;
use super::stats::Counters;
use super::stream_limit::{RaiseHandle, StreamLimitIo};
use super::validate::{self, AuthMode, Rejection};
use super::{Control, Shared};

/// Which of the emulator's listeners a connection came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    /// Device pushes (`/3/device/...`) and broadcasts (`/4/broadcasts/apps/...`).
    Push,
    /// The channel management API (`/1/apps/...`).
    Channels,
}

/// Per-stream receive window: large, so flow control never throttles a benchmark.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Under token auth APNs allows one stream until a request succeeds.
const INITIAL_TOKEN_AUTH_STREAMS: u32 = 1;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shutdown waits for a connection's streams to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    listener: Listener,
    cancel: CancellationToken,
) {
    let span = tracing::debug_span!("connection", id, %peer, ?listener);
    serve_connection(&shared, tcp, id, listener, cancel)
        .instrument(span)
        .await
}

async fn serve_connection(
    shared: &Shared,
    tcp: TcpStream,
    id: u64,
    listener: Listener,
    cancel: CancellationToken,
) {
    let _open = shared.counters.connection_opened();
    let mut control = shared.control.subscribe();
    let at_start = *control.borrow_and_update();

    let handshake = async {
        let tls = tls_accept(&shared.acceptor, tcp).await?;
        let limits = (shared.policy.auth == AuthMode::Token
            && shared.max_streams > INITIAL_TOKEN_AUTH_STREAMS)
            .then_some((INITIAL_TOKEN_AUTH_STREAMS, shared.max_streams));
        let (io, raise) = StreamLimitIo::new(tls, limits);
        let h2 = h2::server::Builder::new()
            .max_concurrent_streams(shared.max_streams)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(io)
            .await
            .context("HTTP/2 handshake")?;
        anyhow::Ok((h2, raise))
    };
    let (h2, raise) = tokio::select! {
        _ = cancel.cancelled() => return,
        _ = dropped(&mut control, at_start.drops) => return,
        done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match done {
            Ok(Ok(ready)) => ready,
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
    debug!("connection ready");
    let limit = if raise.is_some() {
        INITIAL_TOKEN_AUTH_STREAMS
    } else {
        shared.max_streams
    };
    let state = Streams {
        shared,
        id,
        listener,
        tokens: ConnectionTokens::default(),
        accepted: 0,
        in_flight: 0,
        limit: limit as usize,
        raise,
        going_away: false,
        refused_any: false,
    };
    // A stall, GOAWAY or drop asked for during the handshake was consumed by `dropped`:
    // have the loop compare the state now with the state at the start.
    control.mark_changed();
    state.run(h2, control, at_start, cancel).await;
    debug!("connection closed");
}

pub(crate) async fn tls_accept(
    acceptor: &SslAcceptor,
    tcp: TcpStream,
) -> anyhow::Result<SslStream<TcpStream>> {
    let ssl = Ssl::new(acceptor.context())?;
    let mut tls = SslStream::new(ssl, tcp)?;
    Pin::new(&mut tls).accept().await.context("TLS handshake")?;
    if tls.ssl().selected_alpn_protocol() != Some(b"h2") {
        bail!("the client did not offer ALPN h2");
    }
    Ok(tls)
}

/// Resolves once `drop_connections` was called after `since`.
pub(crate) async fn dropped(control: &mut watch::Receiver<Control>, since: u64) {
    loop {
        if control.borrow_and_update().drops != since {
            return;
        }
        if control.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

type H2 = h2::server::Connection<StreamLimitIo<SslStream<TcpStream>>, Bytes>;

/// A connection's streams and the rules that span them.
struct Streams<'a> {
    shared: &'a Shared,
    id: u64,
    listener: Listener,
    tokens: ConnectionTokens,
    accepted: u64,
    in_flight: usize,
    /// The stream limit the client was told.
    limit: usize,
    /// Until the first success under token auth.
    raise: Option<RaiseHandle>,
    going_away: bool,
    /// Refusals are logged once per connection.
    refused_any: bool,
}

impl<'a> Streams<'a> {
    async fn run(
        mut self,
        mut h2: H2,
        mut control: watch::Receiver<Control>,
        mut seen: Control,
        cancel: CancellationToken,
    ) {
        let shared = self.shared;
        let mut answering = FuturesUnordered::new();
        let mut drain_until: Option<Instant> = None;
        loop {
            let stalled = seen.stalled;
            // Built every turn, so no clock read or timer unless draining.
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
                    self.go_away(&mut h2);
                    drain_until = Some(Instant::now() + DRAIN_TIMEOUT);
                }
                _ = drained => {
                    debug!("streams still open after the drain timeout");
                    break;
                }
                changed = control.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now = *control.borrow_and_update();
                    if now.drops != seen.drops {
                        debug!("dropping the connection");
                        break;
                    }
                    if now.goaways != seen.goaways {
                        self.go_away(&mut h2);
                    }
                    seen = now;
                }
                Some(status) = answering.next(), if !stalled => self.answered(status),
                next = h2.accept(), if !stalled => match next {
                    None => break,
                    Some(Ok((request, respond))) => {
                        if let Some(answer) = self.start(&mut h2, request, respond) {
                            answering.push(answer);
                        }
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
    }

    /// Checks a new stream's head and returns the future that answers it.
    fn start(
        &mut self,
        h2: &mut H2,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) -> Option<impl std::future::Future<Output = Option<u16>> + 'a> {
        let shared = self.shared;
        if self.in_flight >= self.limit {
            // Only possible while the limit is below h2's own (token auth, before the
            // first success), from a client that ignores the limit or sent before reading
            // it. The stream was not processed: the client may resend it.
            if !self.refused_any {
                self.refused_any = true;
                warn!(
                    limit = self.limit,
                    "client opened more streams than allowed: refused (REFUSED_STREAM)"
                );
            }
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            Counters::bump(&shared.counters.streams_refused);
            return None;
        }
        self.accepted += 1;
        if shared.goaway_every == Some(self.accepted) {
            self.go_away(h2);
        }
        let (head, body) = request.into_parts();
        let tokens = &mut self.tokens;
        let provider_token = |authorization: &http::HeaderValue| {
            let key = shared.token_key.as_ref().expect("token auth has a key");
            tokens
                .check(key, authorization.as_bytes(), unix_now())
                .map_err(|reason| Rejection {
                    status: super::reason::status_of(reason).unwrap_or(403),
                    reason,
                })
        };
        self.in_flight += 1;
        let policy = &shared.policy;
        let answer = match self.listener {
            Listener::Channels => {
                let checked = management::check_head(&head, policy, provider_token);
                Either::Left(management::handle(shared, head, body, respond, checked))
            }
            Listener::Push if broadcast::is_broadcast_path(head.uri.path()) => {
                let checked = broadcast::check_head(&head, policy, provider_token);
                Either::Right(Either::Left(broadcast::handle(
                    shared, self.id, head, body, respond, checked,
                )))
            }
            Listener::Push => {
                let checked = validate::check_head(&head, policy, provider_token);
                Either::Right(Either::Right(request::handle(
                    shared, self.id, head, body, respond, checked,
                )))
            }
        };
        Some(answer)
    }

    fn answered(&mut self, status: Option<u16>) {
        self.in_flight -= 1;
        // Any success: a device push's or broadcast's 200, a management call's 200, 201
        // or 204.
        if status.is_some_and(|s| (200..300).contains(&s)) {
            if let Some(raise) = self.raise.take() {
                raise.raise();
                self.limit = self.shared.max_streams as usize;
                debug!(limit = self.limit, "first success: stream limit raised");
            }
        }
    }

    fn go_away(&mut self, h2: &mut H2) {
        if !self.going_away {
            self.going_away = true;
            h2.graceful_shutdown();
            Counters::bump(&self.shared.counters.goaways_sent);
            debug!(requests = self.accepted, "GOAWAY sent");
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
