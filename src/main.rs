//! The `pgpushd` command: parses the command line, loads the config, sets up logging and
//! signals, then hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use pgpushd::config::Config;
use pgpushd::daemon::Daemon;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Exit codes (sysexits.h where one fits).
mod exit {
    /// The config file is missing or invalid (EX_CONFIG); nothing was started.
    pub const CONFIG: u8 = 78;
    /// Anything else that stopped the command.
    pub const FAILURE: u8 = 1;
}

#[derive(Parser)]
#[command(
    name = "pgpushd",
    version,
    about = "Delivers rows of a PostgreSQL outbox table as push notifications (APNs, FCM, Web Push)"
)]
struct Cli {
    /// Log format: `text` for terminals and journald, `json` for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run(ConfigArg),
    /// Create or upgrade the database schema (idempotent).
    Migrate(ConfigArg),
    /// Load the config and every key and certificate it names; report each problem.
    CheckConfig(ConfigArg),
    /// Ask the running daemon's /healthz (at [metrics] listen): exit 0 when healthy, 1
    /// when not or when it does not answer (a container's health check).
    Health(HealthArgs),
    /// Show the outbox: rows by app and status, the oldest due row, common errors,
    /// unregistered tokens.
    Status(StatusArgs),
    /// Send one push without the database and print the push service's answer.
    Send(SendArgs),
    /// Live Activity broadcast channels: `list` shows APNs's beside pgpushd.channels.
    #[command(subcommand)]
    Channels(ChannelsCommand),
    /// Make a VAPID key for a Web Push app (or read one with --show) and print the
    /// application server key web pages subscribe with.
    WebpushKey(WebpushKeyArgs),
    /// Run a local push service: APNs (the default), FCM or Web Push (--protocol).
    Emulator(Box<pgpushd_emulator::cli::EmulatorArgs>),
    /// Deliver N rows through a throwaway PostgreSQL and the emulator.
    Demo {
        /// How many notifications.
        #[arg(long, default_value_t = 1000)]
        rows: u64,
        /// Where they go: the APNs emulator, the FCM emulator, the Web Push emulator,
        /// APNs and FCM half each (both), or a third to each (all).
        #[arg(long, value_enum, default_value_t = DemoProvider::Apns)]
        provider: DemoProvider,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DemoProvider {
    Apns,
    Fcm,
    Webpush,
    Both,
    All,
}

#[derive(Args)]
struct ConfigArg {
    /// The TOML config file.
    #[arg(
        long,
        short,
        env = "PGPUSHD_CONFIG",
        default_value = "/etc/pgpushd/pgpushd.toml"
    )]
    config: PathBuf,
}

#[derive(Args)]
struct HealthArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// How long to wait for the answer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
struct WebpushKeyArgs {
    /// Where to write the new key (PEM, mode 600); an existing file is never replaced.
    #[arg(long, value_name = "FILE", required_unless_present = "show")]
    out: Option<PathBuf>,
    /// Read this key (PEM or raw base64url) instead, and print its application server key.
    #[arg(long, value_name = "FILE", conflicts_with = "out")]
    show: Option<PathBuf>,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Show device tokens whole (by default only their first 8 characters, as the logs).
    #[arg(long)]
    full_tokens: bool,
    /// Print one JSON object (per refresh, one per line) instead of text tables.
    #[arg(long)]
    json: bool,
    /// Refresh every INTERVAL (default 2s) until interrupted; in place on a terminal.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s",
          value_parser = watch_interval)]
    watch: Option<Duration>,
}

fn watch_interval(text: &str) -> Result<Duration, String> {
    let every = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    let min = pgpushd::commands::status::MIN_WATCH_INTERVAL;
    if every < min {
        return Err(format!("at least {}", humantime::format_duration(min)));
    }
    Ok(every)
}

