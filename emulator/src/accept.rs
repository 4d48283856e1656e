//! Accepting TCP connections until cancelled: one loop for every port the emulator
//! serves (HTTP/2, the binary gateway, the feedback service).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Hands each accepted connection, with its peer and a number counting from 1, to
/// `serve`, until `cancel`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    cancel: CancellationToken,
    mut serve: impl FnMut(TcpStream, SocketAddr, u64),
) {
    let mut next_id = 0;
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, usually: back off instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        next_id += 1;
        serve(tcp, peer, next_id);
    }
}
