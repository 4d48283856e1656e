//! The feedback service: after the TLS handshake (the same client certificate as the
//! gateway's), every queued tuple, then the connection closes. Tuples handed out are
//! forgotten, as at Apple; a connection that fails before all were written puts them back.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use openssl::ssl::Ssl;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_openssl::SslStream;
use tracing::debug;

use super::{frame, Shared};

const TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let served = tokio::time::timeout(TIMEOUT, async {
        let ssl = Ssl::new(shared.acceptor.context())?;
        let mut tls = SslStream::new(ssl, tcp)?;
        if let Err(e) = Pin::new(&mut tls).accept().await {
            shared.counters.handshakes_failed.fetch_add(1, Relaxed);
            return Err(e.into());
        }
        shared.counters.feedback_connections.fetch_add(1, Relaxed);
        let tuples = std::mem::take(&mut *shared.feedback.lock().unwrap());
        let mut out = Vec::new();
        for t in &tuples {
            frame::write_feedback(t, &mut out);
        }
        let written = async {
            tls.write_all(&out).await?;
            tls.shutdown().await
        }
        .await;
        match written {
            Ok(()) => {
                shared
                    .counters
                    .feedback_tuples
                    .fetch_add(tuples.len() as u64, Relaxed);
                debug!(%peer, tuples = tuples.len(), "feedback served");
                anyhow::Ok(())
            }
            Err(e) => {
                shared.feedback.lock().unwrap().extend(tuples);
                Err(e.into())
            }
        }
    })
    .await;
    match served {
        Ok(Ok(())) => {}
        Ok(Err(error)) => debug!(%peer, error = format!("{error:#}"), "feedback connection failed"),
        Err(_) => debug!(%peer, "feedback connection timed out"),
    }
}