#[derive(Subcommand)]
enum ChannelsCommand {
    /// List an app's channels at APNs beside pgpushd.channels, and where they differ.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// The `[apps.NAME]` section (an APNs app, protocol "http2").
        #[arg(long, default_value = "default")]
        app: String,
    },
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The `[apps.NAME]` section to send with.
    #[arg(long, default_value = "default")]
    app: String,
    /// The device token: hex for APNs, the registration token for FCM, the
    /// subscription's JSON for Web Push.
    #[arg(
        long,
        required_unless_present = "channel_id",
        conflicts_with = "channel_id"
    )]
    token: Option<String>,
    /// Instead of a token, a Live Activity broadcast channel's id (APNs, HTTP/2): the
    /// push is a broadcast to every device subscribed to it.
    #[arg(long)]
    channel_id: Option<String>,
    /// The alert text (builds `{"aps":{"alert":TEXT}}`, for FCM
    /// `{"notification":{"body":TEXT}}`).
    #[arg(long, conflicts_with = "payload", required_unless_present = "payload")]
    alert: Option<String>,
    /// The complete payload, JSON (for FCM: the message without its token).
    #[arg(long)]
    payload: Option<String>,
    /// Default: alert, or liveactivity for a broadcast.
    #[arg(long)]
    push_type: Option<String>,
    #[arg(long)]
    priority: Option<i16>,
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    collapse_id: Option<String>,
}

