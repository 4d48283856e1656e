//! The raw link: a bare h2 client sending the drain's notifications from memory over the
//! same number of connections, with as many streams in flight as the daemon can have
//! (`batch_size * max_batches_in_flight`), to the same emulator. What pgpushd would do
//! if the database cost nothing.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use pgpushd::apns::http2::request;
use pgpushd::apns::provider_token::JwtSigner;
use pgpushd::config::Config;
use pgpushd::transport::Notification;
use tokio::net::TcpStream;

use crate::db;

pub struct RawResult {
    pub elapsed: Duration,
    pub rows: u64,
}

/// Sends rows `1..=rows` through `connections` h2 connections with up to `streams` in
/// flight in all, each request built as the daemon builds it.
pub async fn run(config_file: &Path, rows: u64, streams: usize) -> anyhow::Result<RawResult> {
    let config = Config::load(config_file)?;
    let app = Arc::new(config.apps["default"].clone());
    let pgpushd::config::Auth::Token(auth) = &app.auth else {
        bail!("the bench uses token auth");
    };
    let bearer: Arc<str> = JwtSigner::load(auth)?.token()?;
    let tls = pgpushd::tls::connector(app.ca_file.as_deref(), None, &["h2"])
        .map_err(anyhow::Error::msg)?;
    let (host, port) = request::host_port(&app.endpoint);
    let (host, port) = (host.to_owned(), port);
    let connections = app.connections;
    let per_connection = streams.div_ceil(connections);

    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(1));
    let mut workers = Vec::new();
    for _ in 0..connections {
        let tcp = TcpStream::connect((host.as_str(), port)).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_native_tls::TlsConnector::from(tls.clone())
            .connect(&host, tcp)
            .await
            .context("TLS to the emulator")?;
        // The daemon's settings (http2::connection).
        let (send, conn) = h2::client::Builder::new()
            .initial_max_send_streams(1)
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let (next, app, bearer) = (next.clone(), app.clone(), bearer.clone());
        workers.push(tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            loop {
                while in_flight.len() < per_connection {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if seq > rows {
                        break;
                    }
                    in_flight.push(exchange(send.clone(), &app, seq, &bearer));
                }
                match in_flight.next().await {
                    Some(Ok(())) => {}
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                }
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(RawResult {
        elapsed: started.elapsed(),
        rows,
    })
}

async fn exchange(
    send: h2::client::SendRequest<Bytes>,
    app: &pgpushd::config::AppConfig,
    seq: u64,
    bearer: &str,
) -> anyhow::Result<()> {
    let n = Notification {
        id: seq as i64,
        app: "default".into(),
        device_token: db::token(seq),
        payload: db::payload(seq).to_string(),
        push_type: "alert".into(),
        priority: None,
        collapse_id: None,
        topic: None,
        expires_at: None,
        attempts: 0,
        broadcast: None,
    };
    let req = request::build(&n, app, uuid::Uuid::new_v4()).map_err(anyhow::Error::msg)?;
    let mut send = send.ready().await?;
    let (response, mut stream) = send.send_request(req.to_http(Some(bearer)), false)?;
    stream.send_data(req.body.clone(), true)?;
    let response = response.await?;
    let status = response.status();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    if status != 200 {
        bail!("the emulator answered {status} to row {seq}");
    }
    Ok(())
}
