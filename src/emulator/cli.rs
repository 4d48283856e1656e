//! `pgpushd emulator`: the emulator as a command, for developing against APNs without
//! Apple credentials.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use super::{Emulator, EmulatorAuth, EmulatorConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    Http2,
}

#[derive(Args, Debug)]
pub struct EmulatorArgs {
    /// Address to listen on (APNs uses 443; 2197 is its alternative port).
    #[arg(long, default_value = "127.0.0.1:2197")]
    pub listen: SocketAddr,
    /// Which APNs protocol to speak.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Http2)]
    pub protocol: ProtocolArg,
    /// Write `ca.pem` (the CA clients must trust) and the server's certificate here.
    /// Without it the CA is printed on standard output.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Verify provider tokens signed with this key (the `.p8`, or its public key in PEM).
    #[arg(long, requires_all = ["key_id", "team_id"], conflicts_with = "client_ca")]
    pub token_key: Option<PathBuf>,
    /// The key id (`kid`) provider tokens must carry.
    #[arg(long, requires = "token_key")]
    pub key_id: Option<String>,
    /// The team id (`iss`) provider tokens must carry.
    #[arg(long, requires = "token_key")]
    pub team_id: Option<String>,
    /// Require client certificates signed by this CA (certificate auth).
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// The bundle id served; requests for other topics are refused.
    #[arg(long)]
    pub topic: Option<String>,
    /// Append one JSON line per request and answer to this file.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Answer these tokens with 410 Unregistered.
    #[arg(long, num_args = 1..)]
    pub unregistered: Vec<String>,
    /// Answer these tokens with 400 BadDeviceToken.
    #[arg(long, num_args = 1..)]
    pub bad_token: Vec<String>,
    /// Fraction of requests answered 429/500/503 at random (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Delay before every answer, e.g. "20ms".
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub latency: Duration,
    /// Send GOAWAY after every N requests on a connection.
    #[arg(long)]
    pub goaway_every: Option<u64>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS (APNs: 1000).
    #[arg(long, default_value_t = 1000)]
    pub max_streams: u32,
}

impl EmulatorArgs {
    fn into_config(self) -> anyhow::Result<EmulatorConfig> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            anyhow::bail!(
                "--error-rate must be between 0 and 1, not {}",
                self.error_rate
            );
        }
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let auth = match (&self.token_key, &self.client_ca) {
            (Some(key), _) => EmulatorAuth::Token {
                public_key_pem: read(key)?,
                key_id: self.key_id.clone().unwrap_or_default(),
                team_id: self.team_id.clone().unwrap_or_default(),
            },
            (None, Some(ca)) => EmulatorAuth::ClientCertificate { ca_pem: read(ca)? },
            (None, None) => EmulatorAuth::None,
        };
        Ok(EmulatorConfig {
            listen: self.listen,
            tls_dir: self.tls_dir,
            auth,
            topic: self.topic,
            record: self.record,
            unregistered: self.unregistered,
            bad_tokens: self.bad_token,
            error_rate: self.error_rate,
            latency: self.latency,
            goaway_every: self.goaway_every,
            max_streams: self.max_streams,
            keep_records: 0,
        })
    }
}

/// Runs the emulator until `shutdown` completes.
pub async fn run(args: EmulatorArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tls_dir = args.tls_dir.clone();
    let emulator = Emulator::start(args.into_config()?).await?;
    println!("APNs emulator listening on {}", emulator.endpoint());
    match tls_dir {
        Some(dir) => println!("clients must trust {}", dir.join("ca.pem").display()),
        None => print!(
            "clients must trust this CA (or pass --tls-dir DIR to write it to DIR/ca.pem):\n{}",
            String::from_utf8_lossy(emulator.ca_pem())
        ),
    }
    shutdown.await;
    emulator.shutdown().await;
    Ok(())
}
