//! The emulator as a command, for developing against APNs without Apple credentials:
//! the arguments and the run loop behind both `pgpushd-emulator` and `pgpushd emulator`.
//! `--protocol binary` runs the retired binary protocol's gateway and feedback service
//! instead ([`crate::binary`]); `--protocol fcm` runs Firebase Cloud Messaging's HTTP v1
//! API and its token endpoint ([`crate::fcm`]); `--protocol webpush` runs a Web Push
//! service (RFC 8030, 8291, 8292) that makes the subscriptions it accepts pushes for
//! ([`crate::webpush`]).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use super::binary::{BinaryEmulator, BinaryEmulatorConfig};
use super::fcm::{FcmEmulator, FcmEmulatorConfig, DEFAULT_PROJECT};
use super::webpush::{WebPushEmulator, WebPushEmulatorConfig};
use super::{Emulator, EmulatorAuth, EmulatorConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    Http2,
    /// The retired binary protocol (gateway and feedback service; needs --client-ca).
    Binary,
    /// Firebase Cloud Messaging's HTTP v1 API and OAuth token endpoint (needs --tls-dir,
    /// where it writes service-account.json, or --service-account).
    Fcm,
    /// A Web Push service: RFC 8030 push, RFC 8291 encryption, RFC 8292 VAPID (needs
    /// --tls-dir, where it writes the CA and, with --subscriptions, subscriptions.jsonl).
    Webpush,
}

#[derive(Args, Debug)]
pub struct EmulatorArgs {
    /// Address to listen on [default: 127.0.0.1:2197 (HTTP/2: APNs uses 443, 2197 is its
    /// alternative port), 127.0.0.1:2195 (binary), 127.0.0.1:2198 (fcm), 127.0.0.1:2199
    /// (webpush)].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Which APNs protocol to speak.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Http2)]
    pub protocol: ProtocolArg,
    /// Binary protocol: the feedback service's address.
    #[arg(long, default_value = "127.0.0.1:2196")]
    pub feedback_listen: SocketAddr,
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
    /// Require client certificates signed by this CA (certificate auth; the binary
    /// protocol requires it).
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// The bundle id served; requests for other topics are refused.
    #[arg(long)]
    pub topic: Option<String>,
    /// Append one JSON line per request and answer to this file.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Answer these tokens with 410 Unregistered (binary protocol: list them on the
    /// feedback service; fcm: 404 UNREGISTERED).
    #[arg(long, num_args = 1..)]
    pub unregistered: Vec<String>,
    /// Answer these tokens with 400 BadDeviceToken (binary protocol: error packet with
    /// status 8, invalid token).
    #[arg(long, num_args = 1..)]
    pub bad_token: Vec<String>,
    /// Fraction of requests answered 429/500/503 at random (0 to 1; fcm: QUOTA_EXCEEDED,
    /// INTERNAL, UNAVAILABLE).
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
    /// Also serve the broadcast channel management API on this address (Apple: port
    /// 2195 sandbox, 2196 production), with the same TLS, auth and faults [default: off].
    #[arg(long, value_name = "ADDR")]
    pub channels_listen: Option<SocketAddr>,
    /// How many channels a bundle id may have at once (Apple: 10000).
    #[arg(long, value_name = "N", default_value_t = crate::channels::DEFAULT_CHANNEL_LIMIT)]
    pub channel_limit: usize,
    /// The options of --protocol fcm (boxed: they would make `pgpushd`'s command enum
    /// lopsided).
    #[command(flatten)]
    pub fcm: Box<FcmArgs>,
    /// The options of --protocol webpush.
    #[command(flatten)]
    pub webpush: WebPushArgs,
}

