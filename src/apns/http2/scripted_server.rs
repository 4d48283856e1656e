//! A small HTTP/2 server for the client's tests, until the emulator lands: TLS with a
//! throwaway CA (trusted by the client through `ca_file`, never by skipping checks), and
//! per-request [`Action`]s to inject the faults the client must survive.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use openssl::ssl::{AlpnError, Ssl, SslAcceptor, SslMethod, SslVerifyMode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::connection::ConnectOptions;
use crate::apns::testutil::{self, Ca};
use crate::apns::tls;

/// How long a test waits for a condition before failing.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `cond` holds, checking every few milliseconds; panics after [`DEADLINE`].
pub async fn eventually(cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(DEADLINE, wait)
        .await
        .expect("the condition the test waits for");
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Position among all requests the server saw, from 0.
    pub index: usize,
    /// Which connection, counting accepted connections from 0.
    pub conn: usize,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The client certificate's subject, under certificate auth.
    pub client_cert: Option<String>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn bearer(&self) -> Option<&str> {
        self.header("authorization")?.strip_prefix("bearer ")
    }
}

pub enum Action {
    Respond {
        status: u16,
        body: String,
    },
    /// Answer nothing, keep serving the connection.
    Hang,
    /// GOAWAY (last stream: the last one received) and close, answering nothing more.
    GoAway,
    /// Close the TCP connection.
    Drop,
    /// Stop reading the connection: no answers, no PING acks, the socket stays open.
    Freeze,
}

impl Action {
    pub fn ok() -> Action {
        Action::respond(200, "")
    }
    pub fn respond(status: u16, body: &str) -> Action {
        Action::Respond {
            status,
            body: body.to_owned(),
        }
    }
    pub fn reason(status: u16, reason: &str) -> Action {
        Action::respond(status, &format!(r#"{{"reason":"{reason}"}}"#))
    }
}

type Behavior = Box<dyn Fn(&Seen) -> Action + Send + Sync>;

/// A frame the raw mode writes in answer to a request's HEADERS.
#[derive(Debug, Clone, Copy)]
pub enum RawFrame {
    GoAway { last_stream_id: u32, code: u32 },
    RstStream { stream_id: u32, code: u32 },
}

/// Raw mode: `(stream id, requests so far)` of each HEADERS frame -> frames to write.
type RawScript = Arc<dyn Fn(u32, usize) -> Vec<RawFrame> + Send + Sync>;

struct State {
    behavior: Mutex<Behavior>,
    seen: Mutex<Vec<Seen>>,
    changed: Notify,
    connections: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    /// Holds `ca_file` and anything else a test writes.
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    state: Arc<State>,
    shutdown: CancellationToken,
}

pub struct Builder {
    max_concurrent_streams: Option<u32>,
    client_ca: bool,
    raw: Option<RawScript>,
}

impl TestServer {
    pub fn builder() -> Builder {
        Builder {
            max_concurrent_streams: None,
            client_ca: false,
            raw: None,
        }
    }

    pub async fn start(behavior: impl Fn(&Seen) -> Action + Send + Sync + 'static) -> TestServer {
        TestServer::builder().start(behavior).await
    }

    pub fn set_behavior(&self, behavior: impl Fn(&Seen) -> Action + Send + Sync + 'static) {
        *self.state.behavior.lock().unwrap() = Box::new(behavior);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn max_concurrent_seen(&self) -> usize {
        self.state.max_active.load(Ordering::SeqCst)
    }

    /// Waits until `cond` holds for the requests seen so far; panics after [`DEADLINE`].
    pub async fn wait_for(&self, cond: impl Fn(&[Seen]) -> bool) {
        let wait = async {
            loop {
                let changed = self.state.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if cond(&self.state.seen.lock().unwrap()) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .expect("the server to see what the test waits for");
    }

    /// Client settings that trust this server: host `localhost`, its CA, short timeouts.
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            host: "localhost".into(),
            port: self.addr.port(),
            tls: tls::connector(Some(&self.ca_file), None, &["h2"]).unwrap(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(5),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Builder {
    pub fn max_concurrent_streams(mut self, n: u32) -> Self {
        self.max_concurrent_streams = Some(n);
        self
    }

    /// Speak HTTP/2 frames by hand instead of through h2, to send what h2's server never
    /// does (GOAWAY below streams it has seen, REFUSED_STREAM). Answers SETTINGS and PING,
    /// never answers a request.
    pub fn raw(
        mut self,
        script: impl Fn(u32, usize) -> Vec<RawFrame> + Send + Sync + 'static,
    ) -> Self {
        self.raw = Some(Arc::new(script));
        self
    }

    /// Ask for a client certificate signed by the server's CA (certificate auth).
    pub fn client_certificates(mut self) -> Self {
        self.client_ca = true;
        self
    }

    pub async fn start(
        self,
        behavior: impl Fn(&Seen) -> Action + Send + Sync + 'static,
    ) -> TestServer {
        let ca = Ca::new();
        let key = testutil::ec_key();
        let cert = ca.server(&key, &["localhost"]);
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert.to_pem().unwrap()).unwrap();

        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
        acceptor.set_private_key(&key).unwrap();
        acceptor.set_certificate(&cert).unwrap();
        acceptor.set_alpn_select_callback(|_, client| {
            openssl::ssl::select_next_proto(b"\x02h2", client).ok_or(AlpnError::NOACK)
        });
        if self.client_ca {
            acceptor.cert_store_mut().add_cert(ca.cert.clone()).unwrap();
            acceptor.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        }
        let acceptor = Arc::new(acceptor.build());

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            behavior: Mutex::new(Box::new(behavior)),
            seen: Mutex::new(Vec::new()),
            changed: Notify::new(),
            connections: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
        });
        let shutdown = CancellationToken::new();
        let (s, stop) = (state.clone(), shutdown.clone());
        let mcs = self.max_concurrent_streams;
        let raw = self.raw;
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                let conn = s.connections.fetch_add(1, Ordering::SeqCst);
                let (s, stop, acceptor, raw) =
                    (s.clone(), stop.clone(), acceptor.clone(), raw.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = serve(tcp, acceptor, s, conn, mcs, raw, stop.clone()) => {}
                    }
                });
            }
        });
        TestServer {
            addr,
            ca_file,
            dir,
            ca,
            state,
            shutdown,
        }
    }
}

