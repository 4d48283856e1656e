//! `[apps.NAME]`: one section per app the outbox names — which push service it uses
//! ([`Provider`]: APNs, FCM with its `[apps.NAME.fcm]`, or Web Push with its
//! `[apps.NAME.webpush]`), where its notifications go
//! ([`Endpoint`], [`Protocol`]), how it authenticates ([`Auth`]), and the binary
//! protocol's own settings ([`BinaryConfig`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration;
use super::network::NetworkConfig;
use super::validate::{Validator, DAY, MINUTE};
use super::{ConfigError, EnvVars};
use crate::host_list::HostList;
use crate::proxy::ProxyPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Production,
    Sandbox,
}

/// The push service an app delivers through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Apple Push Notification service (the default).
    Apns,
    /// Firebase Cloud Messaging, HTTP v1.
    Fcm,
    /// Web Push (RFC 8030, 8291, 8292), to browsers.
    Webpush,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http2,
    Binary,
}

/// Where an app's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Apple's servers for that environment and protocol.
    Apple(Environment),
    /// Any other host (FCM's, an emulator, a gateway): `https://host:port` or `host:port`.
    Custom { host: String, port: u16 },
    /// Web Push: each row's subscription names its push service.
    PerRow,
}

/// FCM's endpoint unless `endpoint` says otherwise.
pub const FCM_HOST: &str = "fcm.googleapis.com";

#[derive(Debug, Clone)]
pub struct AppConfig {
    pub name: String,
    /// The bundle id (APNs only); push types that need a suffix get it appended.
    pub topic: Option<String>,
    pub endpoint: Endpoint,
    /// An extra CA to trust (besides the system's) for the endpoint.
    pub ca_file: Option<PathBuf>,
    pub protocol: Protocol,
    /// Long-lived connections per app.
    pub connections: usize,
    /// Upper bound on one request, from write to answer.
    pub request_timeout: Duration,
    /// Its credentials, which also say its provider: [`Auth::Fcm`] for an FCM app.
    pub auth: Auth,
    /// What only the binary protocol has; the defaults (and unused) for HTTP/2 apps.
    pub binary: BinaryConfig,
    /// APNs's channel management API (broadcast channels), for an HTTP/2 APNs app:
    /// `Apple(env)` is api-manage-broadcast(.sandbox).push.apple.com; `None` when the
    /// app has none (another provider or protocol, or an `endpoint` without
    /// `channels_endpoint`).
    pub channels: Option<Endpoint>,
    /// The proxy its connections (HTTP/2, gateway, feedback) go through: its `proxy` key,
    /// else `[network] proxy`, else `HTTPS_PROXY` and `NO_PROXY`.
    pub proxy: ProxyPolicy,
}

/// Settings of the binary protocol (`protocol = "binary"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryConfig {
    /// The protocol never says "accepted": a notification counts as sent once this long
    /// has passed since it was written without an error packet naming it or one before it.
    /// Longer is safer against slow error packets, and makes every row wait that long.
    pub settle: Duration,
    /// The feedback service to poll for tokens APNs stopped delivering to; `None`: off.
    pub feedback: Option<FeedbackConfig>,
}

impl Default for BinaryConfig {
    fn default() -> Self {
        BinaryConfig {
            settle: defaults::binary_settle(),
            feedback: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackConfig {
    /// `Apple(env)`: feedback(.sandbox).push.apple.com:2196.
    pub endpoint: Endpoint,
    pub interval: Duration,
}

#[derive(Debug, Clone)]
pub enum Auth {
    /// APNs, HTTP/2 token auth.
    Token(TokenAuth),
    /// APNs, a client certificate.
    Certificate(CertificateAuth),
    /// FCM: a service account (`provider = "fcm"`).
    Fcm(FcmAuth),
    /// Web Push: the VAPID key and subject (`provider = "webpush"`).
    Webpush(WebpushAuth),
}

/// `[apps.NAME.webpush]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebpushAuth {
    /// The VAPID key: a P-256 private key, PEM or the raw base64url form web-push tools
    /// print (`pgpushd webpush-key` makes one); read when the app loads.
    pub key_file: PathBuf,
    /// Who to contact about this sender (`mailto:` or `https:`): push services require it.
    pub subject: String,
    /// How long a push service keeps a row's message for an offline browser when the row
    /// has no `expires_at` (the `TTL` header).
    pub ttl: Duration,
    /// The push services a subscription may name (its endpoint's host and port); a row
    /// for any other fails unsent. The browsers' by default.
    pub push_services: HostList,
}

/// The browsers' push services (Chrome's and the others' on Google's, with the endpoints
/// of Chrome's first years; Firefox's, Safari's, Edge's): `push_services` when the
/// config does not say.
pub const BROWSER_PUSH_SERVICES: [&str; 5] = [
    "fcm.googleapis.com",
    "android.googleapis.com",
    "push.services.mozilla.com",
    "web.push.apple.com",
    "notify.windows.com",
];

/// `[apps.NAME.fcm]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FcmAuth {
    /// The JSON key of a service account (Firebase console > Project settings > Service
    /// accounts > Generate new private key); read when the app loads.
    pub service_account_file: PathBuf,
    /// The Firebase project to send as; `None`: the key's. A key of another project is
    /// refused when the app loads.
    pub project_id: Option<String>,
}

impl Provider {
    /// The service's name, in the log and in `/healthz`.
    pub fn service(self) -> &'static str {
        match self {
            Provider::Apns => "APNs",
            Provider::Fcm => "FCM",
            Provider::Webpush => "Web Push",
        }
    }
}