/// The options only `--protocol webpush` takes.
#[derive(Args, Debug)]
pub struct WebPushArgs {
    /// webpush: make N subscriptions at start and write their PushSubscription JSON, one
    /// per line, to TLS_DIR/subscriptions.jsonl (more: POST /subscribe).
    #[arg(long, value_name = "N")]
    pub subscriptions: Option<usize>,
    /// webpush: offer only ALPN http/1.1 (an origin that speaks HTTP/1.1 only).
    #[arg(long, conflicts_with = "http2_only")]
    pub http1_only: bool,
    /// webpush: offer only ALPN h2.
    #[arg(long)]
    pub http2_only: bool,
    /// webpush: subscription ids answered 410 Gone (unsubscribed, expired).
    #[arg(long, num_args = 1..)]
    pub gone: Vec<String>,
}

/// The options only `--protocol fcm` takes.
#[derive(Args, Debug)]
pub struct FcmArgs {
    /// fcm: accept assertions signed by this service account (Google's JSON key file);
    /// repeatable.
    #[arg(long, action = clap::ArgAction::Append)]
    pub service_account: Vec<PathBuf>,
    /// fcm: the project of the service account the emulator makes in --tls-dir
    /// [default: pgpushd-emulator].
    #[arg(long)]
    pub project: Option<String>,
    /// fcm: how long access tokens are valid, e.g. "1h", "30s" [default: 1h].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub token_lifetime: Option<Duration>,
    /// fcm: the Retry-After of a 429 QUOTA_EXCEEDED, e.g. "60s" [default: 60s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retry_after: Option<Duration>,
}

impl EmulatorArgs {
    /// The fcm-only flags given, for the other protocols to refuse.
    fn fcm_only(&self) -> Option<&'static str> {
        [
            ("--service-account", !self.fcm.service_account.is_empty()),
            ("--project", self.fcm.project.is_some()),
            ("--token-lifetime", self.fcm.token_lifetime.is_some()),
            ("--retry-after", self.fcm.retry_after.is_some()),
        ]
        .into_iter()
        .find_map(|(flag, given)| given.then_some(flag))
    }

    /// The webpush-only flags given, for the other protocols to refuse.
    fn webpush_only(&self) -> Option<&'static str> {
        [
            ("--subscriptions", self.webpush.subscriptions.is_some()),
            ("--http1-only", self.webpush.http1_only),
            ("--http2-only", self.webpush.http2_only),
            ("--gone", !self.webpush.gone.is_empty()),
        ]
        .into_iter()
        .find_map(|(flag, given)| given.then_some(flag))
    }

    /// The flags of the HTTP/2 APNs mode's broadcast channels, for the other protocols
    /// to refuse.
    fn channels_only(&self) -> Option<&'static str> {
        [
            ("--channels-listen", self.channels_listen.is_some()),
            (
                "--channel-limit",
                self.channel_limit != crate::channels::DEFAULT_CHANNEL_LIMIT,
            ),
        ]
        .into_iter()
        .find_map(|(flag, given)| given.then_some(flag))
    }

    /// Refuses the flags of --protocol fcm and webpush.
    fn refuse_other_modes(&self) -> anyhow::Result<()> {
        if let Some(flag) = self.fcm_only() {
            anyhow::bail!("{flag} applies to --protocol fcm only");
        }
        if let Some(flag) = self.webpush_only() {
            anyhow::bail!("{flag} applies to --protocol webpush only");
        }
        Ok(())
    }

    fn into_config(self) -> anyhow::Result<EmulatorConfig> {
        self.refuse_other_modes()?;
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
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 2197))),
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
            channels_listen: self.channels_listen,
            channel_limit: self.channel_limit,
        })
    }

    fn into_binary_config(self) -> anyhow::Result<BinaryEmulatorConfig> {
        let http2_only = [
            ("--token-key", self.token_key.is_some()),
            ("--topic", self.topic.is_some()),
            ("--error-rate", self.error_rate != 0.0),
            ("--latency", !self.latency.is_zero()),
            ("--goaway-every", self.goaway_every.is_some()),
        ];
        if let Some((flag, _)) = http2_only.iter().find(|(_, given)| *given) {
            anyhow::bail!("{flag} applies to --protocol http2 only");
        }
        if let Some(flag) = self.channels_only() {
            anyhow::bail!("{flag} applies to --protocol http2 only");
        }
        self.refuse_other_modes()?;
        let Some(ca) = &self.client_ca else {
            anyhow::bail!(
                "--protocol binary needs --client-ca FILE: the CA that signs the client \
                 certificates it accepts (the binary protocol knows no other auth)"
            );
        };
        let client_ca_pem =
            std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        Ok(BinaryEmulatorConfig {
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 2195))),
            feedback_listen: Some(self.feedback_listen),
            tls_dir: self.tls_dir,
            client_ca_pem,
            record: self.record,
            invalid_tokens: self.bad_token,
            feedback_tokens: self.unregistered,
            keep_records: 0,
            error_delay: std::time::Duration::ZERO,
        })
    }
}

