//! An HTTP/1.1 keep-alive client, for the push services that do not speak HTTP/2 (some
//! Web Push services): a pool of at most `connections` connections to one origin, each
//! carrying one request at a time and kept open between them. A connection is made as
//! the HTTP/2 client's are (through `crate::proxy`, TLS from `crate::tls`), under the
//! same timings, and answers come back as the same [`Answer`], so a service's rules read
//! both alike. It knows no service's rules.
//!
//! [`connect_tls`] makes this pool's connections, and a caller's that offers both
//! protocols (a Web Push origin's first); [`Negotiated`] says which the server chose by
//! ALPN. The HTTP/2 client makes its own (`http2::connection`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST};
use http::{HeaderValue, Request, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::client::conn::TrySendError;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_native_tls::TlsStream;
use tracing::debug;

use crate::http2::connection::{ConnectError, ConnectOptions, MAX_RESPONSE_BODY};
use crate::http2::pool::PoolError;
use crate::http2::Answer;
use crate::proxy;

/// A TLS connection to `opts.host:opts.port` (through its proxy), bounded by
/// `connect_timeout`; and the protocol the server chose.
pub async fn connect_tls(
    opts: &ConnectOptions,
) -> Result<(TlsStream<TcpStream>, Negotiated), ConnectError> {
    let addr = proxy::describe(&opts.host, opts.port, opts.proxy.as_ref());
    let connect = async {
        let tcp = proxy::connect(
            &opts.host,
            opts.port,
            opts.proxy.as_ref(),
            opts.connect_timeout,
            |tcp| tcp.set_nodelay(true),
        )
        .await?;
        let tls = tokio_native_tls::TlsConnector::from(opts.tls.clone())
            .connect(&opts.host, tcp)
            .await
            .map_err(|e| ConnectError::Tls {
                addr: addr.clone(),
                message: e.to_string(),
            })?;
        let negotiated = match tls.get_ref().negotiated_alpn() {
            Ok(Some(p)) if p == b"h2" => Negotiated::Http2,
            _ => Negotiated::Http1,
        };
        Ok((tls, negotiated))
    };
    tokio::time::timeout(opts.connect_timeout, connect)
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Timeout {
                addr: addr.clone(),
                after: opts.connect_timeout,
            })
        })
}

/// The protocol a server chose by ALPN (none chosen: HTTP/1.1, as RFC 7301 implies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    Http2,
    Http1,
}

/// Up to `connections` keep-alive connections to one origin.
pub struct Http1Pool {
    opts: ConnectOptions,
    /// Connections open and free, the most recently used last.
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    /// One permit per connection: a request holds one while it is out.
    slots: Semaphore,
    open: Arc<AtomicUsize>,
    slots_total: usize,
    stream_wait: Duration,
    reconnect_after: Duration,
}