impl AppConfig {
    pub fn provider(&self) -> Provider {
        match self.auth {
            Auth::Fcm(_) => Provider::Fcm,
            Auth::Webpush(_) => Provider::Webpush,
            Auth::Token(_) | Auth::Certificate(_) => Provider::Apns,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenAuth {
    /// The `.p8` file Apple hands out (a PKCS#8 P-256 private key).
    pub key_file: PathBuf,
    pub key_id: String,
    pub team_id: String,
}

#[derive(Debug, Clone)]
pub struct CertificateAuth {
    /// PEM (certificate + key, the key possibly encrypted) or PKCS#12.
    pub file: PathBuf,
    /// Holds the passphrase of the key or the .p12; a file so systemd credentials work.
    pub passphrase_file: Option<PathBuf>,
}

/// The binary protocol's feedback service listens here on Apple's hosts.
pub const FEEDBACK_PORT: u16 = 2196;

/// The port of a `channels_endpoint` that names none: the channel management API's in
/// production (the sandbox's is 2195).
pub const CHANNELS_PORT: u16 = 2196;

// ---- the section, as serde reads it ----------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AppFile {
    #[serde(default = "defaults::provider")]
    provider: Provider,
    topic: Option<String>,
    environment: Option<Environment>,
    endpoint: Option<String>,
    ca_file: Option<PathBuf>,
    protocol: Option<Protocol>,
    #[serde(default = "defaults::connections")]
    connections: i64,
    #[serde(default = "defaults::request_timeout", with = "duration")]
    request_timeout: Duration,
    token: Option<TokenFile>,
    certificate: Option<CertificateFile>,
    #[serde(default, with = "duration::optional")]
    binary_settle: Option<Duration>,
    #[serde(default, with = "duration::optional")]
    feedback_interval: Option<Duration>,
    feedback_endpoint: Option<String>,
    channels_endpoint: Option<String>,
    proxy: Option<String>,
    fcm: Option<FcmFile>,
    webpush: Option<WebpushFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebpushFile {
    key_file: PathBuf,
    subject: String,
    #[serde(default = "defaults::webpush_ttl", with = "duration")]
    ttl: Duration,
    push_services: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FcmFile {
    service_account_file: PathBuf,
    project_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    key_file: PathBuf,
    key_id: String,
    team_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateFile {
    file: PathBuf,
    passphrase_file: Option<PathBuf>,
}

/// The binary protocol's keys of an `[apps.NAME]` section, as written.
struct BinaryKeys {
    settle: Option<Duration>,
    feedback_interval: Option<Duration>,
    feedback_endpoint: Option<String>,
}

mod defaults {
    use super::{Protocol, Provider};
    use std::time::Duration;

    pub fn provider() -> Provider {
        Provider::Apns
    }
    pub fn protocol() -> Protocol {
        Protocol::Http2
    }
    pub fn connections() -> i64 {
        2
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn binary_settle() -> Duration {
        Duration::from_millis(500)
    }
    pub fn feedback_interval() -> Duration {
        Duration::from_secs(3600)
    }
    /// Four weeks, as web-push libraries default to (and about what the services keep).
    pub fn webpush_ttl() -> Duration {
        Duration::from_secs(28 * 24 * 3600)
    }
}

// ---- validation ------------------------------------------------------------------------

impl Validator<'_> {
    pub(super) fn app(
        &self,
        name: String,
        mut a: AppFile,
        network: &NetworkConfig,
        env: &EnvVars,
    ) -> Result<AppConfig, ConfigError> {
        let key = |k: &str| format!("apps.{name}.{k}");
        let proxy = a
            .proxy
            .take()
            .map(|p| self.proxy_setting(&key("proxy"), &p))
            .transpose()?;
        let proxy = self.proxy_policy(&key("proxy"), proxy, network, env)?;
        match a.provider {
            Provider::Fcm => return self.fcm_app(name, a, proxy),
            Provider::Webpush => return self.webpush_app(name, a, proxy),
            Provider::Apns => {}
        }
        if a.fcm.is_some() {
            return Err(self.invalid(
                key("fcm"),
                "only applies to provider = \"fcm\" (this app's provider is \"apns\")",
            ));
        }
        if a.webpush.is_some() {
            return Err(self.invalid(
                key("webpush"),
                "only applies to provider = \"webpush\" (this app's provider is \"apns\")",
            ));
        }
        let protocol = a.protocol.unwrap_or_else(defaults::protocol);
        let endpoint =
            match (a.endpoint, a.environment) {
                (Some(_), Some(_)) => return Err(self.invalid(
                    key("endpoint"),
                    "set either environment (Apple's servers) or endpoint (another host), not both",
                )),
                (Some(e), None) => {
                    let (host, port) = parse_endpoint(&e, protocol)
                        .map_err(|m| self.invalid(key("endpoint"), m))?;
                    Endpoint::Custom { host, port }
                }
                (None, env) => Endpoint::Apple(env.unwrap_or(Environment::Production)),
            };
        let auth = self.auth(&name, protocol, a.token, a.certificate)?;
        if let Some(t) = &a.topic {
            if t.is_empty() || t.contains(char::is_whitespace) {
                return Err(self.invalid(key("topic"), format!("{t:?} is not a bundle id")));
            }
        }
        let binary = self.binary(
            &name,
            protocol,
            BinaryKeys {
                settle: a.binary_settle,
                feedback_interval: a.feedback_interval,
                feedback_endpoint: a.feedback_endpoint,
            },
            &endpoint,
        )?;
        let channels = self.channels(&name, protocol, a.channels_endpoint, &endpoint)?;
        Ok(AppConfig {
            connections: self.connections(&name, a.connections)?,
            request_timeout: self.request_timeout(&name, a.request_timeout)?,
            ca_file: a.ca_file.map(|p| self.file_path(p)),
            topic: a.topic,
            endpoint,
            protocol,
            auth,
            binary,
            channels,
            proxy,
            name,
        })
    }

    /// `connections`, which every provider's app takes.
    fn connections(&self, name: &str, value: i64) -> Result<usize, ConfigError> {
        self.positive(&format!("apps.{name}.connections"), value, 64)
    }

    /// `request_timeout`, which every provider's app takes.
    fn request_timeout(&self, name: &str, value: Duration) -> Result<Duration, ConfigError> {
        self.bounded(&format!("apps.{name}.request_timeout"), value, 10 * MINUTE)
    }

    /// APNs's keys, refused in an app of another provider.
    fn no_apns_keys(&self, name: &str, a: &AppFile) -> Result<(), ConfigError> {
        let apns_only = [
            ("topic", a.topic.is_some()),
            ("environment", a.environment.is_some()),
            ("protocol", a.protocol.is_some()),
            ("token", a.token.is_some()),
            ("certificate", a.certificate.is_some()),
            ("binary_settle", a.binary_settle.is_some()),
            ("feedback_interval", a.feedback_interval.is_some()),
            ("feedback_endpoint", a.feedback_endpoint.is_some()),
            ("channels_endpoint", a.channels_endpoint.is_some()),
        ];
        match apns_only.iter().find(|(_, set)| *set) {
            Some((k, _)) => Err(self.invalid(
                format!("apps.{name}.{k}"),
                format!(
                    "only applies to APNs apps; this app's provider is \"{}\"",
                    match a.provider {
                        Provider::Fcm => "fcm",
                        _ => "webpush",
                    }
                ),
            )),
            None => Ok(()),
        }
    }

    /// `push_services` as written (the browsers' when absent): at least one, each a host.
    fn push_services(
        &self,
        key: &str,
        written: Option<Vec<String>>,
    ) -> Result<HostList, ConfigError> {
        let entries = written.unwrap_or_else(|| BROWSER_PUSH_SERVICES.map(str::to_owned).to_vec());
        if entries.is_empty() {
            return Err(self.invalid(
                key,
                "is empty: list the push services subscriptions may name, or \"*\" for any \
                 (leave it out for the browsers' own)",
            ));
        }
        HostList::from_entries(&entries).map_err(|m| self.invalid(key, m))
    }

    /// A Web Push app: `[apps.NAME.webpush]`, the shared keys, none of APNs's or FCM's,
    /// and no `endpoint`: each row's subscription names its push service.
    fn webpush_app(
        &self,
        name: String,
        a: AppFile,
        proxy: ProxyPolicy,
    ) -> Result<AppConfig, ConfigError> {
        let key = |k: &str| format!("apps.{name}.{k}");
        self.no_apns_keys(&name, &a)?;
        let others = [
            ("fcm", a.fcm.is_some(), "only applies to provider = \"fcm\""),
            (
                "endpoint",
                a.endpoint.is_some(),
                "a Web Push app has none: each row's subscription names its push service",
            ),
        ];
        if let Some((k, _, why)) = others.iter().find(|(_, set, _)| *set) {
            return Err(self.invalid(
                key(k),
                format!("{why} (this app's provider is \"webpush\")"),
            ));
        }
        let Some(webpush) = a.webpush else {
            return Err(self.invalid(
                format!("apps.{name}"),
                format!(
                    "provider = \"webpush\" needs [apps.{name}.webpush] with key_file (the \
                     VAPID key; `pgpushd webpush-key` makes one) and subject (mailto: or \
                     https:)"
                ),
            ));
        };
        let subject = webpush.subject.trim();
        let has_rest = |scheme: &str| {
            subject
                .strip_prefix(scheme)
                .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace))
        };
        if !(has_rest("mailto:") || has_rest("https://")) {
            return Err(self.invalid(
                key("webpush.subject"),
                format!(
                    "{subject:?}: push services require a contact, a mailto: address or an \
                     https: URL (\"mailto:ops@example.com\")"
                ),
            ));
        }
        Ok(AppConfig {
            connections: self.connections(&name, a.connections)?,
            request_timeout: self.request_timeout(&name, a.request_timeout)?,
            ca_file: a.ca_file.map(|p| self.file_path(p)),
            topic: None,
            endpoint: Endpoint::PerRow,
            protocol: Protocol::Http2,
            auth: Auth::Webpush(WebpushAuth {
                key_file: self.file_path(webpush.key_file),
                subject: subject.to_owned(),
                ttl: self.bounded(&key("webpush.ttl"), webpush.ttl, 28 * DAY)?,
                push_services: self
                    .push_services(&key("webpush.push_services"), webpush.push_services)?,
            }),
            binary: BinaryConfig::default(),
            channels: None,
            proxy,
            name,
        })
    }

    /// An FCM app: `[apps.NAME.fcm]`, the shared keys, and none of APNs's.
    fn fcm_app(
        &self,
        name: String,
        a: AppFile,
        proxy: ProxyPolicy,
    ) -> Result<AppConfig, ConfigError> {
        let key = |k: &str| format!("apps.{name}.{k}");
        self.no_apns_keys(&name, &a)?;
        if a.webpush.is_some() {
            return Err(self.invalid(
                key("webpush"),
                "only applies to provider = \"webpush\" (this app's provider is \"fcm\")",
            ));
        }
        let Some(fcm) = a.fcm else {
            return Err(self.invalid(
                format!("apps.{name}"),
                format!(
                    "provider = \"fcm\" needs [apps.{name}.fcm] with service_account_file \
                     (the service account's JSON key)"
                ),
            ));
        };
        if let Some(p) = &fcm.project_id {
            // It goes into the request's path: a project id is lower-case letters,
            // digits and hyphens.
            if p.is_empty()
                || !p
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(self.invalid(
                    key("fcm.project_id"),
                    format!("{p:?} is not a Firebase project id (lower-case letters, digits, '-')"),
                ));
            }
        }
        let (host, port) = match &a.endpoint {
            Some(e) => {
                parse_endpoint_with_port(e, 443).map_err(|m| self.invalid(key("endpoint"), m))?
            }
            None => (FCM_HOST.to_owned(), 443),
        };
        Ok(AppConfig {
            connections: self.connections(&name, a.connections)?,
            request_timeout: self.request_timeout(&name, a.request_timeout)?,
            ca_file: a.ca_file.map(|p| self.file_path(p)),
            topic: None,
            endpoint: Endpoint::Custom { host, port },
            protocol: Protocol::Http2,
            auth: Auth::Fcm(FcmAuth {
                service_account_file: self.file_path(fcm.service_account_file),
                project_id: fcm.project_id,
            }),
            binary: BinaryConfig::default(),
            channels: None,
            proxy,
            name,
        })
    }

    /// Exactly one of `[apps.NAME.token]` and `[apps.NAME.certificate]`.
    fn auth(
        &self,
        name: &str,
        protocol: Protocol,
        token: Option<TokenFile>,
        certificate: Option<CertificateFile>,
    ) -> Result<Auth, ConfigError> {
        let key = |k: &str| format!("apps.{name}.{k}");
        Ok(match (token, certificate) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    format!("apps.{name}"),
                    "has both [token] and [certificate]; choose one auth mode",
                ))
            }
            (None, None) => {
                return Err(self.invalid(
                    format!("apps.{name}"),
                    format!(
                        "needs [apps.{name}.token] (key_file, key_id, team_id) \
                         or [apps.{name}.certificate] (file)"
                    ),
                ))
            }
            (Some(t), None) => {
                if protocol == Protocol::Binary {
                    return Err(self.invalid(
                        key("token"),
                        "the binary protocol only knows certificate auth; use [certificate]",
                    ));
                }
                for (k, v) in [("key_id", &t.key_id), ("team_id", &t.team_id)] {
                    if v.len() != 10 || !v.chars().all(|c| c.is_ascii_alphanumeric()) {
                        return Err(self.invalid(
                            key(&format!("token.{k}")),
                            format!("{v:?} is not a 10-character Apple identifier"),
                        ));
                    }
                }
                Auth::Token(TokenAuth {
                    key_file: self.file_path(t.key_file),
                    key_id: t.key_id,
                    team_id: t.team_id,
                })
            }
            (None, Some(c)) => Auth::Certificate(CertificateAuth {
                file: self.file_path(c.file),
                passphrase_file: c.passphrase_file.map(|p| self.file_path(p)),
            }),
        })
    }

    /// Where an HTTP/2 APNs app's channel management API is: `channels_endpoint`, else
    /// Apple's for its environment; none beside an `endpoint` of another host unless
    /// `channels_endpoint` says where (an emulator serves it on a listener of its own).
    fn channels(
        &self,
        name: &str,
        protocol: Protocol,
        channels_endpoint: Option<String>,
        endpoint: &Endpoint,
    ) -> Result<Option<Endpoint>, ConfigError> {
        let key = format!("apps.{name}.channels_endpoint");
        match (channels_endpoint, protocol, endpoint) {
            (Some(_), Protocol::Binary, _) => Err(self.invalid(
                key,
                "only applies to protocol = \"http2\" (broadcast channels are the provider API's)",
            )),
            (Some(text), _, _) => {
                let (host, port) = parse_endpoint_with_port(&text, CHANNELS_PORT)
                    .map_err(|m| self.invalid(key, m))?;
                Ok(Some(Endpoint::Custom { host, port }))
            }
            (None, Protocol::Http2, Endpoint::Apple(env)) => Ok(Some(Endpoint::Apple(*env))),
            (None, _, _) => Ok(None),
        }
    }

    /// The binary protocol's keys; an HTTP/2 app may not set them.
    fn binary(
        &self,
        name: &str,
        protocol: Protocol,
        a: BinaryKeys,
        endpoint: &Endpoint,
    ) -> Result<BinaryConfig, ConfigError> {
        let key = |k: &str| format!("apps.{name}.{k}");
        if protocol != Protocol::Binary {
            let set = [
                ("binary_settle", a.settle.is_some()),
                ("feedback_interval", a.feedback_interval.is_some()),
                ("feedback_endpoint", a.feedback_endpoint.is_some()),
            ];
            if let Some((k, _)) = set.iter().find(|(_, set)| *set) {
                return Err(self.invalid(key(k), "only applies to protocol = \"binary\""));
            }
            return Ok(BinaryConfig::default());
        }
        let settle = match a.settle {
            Some(s) => self.bounded(&key("binary_settle"), s, MINUTE)?,
            None => defaults::binary_settle(),
        };
        let interval = match a.feedback_interval {
            // "0s" is allowed: it turns the poller off.
            Some(i) => self.at_most(&key("feedback_interval"), i, 7 * DAY)?,
            None => defaults::feedback_interval(),
        };
        let feedback_endpoint = match (&a.feedback_endpoint, endpoint) {
            (Some(text), _) => {
                let (host, port) = parse_endpoint_with_port(text, FEEDBACK_PORT)
                    .map_err(|m| self.invalid(key("feedback_endpoint"), m))?;
                Endpoint::Custom { host, port }
            }
            (None, Endpoint::Apple(env)) => Endpoint::Apple(*env),
            // A gateway elsewhere (an emulator): its feedback service on Apple's port.
            (None, Endpoint::Custom { host, .. }) => Endpoint::Custom {
                host: host.clone(),
                port: FEEDBACK_PORT,
            },
            (None, Endpoint::PerRow) => unreachable!("an APNs app has an endpoint"),
        };
        Ok(BinaryConfig {
            settle,
            feedback: (!interval.is_zero()).then_some(FeedbackConfig {
                endpoint: feedback_endpoint,
                interval,
            }),
        })
    }
}