/// Runs the emulator until `shutdown` completes. Prints where it listens and the CA
/// clients must trust (its path with --tls-dir, else the PEM itself).
pub async fn run(args: EmulatorArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    match args.protocol {
        ProtocolArg::Binary => return run_binary(args, shutdown).await,
        ProtocolArg::Fcm => return run_fcm(args, shutdown).await,
        ProtocolArg::Webpush => return run_webpush(args, shutdown).await,
        ProtocolArg::Http2 => {}
    }
    let tls_dir = args.tls_dir.clone();
    let emulator = Emulator::start(args.into_config()?).await?;
    println!("APNs emulator listening on {}", emulator.endpoint());
    if let Some(channels) = emulator.channels_endpoint() {
        println!("APNs channel management listening on {channels}");
    }
    print_ca(tls_dir, emulator.ca_pem());
    shutdown.await;
    emulator.shutdown().await;
    Ok(())
}

async fn run_binary(args: EmulatorArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tls_dir = args.tls_dir.clone();
    let emulator = BinaryEmulator::start(args.into_binary_config()?).await?;
    println!(
        "APNs binary-protocol emulator: gateway on {}, feedback service on {}",
        emulator.addr(),
        emulator
            .feedback_addr()
            .map_or_else(|| "(none)".to_owned(), |a| a.to_string())
    );
    print_ca(tls_dir, emulator.ca_pem());
    shutdown.await;
    emulator.shutdown().await;
    Ok(())
}

impl EmulatorArgs {
    fn into_fcm_config(self) -> anyhow::Result<FcmEmulatorConfig> {
        let apns_only = [
            ("--token-key", self.token_key.is_some()),
            ("--client-ca", self.client_ca.is_some()),
            ("--topic", self.topic.is_some()),
            ("--bad-token", !self.bad_token.is_empty()),
        ];
        if let Some((flag, _)) = apns_only.iter().find(|(_, given)| *given) {
            anyhow::bail!("{flag} applies to the APNs protocols only, not to --protocol fcm");
        }
        if let Some(flag) = self.webpush_only() {
            anyhow::bail!("{flag} applies to --protocol webpush only");
        }
        if let Some(flag) = self.channels_only() {
            anyhow::bail!("{flag} applies to --protocol http2 only");
        }
        if !(0.0..=1.0).contains(&self.error_rate) {
            anyhow::bail!(
                "--error-rate must be between 0 and 1, not {}",
                self.error_rate
            );
        }
        let fcm = *self.fcm;
        if self.tls_dir.is_none() && fcm.service_account.is_empty() {
            anyhow::bail!(
                "--protocol fcm needs --tls-dir DIR (it writes a service account's key file, \
                 DIR/service-account.json, for clients to use) or --service-account FILE"
            );
        }
        if self.tls_dir.is_none() && fcm.project.is_some() {
            anyhow::bail!("--project names the service account made in --tls-dir: give --tls-dir");
        }
        let service_accounts = fcm
            .service_account
            .iter()
            .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let defaults = FcmEmulatorConfig::default();
        Ok(FcmEmulatorConfig {
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 2198))),
            make_service_account: self
                .tls_dir
                .is_some()
                .then(|| fcm.project.unwrap_or_else(|| DEFAULT_PROJECT.to_owned())),
            tls_dir: self.tls_dir,
            service_accounts,
            record: self.record,
            unregistered: self.unregistered,
            error_rate: self.error_rate,
            latency: self.latency,
            goaway_every: self.goaway_every,
            max_streams: self.max_streams,
            token_lifetime: fcm.token_lifetime.unwrap_or(defaults.token_lifetime),
            retry_after: fcm.retry_after.unwrap_or(defaults.retry_after),
            keep_records: 0,
        })
    }
}

