//! `pgpushd health`: asks the running daemon's own `/healthz` (at the config's
//! `[metrics] listen`) whether it is well, and says what it answered; the exit code is
//! the answer. It needs nothing but the binary, so a container's health check can run
//! it in an image without curl.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;

/// What `/healthz` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    /// The status line and the body, as one line each.
    pub said: String,
}

/// Where to reach the daemon's `/healthz`: its `[metrics] listen`, on loopback when it
/// listens on every address.
pub fn address(config: &Config) -> anyhow::Result<SocketAddr> {
    let mut addr = config.metrics.listen.context(
        "the config has no [metrics] listen: the daemon serves no /healthz to ask \
         (set listen = \"127.0.0.1:9187\")",
    )?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(addr)
}

/// Asks `/healthz` at `addr`, all of it within `timeout`. `Err`: no answer at all (the
/// daemon is not running, or not listening yet).
pub async fn ask(addr: SocketAddr, timeout: Duration) -> anyhow::Result<Health> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        // /healthz answers a line or two; more would be somebody else's server.
        stream.take(64 * 1024).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}: no answer from /healthz within {timeout:?}"))?
        .with_context(|| format!("{addr}: cannot ask /healthz (is the daemon running?)"))?;
    Ok(read(&answer))
}

/// An HTTP answer as a verdict: 200 is healthy; the status line and the body's lines,
/// joined.
fn read(answer: &[u8]) -> Health {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("");
    let healthy = status_line.split_whitespace().nth(1) == Some("200");
    let body: Vec<&str> = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    Health {
        healthy,
        said: match body.is_empty() {
            true => status_line.to_owned(),
            false => format!("{status_line}: {}", body.join("; ")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_healthy_only_when_it_is_200() {
        let ok = read(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n");
        assert_eq!(
            ok,
            Health {
                healthy: true,
                said: "HTTP/1.1 200 OK: ok".into()
            }
        );
        let sick = read(
            b"HTTP/1.1 503 Service Unavailable\r\n\r\ndatabase: down\napp default: APNs refuses\n",
        );
        assert!(!sick.healthy);
        assert_eq!(
            sick.said,
            "HTTP/1.1 503 Service Unavailable: database: down; app default: APNs refuses"
        );
        assert!(!read(b"garbage").healthy);
    }

    #[tokio::test]
    async fn no_daemon_is_an_error_naming_the_address() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let e = ask(addr, Duration::from_secs(2)).await.unwrap_err();
        assert!(format!("{e:#}").contains(&addr.to_string()), "{e:#}");
    }
}