/// `https://host:port`, `host:port` or `host` (default port by protocol).
fn parse_endpoint(text: &str, protocol: Protocol) -> Result<(String, u16), String> {
    let default_port = match protocol {
        Protocol::Http2 => 443,
        Protocol::Binary => 2195,
    };
    parse_endpoint_with_port(text, default_port)
}

fn parse_endpoint_with_port(text: &str, default_port: u16) -> Result<(String, u16), String> {
    let rest = text
        .strip_prefix("https://")
        .unwrap_or(text)
        .trim_end_matches('/');
    if rest.contains("://") || rest.contains('/') {
        return Err(format!("{text:?}: expected https://host:port or host:port"));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (rest, default_port), // bare IPv6
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{text:?}: {p:?} is not a port"))?,
        ),
        None => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{text:?}: no host"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::testing::{parse, MINIMAL};
    use super::*;

    #[test]
    fn webpush_apps_take_a_vapid_key_and_a_subject_and_no_endpoint() {
        let web = "[apps.web]\nprovider = \"webpush\"\n";
        let section = "[apps.web.webpush]\nkey_file = \"vapid.pem\"\n";
        let c = parse(&format!(
            "{MINIMAL}{web}connections = 3\n{section}subject = \" mailto:ops@example.com \"\n"
        ))
        .unwrap();
        let a = &c.apps["web"];
        assert_eq!(a.provider(), Provider::Webpush);
        assert_eq!((a.endpoint.clone(), a.connections), (Endpoint::PerRow, 3));
        let Auth::Webpush(w) = &a.auth else { panic!() };
        assert_eq!(w.subject, "mailto:ops@example.com");
        assert_eq!(w.ttl, Duration::from_secs(28 * 24 * 3600));
        assert!(w.key_file.ends_with("vapid.pem"));
        // The browsers' push services, and the names under them, by default.
        for (host, allowed) in [
            ("fcm.googleapis.com", true),
            ("android.googleapis.com", true),
            ("updates.push.services.mozilla.com", true),
            ("web.push.apple.com", true),
            ("wns2-by3p.notify.windows.com", true),
            ("push.example", false),
            ("169.254.169.254", false),
            ("localhost", false),
        ] {
            assert_eq!(w.push_services.matches(host, 443), allowed, "{host}");
        }
        let own = parse(&format!(
            "{MINIMAL}{web}{section}subject = \"mailto:a@b\"\n\
             push_services = [\"push.example:8443\", \"10.0.0.0/8\"]\n"
        ))
        .unwrap();
        let Auth::Webpush(w) = &own.apps["web"].auth else {
            panic!()
        };
        assert!(w.push_services.matches("push.example", 8443));
        assert!(w.push_services.matches("10.1.2.3", 443));
        assert!(!w.push_services.matches("push.example", 443));
        assert!(!w.push_services.matches("fcm.googleapis.com", 443));

        let refused = [
            (
                format!("{web}{section}subject = \"mailto:a@b\"\npush_services = []\n"),
                "apps.web.webpush.push_services: is empty",
            ),
            (
                format!("{web}{section}subject = \"mailto:a@b\"\npush_services = [\"push.example\", \"https://x/\"]\n"),
                "apps.web.webpush.push_services: \"https://x/\" is not a host",
            ),
            (
                format!("{web}{section}subject = \"ops@example.com\"\n"),
                "apps.web.webpush.subject: \"ops@example.com\": push services require",
            ),
            (
                format!("{web}{section}subject = \"mailto:\"\n"),
                "apps.web.webpush.subject",
            ),
            (
                format!("{web}{section}subject = \"https://x.example\"\nttl = \"60d\"\n"),
                "apps.web.webpush.ttl",
            ),
            (
                format!("{web}endpoint = \"https://push.example\"\n{section}subject = \"mailto:a@b\"\n"),
                "apps.web.endpoint: a Web Push app has none",
            ),
            (
                format!("{web}topic = \"com.example\"\n{section}subject = \"mailto:a@b\"\n"),
                "apps.web.topic: only applies to APNs apps; this app's provider is \"webpush\"",
            ),
            (web.to_owned(), "provider = \"webpush\" needs [apps.web.webpush]"),
            (
                format!("[apps.web]\n{section}subject = \"mailto:a@b\"\n[apps.web.token]\nkey_file = \"k.p8\"\nkey_id = \"ABC123DEFG\"\nteam_id = \"DEF123GHIJ\"\n"),
                "apps.web.webpush: only applies to provider = \"webpush\"",
            ),
        ];
        for (text, expected) in refused {
            let e = parse(&format!("{MINIMAL}{text}")).unwrap_err().to_string();
            assert!(e.contains(expected), "{expected}: {e}");
        }
    }

    #[test]
    fn binary_apps_get_settle_and_feedback_defaults() {
        let cert = "[apps.{name}.certificate]\nfile = \"ck.pem\"\npassphrase_file = \"ck.pass\"\n";
        let app = |name: &str, body: &str| {
            format!("[apps.{name}]\n{body}\n{}", cert.replace("{name}", name))
        };
        let c = parse(&format!(
            "{MINIMAL}{}{}{}{}",
            app("apple", "protocol = \"binary\"\nenvironment = \"sandbox\""),
            app(
                "emu",
                "protocol = \"binary\"\nendpoint = \"127.0.0.1:12195\"\nbinary_settle = \"50ms\"\n\
                 feedback_interval = \"10s\""
            ),
            app(
                "elsewhere",
                "protocol = \"binary\"\nendpoint = \"gw.example.com\"\n\
                 feedback_endpoint = \"fb.example.com\""
            ),
            app("quiet", "protocol = \"binary\"\nfeedback_interval = \"0s\""),
        ))
        .unwrap();
        let apple = &c.apps["apple"];
        assert_eq!(apple.binary.settle, Duration::from_millis(500));
        assert_eq!(
            apple.binary.feedback,
            Some(FeedbackConfig {
                endpoint: Endpoint::Apple(Environment::Sandbox),
                interval: Duration::from_secs(3600),
            })
        );
        let emu = &c.apps["emu"];
        assert_eq!(
            emu.endpoint,
            Endpoint::Custom {
                host: "127.0.0.1".into(),
                port: 12195
            }
        );
        assert_eq!(emu.binary.settle, Duration::from_millis(50));
        assert_eq!(
            emu.binary.feedback,
            Some(FeedbackConfig {
                endpoint: Endpoint::Custom {
                    host: "127.0.0.1".into(),
                    port: 2196
                },
                interval: Duration::from_secs(10),
            })
        );
        let elsewhere = c.apps["elsewhere"].binary.feedback.as_ref().unwrap();
        assert_eq!(
            elsewhere.endpoint,
            Endpoint::Custom {
                host: "fb.example.com".into(),
                port: 2196
            }
        );
        assert_eq!(c.apps["quiet"].binary.feedback, None);
        match &apple.auth {
            Auth::Certificate(a) => assert_eq!(a.file, Path::new("/etc/pgpushd/ck.pem")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn binary_keys_are_refused_elsewhere() {
        let e = parse(&format!(
            "{MINIMAL}[apps.a]\nbinary_settle = \"1s\"\n[apps.a.certificate]\nfile = \"ck.pem\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.ends_with("apps.a.binary_settle: only applies to protocol = \"binary\""),
            "{e}"
        );
        let e = parse(&format!(
            "{MINIMAL}[apps.a]\nprotocol = \"binary\"\nbinary_settle = \"0s\"\n\
             [apps.a.certificate]\nfile = \"ck.pem\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.ends_with("apps.a.binary_settle: must be longer than zero"),
            "{e}"
        );
        let e = parse(&format!(
            "{MINIMAL}[apps.a]\nprotocol = \"binary\"\nfeedback_endpoint = \"x:y\"\n\
             [apps.a.certificate]\nfile = \"ck.pem\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("apps.a.feedback_endpoint: "), "{e}");
    }

    #[test]
    fn fcm_apps_take_a_service_account_and_the_shared_keys() {
        let c = parse(&format!(
            "{MINIMAL}[apps.android]\nprovider = \"fcm\"\nconnections = 3\n\
             [apps.android.fcm]\nservice_account_file = \"key.json\"\n\
             [apps.emu]\nprovider = \"fcm\"\nendpoint = \"https://127.0.0.1:8443\"\n\
             [apps.emu.fcm]\nservice_account_file = \"/k.json\"\nproject_id = \"p-1\"\n"
        ))
        .unwrap();
        let a = &c.apps["android"];
        assert_eq!(a.provider(), Provider::Fcm);
        assert_eq!(
            a.endpoint,
            Endpoint::Custom {
                host: "fcm.googleapis.com".into(),
                port: 443
            }
        );
        assert_eq!(a.connections, 3);
        match &a.auth {
            Auth::Fcm(f) => assert_eq!(
                f,
                &FcmAuth {
                    service_account_file: "/etc/pgpushd/key.json".into(),
                    project_id: None
                }
            ),
            other => panic!("{other:?}"),
        }
        let emu = &c.apps["emu"];
        assert_eq!(
            emu.endpoint,
            Endpoint::Custom {
                host: "127.0.0.1".into(),
                port: 8443
            }
        );
        let Auth::Fcm(f) = &emu.auth else { panic!() };
        assert_eq!(f.project_id.as_deref(), Some("p-1"));
    }

    #[test]
    fn apns_keys_and_fcm_keys_stay_with_their_provider() {
        let fcm = "[apps.a.fcm]\nservice_account_file = \"k.json\"\n";
        for (k, line) in [
            ("topic", "topic = \"com.example\""),
            ("environment", "environment = \"sandbox\""),
            ("protocol", "protocol = \"http2\""),
            ("binary_settle", "binary_settle = \"1s\""),
            ("feedback_interval", "feedback_interval = \"1h\""),
            ("feedback_endpoint", "feedback_endpoint = \"x:1\""),
        ] {
            let e = parse(&format!(
                "{MINIMAL}[apps.a]\nprovider = \"fcm\"\n{line}\n{fcm}"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.ends_with(&format!(
                    "apps.a.{k}: only applies to APNs apps; this app's provider is \"fcm\""
                )),
                "{e}"
            );
        }
        let e = parse(&format!(
            "{MINIMAL}[apps.a]\nprovider = \"fcm\"\n{fcm}[apps.a.token]\nkey_file = \"k.p8\"\n\
             key_id = \"ABC123DEFG\"\nteam_id = \"DEF123GHIJ\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("apps.a.token: only applies to APNs apps"), "{e}");
        let e = parse(&format!("{MINIMAL}[apps.a]\nprovider = \"fcm\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("apps.a: provider = \"fcm\" needs [apps.a.fcm]"),
            "{e}"
        );
        let e = parse(&format!(
            "{MINIMAL}[apps.a]\n{fcm}[apps.a.token]\nkey_file = \"k.p8\"\n\
             key_id = \"ABC123DEFG\"\nteam_id = \"DEF123GHIJ\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("apps.a.fcm: only applies to provider = \"fcm\""),
            "{e}"
        );
        let e = parse(&format!(
            "{MINIMAL}[apps.a]\nprovider = \"fcm\"\n{fcm}project_id = \"My/Project\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("apps.a.fcm.project_id: \"My/Project\" is not"),
            "{e}"
        );
        let e = parse(&format!("{MINIMAL}[apps.a]\nprovider = \"gcm\"\n{fcm}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gcm"), "{e}");
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("https://localhost:2197", Protocol::Http2).unwrap(),
            ("localhost".into(), 2197)
        );
        assert_eq!(
            parse_endpoint("gw.example.com", Protocol::Binary).unwrap(),
            ("gw.example.com".into(), 2195)
        );
        assert!(parse_endpoint("https://x:99999", Protocol::Http2).is_err());
        assert!(parse_endpoint("http://x/y", Protocol::Http2).is_err());
    }
}