impl Http1Pool {
    /// A pool to `opts`' origin; `first`, a connection already made (by the ALPN probe),
    /// is its first. `stream_wait` bounds the wait for a free connection;
    /// `reconnect_after` is how soon a row may try again when none can be made.
    pub async fn new(
        opts: ConnectOptions,
        connections: usize,
        stream_wait: Duration,
        reconnect_after: Duration,
        first: Option<TlsStream<TcpStream>>,
    ) -> Http1Pool {
        let pool = Http1Pool {
            opts,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(connections.max(1)),
            open: Arc::new(AtomicUsize::new(0)),
            slots_total: connections.max(1),
            stream_wait,
            reconnect_after,
        };
        if let Some(stream) = first {
            if let Ok(sender) = pool.handshake(stream).await {
                pool.idle.lock().unwrap().push(sender);
            }
        }
        pool
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Sends `request` with `body` on a free connection, a new one if none is open. A
    /// request the connection gave back unwritten (a kept-alive connection the server
    /// closed meanwhile) goes out on another; one that was written is never sent again
    /// here: the server may have read it.
    pub async fn send(&self, request: Request<()>, body: Bytes) -> Result<Answer, PoolError> {
        let _slot = tokio::time::timeout(self.stream_wait, self.slots.acquire())
            .await
            .map_err(|_| PoolError::Busy(self.stream_wait))?
            .expect("the semaphore is never closed");
        let mut request = self.prepare(&request, body);
        // Each kept-alive connection may have gone bad meanwhile; a new one that fails
        // before the request is written ends the try (no reconnecting loop).
        for _ in 0..=self.slots_total {
            let (mut sender, new) = match self.take_idle() {
                Some(sender) => (sender, false),
                None => (self.open().await?, true),
            };
            if sender.ready().await.is_err() {
                match new {
                    true => return Err(self.closed_unwritten()),
                    false => continue,
                }
            }
            crate::transport::request_went_out();
            let exchange = exchange(&mut sender, request);
            match tokio::time::timeout(self.opts.request_timeout, exchange).await {
                Err(_) => return Err(PoolError::Timeout(self.opts.request_timeout)),
                Ok(Ok((answer, keep))) => {
                    if keep && !sender.is_closed() {
                        self.idle.lock().unwrap().push(sender);
                    }
                    return Ok(answer);
                }
                Ok(Err(mut e)) => match e.take_message() {
                    Some(unwritten) if !new => {
                        debug!(origin = %self.opts.host, error = %e.error(),
                               "kept-alive connection closed before the request was written");
                        request = unwritten;
                    }
                    Some(_) => return Err(self.closed_unwritten()),
                    None => {
                        return Err(PoolError::Unanswered {
                            attempts: 1,
                            last: format!("HTTP/1.1 to {}: {}", self.opts.host, e.error()),
                        })
                    }
                },
            }
        }
        Err(self.closed_unwritten())
    }

    /// A new connection closed before the request was written: as if none could be had.
    fn closed_unwritten(&self) -> PoolError {
        PoolError::Unavailable {
            reason: format!(
                "HTTP/1.1 to {}: the connection closed before the request was written",
                self.opts.host
            ),
            retry_after: self.reconnect_after,
        }
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap();
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    async fn open(&self) -> Result<SendRequest<Full<Bytes>>, PoolError> {
        let unavailable = |reason: String| PoolError::Unavailable {
            reason,
            retry_after: self.reconnect_after,
        };
        let (stream, _) = connect_tls(&self.opts)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        self.handshake(stream).await.map_err(unavailable)
    }

    async fn handshake(
        &self,
        stream: TlsStream<TcpStream>,
    ) -> Result<SendRequest<Full<Bytes>>, String> {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake with {}: {e}", self.opts.host))?;
        let open = self.open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        let host = self.opts.host.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(origin = %host, error = %e, "HTTP/1.1 connection ended");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(sender)
    }

    /// `request` as HTTP/1.1 puts it: the path alone, the authority in `Host`.
    fn prepare(&self, request: &Request<()>, body: Bytes) -> Request<Full<Bytes>> {
        let mut out = Request::new(Full::new(body));
        *out.method_mut() = request.method().clone();
        *out.version_mut() = Version::HTTP_11;
        *out.headers_mut() = request.headers().clone();
        let uri = request.uri();
        *out.uri_mut() = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .expect("a path and query is a URI");
        if let Some(Ok(host)) = uri.authority().map(|a| HeaderValue::from_str(a.as_str())) {
            out.headers_mut().insert(HOST, host);
        }
        out
    }
}

/// One request and its whole answer; whether the connection may carry another. The
/// error gives the request back when it was never written.
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<(Answer, bool), TrySendError<Request<Full<Bytes>>>> {
    let response = sender.try_send_request(request).await?;
    let (parts, body) = response.into_parts();
    let keep = !parts
        .headers
        .get(CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    // Answers are small; a longer body is cut, as the HTTP/2 client cuts it. A body cut
    // short by the server is what arrived of it: the status is what counts.
    let body = match Limited::new(body, MAX_RESPONSE_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    Ok((
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        },
        keep,
    ))
}
