//! How far the gateway has acknowledged what was written: the TCP socket under TLS counts
//! the bytes it takes ([`Counted`]), and the kernel says how many of them the peer has
//! not acknowledged yet (`TIOCOUTQ`, Linux): a notification's settle clock starts only
//! once the peer has its bytes (see `connection`).

use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The TCP socket under TLS, counting the bytes it takes: the stream offsets the peer's
/// acknowledgements are compared with.
pub(super) struct Counted {
    pub(super) tcp: TcpStream,
    pub(super) written: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written.fetch_add(n as u64, Ordering::SeqCst);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// How far the peer has acknowledged the bytes written to a socket. Only the reader task
/// uses it, and it holds half of the stream that owns the socket: the descriptor stays
/// open while it asks.
pub(super) struct AckProbe {
    pub(super) fd: RawFd,
    pub(super) written: Arc<AtomicU64>,
}

impl AckProbe {
    /// The stream offset the peer has acknowledged; `None` when the kernel cannot say.
    pub(super) fn acked(&self) -> Option<u64> {
        // Read before asking: bytes written in between only make the answer smaller.
        let written = self.written.load(Ordering::SeqCst);
        unacknowledged(self.fd).map(|unacked| written.saturating_sub(unacked))
    }
}

/// Bytes written to the TCP socket `fd` and not yet acknowledged by the peer.
#[cfg(target_os = "linux")]
fn unacknowledged(fd: RawFd) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ on a TCP socket) writes one int; `fd` is open (see
    // `AckProbe`).
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (r == 0).then(|| u64::try_from(n).unwrap_or(0))
}

#[cfg(not(target_os = "linux"))]
fn unacknowledged(_fd: RawFd) -> Option<u64> {
    None
}