async fn run_fcm(args: EmulatorArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tls_dir = args.tls_dir.clone();
    let emulator = FcmEmulator::start(args.into_fcm_config()?).await?;
    println!(
        "FCM emulator listening on {} (token endpoint {})",
        emulator.endpoint(),
        emulator.token_uri()
    );
    if let (Some(path), Some(project)) = (emulator.service_account_path(), emulator.project_id()) {
        println!(
            "service account key file: {} (project {project})",
            path.display()
        );
    }
    print_ca(tls_dir, emulator.ca_pem());
    shutdown.await;
    emulator.shutdown().await;
    Ok(())
}

impl EmulatorArgs {
    fn into_webpush_config(self) -> anyhow::Result<WebPushEmulatorConfig> {
        let apns_only = [
            ("--token-key", self.token_key.is_some()),
            ("--client-ca", self.client_ca.is_some()),
            ("--topic", self.topic.is_some()),
            ("--bad-token", !self.bad_token.is_empty()),
            ("--unregistered", !self.unregistered.is_empty()),
        ];
        if let Some((flag, _)) = apns_only.iter().find(|(_, given)| *given) {
            let hint = if flag == &"--unregistered" {
                " (webpush: --gone ID...)"
            } else {
                ""
            };
            anyhow::bail!("{flag} does not apply to --protocol webpush{hint}");
        }
        if let Some(flag) = self.fcm_only() {
            anyhow::bail!("{flag} applies to --protocol fcm only");
        }
        if let Some(flag) = self.channels_only() {
            anyhow::bail!("{flag} applies to --protocol http2 only");
        }
        if !(0.0..=1.0).contains(&self.error_rate) {
            anyhow::bail!(
                "--error-rate must be between 0 and 1, not {}",
                self.error_rate
            );
        }
        if self.tls_dir.is_none() {
            anyhow::bail!(
                "--protocol webpush needs --tls-dir DIR: it writes the CA senders must trust \
                 (DIR/ca.pem) and the subscriptions it makes (DIR/subscriptions.jsonl) there"
            );
        }
        let webpush = self.webpush;
        Ok(WebPushEmulatorConfig {
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 2199))),
            tls_dir: self.tls_dir,
            http1_only: webpush.http1_only,
            http2_only: webpush.http2_only,
            subscriptions: webpush.subscriptions.unwrap_or(0),
            gone: webpush.gone,
            record: self.record,
            error_rate: self.error_rate,
            latency: self.latency,
            goaway_every: self.goaway_every,
            max_streams: self.max_streams,
            keep_records: 0,
        })
    }
}

async fn run_webpush(args: EmulatorArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tls_dir = args.tls_dir.clone();
    let emulator = WebPushEmulator::start(args.into_webpush_config()?).await?;
    println!(
        "Web Push emulator listening on {} (push resources {}/push/ID; new subscriptions: POST {}/subscribe)",
        emulator.endpoint(),
        emulator.endpoint(),
        emulator.endpoint()
    );
    if let Some(path) = emulator.subscriptions_path() {
        println!(
            "{} subscriptions (PushSubscription JSON, one per line): {}",
            emulator.initial_subscriptions().len(),
            path.display()
        );
    }
    print_ca(tls_dir, emulator.ca_pem());
    shutdown.await;
    emulator.shutdown().await;
    Ok(())
}

fn print_ca(tls_dir: Option<PathBuf>, ca_pem: &[u8]) {
    match tls_dir {
        Some(dir) => println!("clients must trust {}", dir.join("ca.pem").display()),
        None => print!(
            "clients must trust this CA (or pass --tls-dir DIR to write it to DIR/ca.pem):\n{}",
            String::from_utf8_lossy(ca_pem)
        ),
    }
}
