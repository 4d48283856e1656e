//! The feedback service: after the TLS handshake (the same client certificate as the
//! gateway's), every queued tuple, then the connection closes. Tuples handed out are
//! forgotten, as at Apple, but only once the client has had them: once they were all
//! written, the TLS connection closed, and the client closed its end cleanly (a FIN; a
//! client that goes away with data unread resets the connection instead). A connection
//! that fails, is reset or times out before that puts them back.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use openssl::ssl::Ssl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;
use tracing::debug;

use super::{frame, FeedbackTuple, Shared};

/// For the whole connection: handshake, writing, and the client's closing.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Tuples taken from the queue for one connection. Dropped without [`Lease::done`] (an
/// error, the timeout), it puts them back.
struct Lease {
    shared: Arc<Shared>,
    tuples: Vec<FeedbackTuple>,
}

impl Lease {
    fn take(shared: &Arc<Shared>) -> Lease {
        Lease {
            shared: shared.clone(),
            tuples: std::mem::take(&mut *shared.feedback.lock().unwrap()),
        }
    }

    /// The client has them: forget them.
    fn done(mut self) -> usize {
        std::mem::take(&mut self.tuples).len()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.tuples.is_empty() {
            let mut queue = self.shared.feedback.lock().unwrap();
            // In front of any added since, as they were.
            let newer = std::mem::replace(&mut *queue, std::mem::take(&mut self.tuples));
            queue.extend(newer);
        }
    }
}

pub(super) async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let served = tokio::time::timeout(TIMEOUT, async {
        let ssl = Ssl::new(shared.acceptor.context())?;
        let mut tls = SslStream::new(ssl, tcp)?;
        if let Err(e) = Pin::new(&mut tls).accept().await {
            shared.counters.handshakes_failed.fetch_add(1, Relaxed);
            return Err(e.into());
        }
        shared.counters.feedback_connections.fetch_add(1, Relaxed);
        let lease = Lease::take(&shared);
        let mut out = Vec::new();
        for t in &lease.tuples {
            frame::write_feedback(t, &mut out);
        }
        tls.write_all(&out).await.context("writing the tuples")?;
        tls.shutdown().await.context("closing TLS")?;
        // Written is not read: wait for the client to close its end. A FIN means it read
        // everything; a reset means it went away with data unread.
        let tcp = tls.get_mut();
        let mut scrap = [0u8; 512];
        loop {
            match tcp.read(&mut scrap).await {
                Ok(0) => break,
                // Its close_notify, or anything else: not our concern.
                Ok(_) => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e).context("the client did not close cleanly"))
                }
            }
        }
        let handed_out = lease.done();
        shared
            .counters
            .feedback_tuples
            .fetch_add(handed_out as u64, Relaxed);
        debug!(%peer, tuples = handed_out, "feedback served");
        anyhow::Ok(())
    })
    .await;
    match served {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            debug!(%peer, error = format!("{error:#}"), "feedback connection failed; its tuples are kept")
        }
        Err(_) => debug!(%peer, "feedback connection timed out; its tuples are kept"),
    }
}
