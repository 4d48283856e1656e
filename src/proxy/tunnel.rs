//! The HTTP CONNECT handshake (RFC 9110, 9.3.6): ask the proxy for a tunnel to
//! `host:port`, read its answer, and hand back the stream, whose bytes from then on go
//! to and from `host:port` untouched.
//!
//! The proxy's answer is untrusted: its head (status line and headers) is read byte by
//! byte, so nothing past it is consumed (those bytes belong to the tunnel), up to
//! [`MAX_HEAD`] bytes, within the caller's timeout. Any 2xx opens the tunnel; anything
//! else is a [`TunnelError::Refused`] carrying the proxy's status line.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Proxy;

/// The longest head of an answer to CONNECT read: a status line and a few headers are a
/// few hundred bytes; past this the proxy is not one.
pub const MAX_HEAD: usize = 16 * 1024;

/// The most of a refusing proxy's status line that an error repeats.
const MAX_STATUS_SHOWN: usize = 200;

/// Why no tunnel was had. Each names the proxy as `host:port`, never its credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot connect to proxy {proxy}: {message}")]
    Connect { proxy: String, message: String },
    /// The proxy answered, not with 2xx: `status` is its status line without the HTTP
    /// version, like `407 Proxy Authentication Required`.
    #[error("proxy {proxy} refused CONNECT {target}: {status}")]
    Refused {
        proxy: String,
        target: String,
        status: String,
    },
    #[error("proxy {proxy} closed the connection before answering CONNECT {target}")]
    Closed { proxy: String, target: String },
    #[error("proxy {proxy} did not answer CONNECT {target} within {after:?}")]
    Timeout {
        proxy: String,
        target: String,
        after: Duration,
    },
    #[error("proxy {proxy}'s answer to CONNECT {target} is longer than {MAX_HEAD} bytes")]
    TooLong { proxy: String, target: String },
    #[error(
        "proxy {proxy} answered CONNECT {target} with something that is not HTTP/1.x: {line:?}"
    )]
    NotHttp {
        proxy: String,
        target: String,
        line: String,
    },
    #[error("proxy {proxy}: CONNECT {target} failed: {message}")]
    Io {
        proxy: String,
        target: String,
        message: String,
    },
    #[error("{target:?} is not a host a tunnel can be asked for")]
    BadTarget { target: String },
}

/// `host:port` as CONNECT's request target writes it (IPv6 in brackets).
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// TCP to the proxy, then the handshake, all within `timeout`. `prepare` sees the
/// socket to the proxy before anything is written (TCP keepalive, NODELAY).
pub async fn open(
    proxy: &Proxy,
    host: &str,
    port: u16,
    timeout: Duration,
    prepare: impl FnOnce(&TcpStream) -> std::io::Result<()>,
) -> Result<TcpStream, TunnelError> {
    let target = authority(host, port);
    let work = async {
        let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
            .await
            .and_then(|tcp| prepare(&tcp).map(|()| tcp))
            .map_err(|e| TunnelError::Connect {
                proxy: proxy.to_string(),
                message: e.to_string(),
            })?;
        handshake(&mut tcp, proxy, &target).await?;
        Ok(tcp)
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(TunnelError::Timeout {
                proxy: proxy.to_string(),
                target: target.clone(),
                after: timeout,
            })
        })
}

/// Asks `proxy`, over `stream`, for a tunnel to `target` (`host:port`); `Ok` once it
/// answered 2xx, with nothing past its answer's head read from `stream`.
pub async fn handshake<S>(stream: &mut S, proxy: &Proxy, target: &str) -> Result<(), TunnelError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if target.is_empty() || target.contains(|c: char| c.is_control() || c.is_whitespace()) {
        return Err(TunnelError::BadTarget {
            target: target.to_owned(),
        });
    }
    let io = |e: std::io::Error| TunnelError::Io {
        proxy: proxy.to_string(),
        target: target.to_owned(),
        message: e.to_string(),
    };
    stream
        .write_all(request(proxy, target).as_bytes())
        .await
        .map_err(io)?;
    stream.flush().await.map_err(io)?;
    let head = read_head(stream, proxy, target).await?;
    let status_line = head.lines().next().unwrap_or_default();
    let not_http = || TunnelError::NotHttp {
        proxy: proxy.to_string(),
        target: target.to_owned(),
        line: shown(status_line),
    };
    let (version, status) = status_line.split_once(' ').ok_or_else(not_http)?;
    let code = status
        .get(..3)
        .filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
    if !version.starts_with("HTTP/1.") || code.is_none() {
        return Err(not_http());
    }
    if !status.starts_with('2') {
        return Err(TunnelError::Refused {
            proxy: proxy.to_string(),
            target: target.to_owned(),
            status: shown(status.trim()),
        });
    }
    Ok(())
}

/// The CONNECT request, with `Proxy-Authorization` when the proxy has credentials.
fn request(proxy: &Proxy, target: &str) -> String {
    let mut request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: pgpushd/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(authorization) = &proxy.authorization {
        request.push_str("Proxy-Authorization: ");
        request.push_str(authorization.expose());
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

/// The answer's head, up to and without its empty line; byte by byte, so that what
/// follows it stays in the stream.
async fn read_head<S>(stream: &mut S, proxy: &Proxy, target: &str) -> Result<String, TunnelError>
where
    S: AsyncRead + Unpin,
{
    let mut head = Vec::with_capacity(256);
    loop {
        let byte = match stream.read_u8().await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(TunnelError::Closed {
                    proxy: proxy.to_string(),
                    target: target.to_owned(),
                })
            }
            Err(e) => {
                return Err(TunnelError::Io {
                    proxy: proxy.to_string(),
                    target: target.to_owned(),
                    message: e.to_string(),
                })
            }
        };
        head.push(byte);
        // The head ends with an empty line; bare LFs are tolerated, as HTTP/1.1 allows.
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            return Ok(String::from_utf8_lossy(&head).into_owned());
        }
        if head.len() >= MAX_HEAD {
            return Err(TunnelError::TooLong {
                proxy: proxy.to_string(),
                target: target.to_owned(),
            });
        }
    }
}

/// Untrusted text as an error may repeat it: one line, printable, bounded.
fn shown(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MAX_STATUS_SHOWN)
        .collect()
}

#[cfg(test)]
mod tests;