impl From<SendArgs> for pgpushd::commands::send::Push {
    fn from(a: SendArgs) -> Self {
        pgpushd::commands::send::Push {
            app: a.app,
            push_type: a.push_type.unwrap_or_else(|| {
                if a.channel_id.is_some() {
                    "liveactivity"
                } else {
                    "alert"
                }
                .to_owned()
            }),
            token: a.token.unwrap_or_default(),
            channel_id: a.channel_id,
            alert: a.alert,
            payload: a.payload,
            priority: a.priority,
            topic: a.topic,
            collapse_id: a.collapse_id,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon's level comes from its config (`[log] level`); errors in the file are
    // reported when the command loads it properly, below.
    let level = match &cli.command {
        Command::Demo { .. } => "warn".to_owned(),
        Command::Run(a) => {
            Config::load(&a.config).map_or_else(|_| "info".to_owned(), |c| c.log.level)
        }
        _ => "info".to_owned(),
    };
    init_logging(cli.log_format, &level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let code = runtime.block_on(dispatch(cli.command));
    // Do not wait for tasks still draining past their deadline.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn dispatch(command: Command) -> ExitCode {
    let result = match command {
        Command::Run(a) => {
            let config = match load(&a.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            // So is the database's root certificate file: missing, it would be a reconnect
            // loop.
            let problems = config.database.check_tls_files();
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("pgpushd: {}: {p}", a.config.display());
                }
                return ExitCode::from(exit::CONFIG);
            }
            // Credentials are configuration too: a bad key exits 78 before any socket opens.
            let transport = match pgpushd::providers::Providers::new(&config.apps) {
                Ok(t) => Arc::new(t),
                Err(e) => {
                    eprintln!("pgpushd: {e}");
                    return ExitCode::from(exit::CONFIG);
                }
            };
            run(a.config, config, transport).await
        }
        Command::Migrate(a) => match load(&a.config) {
            Ok(config) => pgpushd::commands::migrate::run(&config)
                .await
                .map(|done| println!("{done}")),
            Err(code) => return code,
        },
        Command::CheckConfig(a) => return check_config(&a.config),
        Command::Health(a) => {
            let config = match load(&a.config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let addr = match pgpushd::commands::health::address(&config) {
                Ok(addr) => addr,
                Err(e) => {
                    eprintln!("pgpushd: {e:#}");
                    return ExitCode::from(exit::CONFIG);
                }
            };
            match pgpushd::commands::health::ask(addr, a.timeout).await {
                Ok(h) if h.healthy => {
                    println!("{}", h.said);
                    return ExitCode::SUCCESS;
                }
                Ok(h) => Err(anyhow::anyhow!("unhealthy: {}", h.said)),
                Err(e) => Err(e),
            }
        }
        Command::Status(a) => match load(&a.config.config) {
            Ok(config) => status(&config, a).await,
            Err(code) => return code,
        },
        Command::Send(a) => match load(&a.config.config) {
            Ok(config) => pgpushd::commands::send::run(&config, a.into())
                .await
                .map(|answer| println!("{answer}")),
            Err(code) => return code,
        },
        Command::Channels(ChannelsCommand::List { config, app }) => match load(&config.config) {
            Ok(config) => pgpushd::commands::channels::list(&config, &app)
                .await
                .map(|text| print!("{text}")),
            Err(code) => return code,
        },
        Command::WebpushKey(a) => match (a.out, a.show) {
            (_, Some(path)) => pgpushd::commands::webpush_key::show(&path),
            (Some(path), None) => pgpushd::commands::webpush_key::make(&path),
            (None, None) => unreachable!("clap requires --out or --show"),
        }
        .map(|text| println!("{text}")),
        Command::Emulator(args) => pgpushd_emulator::cli::run(*args, shutdown_signal()).await,
        Command::Demo { rows, provider } => match pgpushd::demo::run(
            rows,
            match provider {
                DemoProvider::Apns => pgpushd::demo::Services::Apns,
                DemoProvider::Fcm => pgpushd::demo::Services::Fcm,
                DemoProvider::Webpush => pgpushd::demo::Services::Webpush,
                DemoProvider::Both => pgpushd::demo::Services::Both,
                DemoProvider::All => pgpushd::demo::Services::All,
            },
        )
        .await
        {
            Ok(s) if s.sent == s.rows as i64 => Ok(()),
            Ok(s) => Err(anyhow::anyhow!(
                "only {} of {} notifications were delivered",
                s.sent,
                s.rows
            )),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("pgpushd: {e:#}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// Loads the config, or reports it and returns the exit code for a config error.
fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("pgpushd: {e}");
        ExitCode::from(exit::CONFIG)
    })
}

fn check_config(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let problems = pgpushd::commands::check_config::problems(path, &config);
    if problems.is_empty() {
        println!("{}: OK ({} app(s))", path.display(), config.apps.len());
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        eprintln!("pgpushd: {p}");
    }
    ExitCode::from(exit::CONFIG)
}

async fn status(config: &Config, a: StatusArgs) -> anyhow::Result<()> {
    use pgpushd::commands::status;
    let options = status::Options {
        json: a.json,
        full_tokens: a.full_tokens,
        watch: a.watch,
    };
    let mut console = pgpushd::console::Console::stdout();
    match a.watch {
        None => status::once(&config.database, options, &mut console).await,
        Some(every) => {
            status::watch(
                &config.database,
                options,
                every,
                &mut console,
                shutdown_signal(),
            )
            .await
        }
    }
}

async fn run(
    path: PathBuf,
    config: Config,
    transport: Arc<pgpushd::providers::Providers>,
) -> anyhow::Result<()> {
    let daemon = Arc::new(Daemon::new(config, transport));
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(handle_signals(path, daemon.clone(), cancel.clone()));
    let result = daemon.run(cancel).await;
    signals.abort();
    result
}

/// SIGTERM/SIGINT: drain and stop (a second one exits at once); SIGHUP: reload.
async fn handle_signals(path: PathBuf, daemon: Arc<Daemon>, cancel: CancellationToken) {
    let mut signals = match signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return;
        }
    };
    while let Some(signal) = signals.next().await {
        let name = signal_hook::low_level::signal_name(signal).unwrap_or("signal");
        match signal {
            SIGHUP if cancel.is_cancelled() => {
                info!(signal = name, "stopping; not reloading")
            }
            SIGHUP => reload(&path, &daemon, name),
            _ if cancel.is_cancelled() => {
                warn!(
                    signal = name,
                    "second stop signal: exiting at once; claimed rows are released untouched"
                );
                std::process::exit(0);
            }
            _ => {
                info!(signal = name, "stopping");
                cancel.cancel();
            }
        }
    }
}

/// Re-reads the config; applies it only when all of it (credentials included) is valid.
fn reload(path: &Path, daemon: &Daemon, signal: &str) {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            error!(signal, error = %e, "config not reloaded; keeping the running one");
            return;
        }
    };
    match daemon.reload(&config) {
        Ok(changed) => {
            info!(signal, config = %path.display(), apps_changed = ?changed, "config reloaded");
        }
        Err(e) => error!(signal, error = %e, "config not reloaded; keeping the running one"),
    }
}

/// A future that completes on SIGTERM or SIGINT, for commands without a drain.
async fn shutdown_signal() {
    match signal_hook_tokio::Signals::new([SIGTERM, SIGINT]) {
        Ok(mut s) => {
            s.next().await;
        }
        Err(_) => futures::future::pending().await,
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Under systemd the journal adds its own timestamps.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text if under_journald => builder.without_time().with_ansi(false).init(),
        LogFormat::Text => builder.init(),
    }
}