enum Control {
    GoAway,
    Drop,
    Freeze,
}

async fn serve(
    tcp: TcpStream,
    acceptor: Arc<SslAcceptor>,
    state: Arc<State>,
    conn_no: usize,
    max_concurrent_streams: Option<u32>,
    raw: Option<RawScript>,
    stop: CancellationToken,
) {
    let ssl = Ssl::new(acceptor.context()).unwrap();
    let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
    if Pin::new(&mut tls).accept().await.is_err() {
        return;
    }
    if let Some(script) = raw {
        let _ = serve_raw(tls, script, state, conn_no).await;
        return;
    }
    let client_cert = tls.ssl().peer_certificate().map(|c| {
        c.subject_name()
            .entries()
            .filter_map(|e| e.data().to_string().ok())
            .collect::<Vec<_>>()
            .join(", ")
    });
    let mut builder = h2::server::Builder::new();
    if let Some(n) = max_concurrent_streams {
        builder.max_concurrent_streams(n);
    }
    let Ok(mut conn) = builder.handshake::<_, Bytes>(tls).await else {
        return;
    };
    let (control_tx, mut control) = mpsc::unbounded_channel();
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    tokio::spawn(handle(
                        request,
                        respond,
                        state.clone(),
                        conn_no,
                        client_cert.clone(),
                        control_tx.clone(),
                        stop.clone(),
                    ));
                }
                _ => return,
            },
            Some(c) = control.recv() => match c {
                Control::GoAway => conn.abrupt_shutdown(h2::Reason::NO_ERROR),
                Control::Drop => return,
                Control::Freeze => {
                    stop.cancelled().await;
                    return;
                }
            },
        }
    }
}

async fn handle(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    state: Arc<State>,
    conn: usize,
    client_cert: Option<String>,
    control: mpsc::UnboundedSender<Control>,
    stop: CancellationToken,
) {
    let active = state.active.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_active.fetch_max(active, Ordering::SeqCst);
    let (parts, mut recv) = request.into_parts();
    let mut body = Vec::new();
    while let Some(Ok(chunk)) = recv.data().await {
        let _ = recv.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    let action = {
        let mut seen = state.seen.lock().unwrap();
        let s = Seen {
            index: seen.len(),
            conn,
            path: parts.uri.path().to_owned(),
            headers: parts.headers,
            body: body.into(),
            client_cert,
        };
        let action = (state.behavior.lock().unwrap())(&s);
        seen.push(s);
        action
    };
    state.changed.notify_waiters();
    match action {
        Action::Respond { status, body } => {
            let apns_id = uuid::Uuid::new_v4().to_string();
            let response = http::Response::builder()
                .status(status)
                .header("apns-id", apns_id)
                .body(())
                .unwrap();
            state.active.fetch_sub(1, Ordering::SeqCst);
            if let Ok(mut stream) = respond.send_response(response, body.is_empty()) {
                if !body.is_empty() {
                    let _ = stream.send_data(Bytes::from(body), true);
                }
            }
        }
        Action::Hang => {
            stop.cancelled().await;
            drop(respond);
        }
        Action::GoAway => {
            let _ = control.send(Control::GoAway);
            stop.cancelled().await;
        }
        Action::Drop => {
            let _ = control.send(Control::Drop);
        }
        Action::Freeze => {
            let _ = control.send(Control::Freeze);
            stop.cancelled().await;
        }
    }
}

fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream_id.to_be_bytes());
    f.extend(payload);
    f
}

async fn serve_raw<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut io: S,
    script: RawScript,
    state: Arc<State>,
    conn_no: usize,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut preface = [0u8; 24];
    io.read_exact(&mut preface).await?;
    io.write_all(&frame(4, 0, 0, &[])).await?; // our SETTINGS: all defaults
    loop {
        let mut head = [0u8; 9];
        io.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await?;
        match kind {
            4 if flags & 1 == 0 => io.write_all(&frame(4, 1, 0, &[])).await?,
            6 if flags & 1 == 0 => io.write_all(&frame(6, 1, 0, &payload)).await?,
            1 => {
                let count = {
                    let mut seen = state.seen.lock().unwrap();
                    let index = seen.len();
                    seen.push(Seen {
                        index,
                        conn: conn_no,
                        path: String::new(),
                        headers: HeaderMap::new(),
                        body: Bytes::new(),
                        client_cert: None,
                    });
                    index + 1
                };
                state.changed.notify_waiters();
                for f in script(stream_id, count) {
                    let bytes = match f {
                        RawFrame::GoAway {
                            last_stream_id,
                            code,
                        } => {
                            let mut p = last_stream_id.to_be_bytes().to_vec();
                            p.extend(code.to_be_bytes());
                            frame(7, 0, 0, &p)
                        }
                        RawFrame::RstStream { stream_id, code } => {
                            frame(3, 0, stream_id, &code.to_be_bytes())
                        }
                    };
                    io.write_all(&bytes).await?;
                }
                io.flush().await?;
            }
            _ => {}
        }
    }
}
