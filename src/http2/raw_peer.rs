//! A peer that speaks HTTP/2 frames by hand, for what neither h2's server nor the APNs
//! emulator ever sends: a GOAWAY whose last-stream-id is below streams it has seen, a
//! REFUSED_STREAM on a connection that keeps its stream limit, answers that come late. Everything else the
//! client's tests check against the emulator (`testutil::TestEmulator`).
//!
//! TLS with a throwaway CA (trusted by the client through `ca_file`, never by skipping
//! checks) and ALPN `h2`; it answers SETTINGS and PING and answers a request only as a test scripts it.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openssl::ssl::{AlpnError, Ssl, SslAcceptor, SslMethod};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::connection::ConnectOptions;
use crate::testutil::{self, eventually, Ca};
use crate::tls;

/// A frame written in answer to a request's HEADERS.
#[derive(Debug, Clone, Copy)]
pub enum RawFrame {
    GoAway {
        last_stream_id: u32,
        code: u32,
    },
    RstStream {
        stream_id: u32,
        code: u32,
    },
    /// An answer `:status 200` with END_STREAM on `stream_id`.
    Ok200 {
        stream_id: u32,
    },
    /// Closes the connection (after writing what came before).
    Close,
}

/// `(stream id, requests so far)` of each HEADERS frame -> frames to write.
type Script = Arc<dyn Fn(u32, usize) -> Vec<RawFrame> + Send + Sync>;

pub struct RawPeer {
    port: u16,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
    requests: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

impl RawPeer {
    pub async fn start(
        script: impl Fn(u32, usize) -> Vec<RawFrame> + Send + Sync + 'static,
    ) -> RawPeer {
        let script: Script = Arc::new(script);
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
        let acceptor = Arc::new(acceptor.build());

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let (stop, count) = (shutdown.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                let (stop, acceptor, script, count) = (
                    stop.clone(),
                    acceptor.clone(),
                    script.clone(),
                    count.clone(),
                );
                tokio::spawn(async move {
                    let serve = async {
                        let ssl = Ssl::new(acceptor.context()).unwrap();
                        let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
                        if Pin::new(&mut tls).accept().await.is_ok() {
                            let _ = serve(tls, script, count).await;
                        }
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = serve => {}
                    }
                });
            }
        });
        RawPeer {
            port,
            ca_file,
            _dir: dir,
            requests,
            shutdown,
        }
    }

    /// Waits until the peer has seen `n` requests (HEADERS frames).
    pub async fn wait_for_requests(&self, n: usize) {
        eventually(|| self.requests.load(Ordering::SeqCst) >= n).await;
    }

    /// Client settings that trust this peer: host `localhost`, its CA, short timeouts.
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            service: "test",
            host: "localhost".into(),
            proxy: None,
            port: self.port,
            tls: tls::connector(Some(&self.ca_file), None, &["h2"]).unwrap(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(5),
        }
    }
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.shutdown.cancel();
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

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    script: Script,
    requests: Arc<AtomicUsize>,
) -> std::io::Result<()> {
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
            4 if flags & 1 == 0 => io.write_all(&frame(4, 1, 0, &[])).await?, // SETTINGS ack
            6 if flags & 1 == 0 => io.write_all(&frame(6, 1, 0, &payload)).await?, // PING ack
            1 => {
                // HEADERS: a request.
                let count = requests.fetch_add(1, Ordering::SeqCst) + 1;
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
                        // HEADERS, END_STREAM | END_HEADERS; HPACK static entry 8.
                        RawFrame::Ok200 { stream_id } => frame(1, 0x5, stream_id, &[0x88]),
                        RawFrame::Close => {
                            io.flush().await?;
                            return Ok(());
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
