//! `[network]`: how the daemon reaches APNs — the proxy every app's connections go
//! through unless the app says otherwise — and how an app's [`ProxyPolicy`] is chosen:
//! its own `proxy` key, else `[network] proxy`, else `HTTPS_PROXY` with `NO_PROXY`.

use serde::Deserialize;

use super::validate::Validator;
use super::{ConfigError, EnvVars};
use crate::host_list::HostList;
use crate::proxy::{Proxy, ProxyPolicy};

/// What `proxy = "..."` says for a direct connection.
pub const PROXY_NONE: &str = "none";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkConfig {
    /// `[network] proxy`, when set: the default of every app.
    pub proxy: Option<ProxySetting>,
}

/// A `proxy` key as written and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxySetting {
    /// `"none"`: straight to the host, whatever `HTTPS_PROXY` says.
    Direct,
    Proxy(Proxy),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct NetworkFile {
    proxy: Option<String>,
}

impl Validator<'_> {
    pub(super) fn network(&self, n: NetworkFile) -> Result<NetworkConfig, ConfigError> {
        Ok(NetworkConfig {
            proxy: n
                .proxy
                .map(|p| self.proxy_setting("network.proxy", &p))
                .transpose()?,
        })
    }

    /// `"none"` or an `http://` proxy URL.
    pub(super) fn proxy_setting(&self, key: &str, text: &str) -> Result<ProxySetting, ConfigError> {
        if text.trim().eq_ignore_ascii_case(PROXY_NONE) {
            return Ok(ProxySetting::Direct);
        }
        if text.trim().is_empty() {
            return Err(self.invalid(
                key,
                format!(
                    "empty; write \"{PROXY_NONE}\" for direct connections, or a proxy \
                     like \"http://proxy.example.com:3128\""
                ),
            ));
        }
        Proxy::parse(text.trim())
            .map(ProxySetting::Proxy)
            .map_err(|m| self.invalid(key, m))
    }

    /// An app's policy: its own `proxy` (`app`, under `app_key`), else `[network]`'s,
    /// else the environment's. A bad `HTTPS_PROXY` is an error only when an app would
    /// use it.
    pub(super) fn proxy_policy(
        &self,
        app_key: &str,
        app: Option<ProxySetting>,
        network: &NetworkConfig,
        env: &EnvVars,
    ) -> Result<ProxyPolicy, ConfigError> {
        let setting = app.or_else(|| network.proxy.clone());
        Ok(match setting {
            Some(ProxySetting::Direct) => ProxyPolicy::Direct,
            Some(ProxySetting::Proxy(p)) => ProxyPolicy::Configured(p),
            None => match &env.https_proxy {
                None => ProxyPolicy::Direct,
                Some((variable, value)) => {
                    // As curl and most tools read it: no scheme means http://.
                    let value = value.expose().trim();
                    let url = match value.contains("://") {
                        true => value.to_owned(),
                        false => format!("http://{value}"),
                    };
                    let proxy = Proxy::parse(&url).map_err(|m| {
                        self.invalid(
                            *variable,
                            format!(
                                "{m} (the environment's proxy applies because neither \
                                 {app_key} nor network.proxy is set)"
                            ),
                        )
                    })?;
                    ProxyPolicy::Environment {
                        proxy,
                        no_proxy: HostList::parse(env.no_proxy.as_deref().unwrap_or("")),
                    }
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::testing::MINIMAL;
    use super::super::{Config, EnvVars};
    use super::*;
    use crate::secret::Secret;

    const APP: &str = r#"
[apps.{name}]
endpoint = "127.0.0.1:2197"
{proxy}
[apps.{name}.certificate]
file = "ck.pem"
"#;

    fn app(name: &str, proxy: &str) -> String {
        APP.replace("{name}", name).replace("{proxy}", proxy)
    }

    fn parse_with(text: &str, env: &EnvVars) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/pgpushd/pgpushd.toml"), text, env)
    }

    fn env(https_proxy: Option<&str>, no_proxy: Option<&str>) -> EnvVars {
        EnvVars {
            https_proxy: https_proxy.map(|v| ("HTTPS_PROXY", Secret::new(v.to_owned()))),
            no_proxy: no_proxy.map(str::to_owned),
            ..EnvVars::default()
        }
    }

    #[test]
    fn the_app_wins_then_network_then_the_environment() {
        let text = format!(
            "{MINIMAL}[network]\nproxy = \"http://net:3128\"\n{}{}{}",
            app("own", "proxy = \"http://own:8080\""),
            app("direct", "proxy = \"none\""),
            app("plain", ""),
        );
        let c = parse_with(&text, &env(Some("http://env:1"), None)).unwrap();
        let proxy_of = |name: &str| {
            c.apps[name]
                .proxy
                .for_target("127.0.0.1", 2197)
                .map(|p| p.to_string())
        };
        assert_eq!(proxy_of("own").as_deref(), Some("own:8080"));
        assert_eq!(proxy_of("direct"), None);
        assert_eq!(proxy_of("plain").as_deref(), Some("net:3128"));

        // Without [network], the environment's proxy, except for what NO_PROXY lists.
        let text = format!(
            "{MINIMAL}{}{}",
            app("plain", ""),
            app("direct", "proxy = \"NONE\"")
        );
        let c = parse_with(&text, &env(Some("http://env:1"), Some("apple.com"))).unwrap();
        let plain = &c.apps["plain"].proxy;
        assert_eq!(
            plain.for_target("127.0.0.1", 2197).unwrap().to_string(),
            "env:1"
        );
        assert_eq!(plain.for_target("api.push.apple.com", 443), None);
        assert_eq!(c.apps["direct"].proxy, ProxyPolicy::Direct);
        // [network] proxy = "none" turns the environment's off for every app.
        let text = format!("{MINIMAL}[network]\nproxy = \"none\"\n{}", app("plain", ""));
        let c = parse_with(&text, &env(Some("http://env:1"), None)).unwrap();
        assert_eq!(c.apps["plain"].proxy, ProxyPolicy::Direct);
        // Nothing anywhere: direct.
        let c = parse_with(&format!("{MINIMAL}{}", app("plain", "")), &env(None, None)).unwrap();
        assert_eq!(c.apps["plain"].proxy, ProxyPolicy::Direct);
    }

    #[test]
    fn bad_proxies_are_config_errors_naming_the_key() {
        for (proxy, says) in [
            (
                "proxy = \"socks5://p:1080\"",
                "apps.a.proxy: socks5:// proxies are not supported",
            ),
            (
                "proxy = \"https://p:3128\"",
                "apps.a.proxy: https:// proxies",
            ),
            ("proxy = \"http://p\"", "apps.a.proxy: \"p\" has no port"),
            ("proxy = \"\"", "apps.a.proxy: empty; write \"none\""),
            ("proxy = \"p:3128\"", "apps.a.proxy: not a proxy URL"),
        ] {
            let e = parse_with(&format!("{MINIMAL}{}", app("a", proxy)), &env(None, None))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("/etc/pgpushd/pgpushd.toml: "), "{e}");
            assert!(e.contains(says), "{proxy}: {e}");
        }
        let e = parse_with(
            &format!("{MINIMAL}[network]\nproxy = \"http://u:hunter2@p:x\"\n"),
            &env(None, None),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("network.proxy: \"p:x\": not a port number"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        let e = parse_with(
            &format!("{MINIMAL}[network]\nprox = \"x\"\n"),
            &env(None, None),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `prox`"), "{e}");
    }

    #[test]
    fn a_bad_environment_proxy_fails_only_when_used() {
        let bad = env(Some("socks5://u:hunter2@p:1080"), None);
        let e = parse_with(&format!("{MINIMAL}{}", app("a", "")), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/pgpushd/pgpushd.toml: HTTPS_PROXY: socks5:// proxies are not"),
            "{e}"
        );
        assert!(
            e.contains("neither apps.a.proxy nor network.proxy is set"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        assert!(parse_with(&format!("{MINIMAL}{}", app("a", "proxy = \"none\"")), &bad).is_ok());
        assert!(parse_with(MINIMAL, &bad).is_ok());
    }

    #[test]
    fn an_environment_proxy_without_a_scheme_is_http_as_curl_reads_it() {
        let c = parse_with(
            &format!("{MINIMAL}{}", app("a", "")),
            &env(Some("proxy.corp:3128"), None),
        )
        .unwrap();
        assert_eq!(
            c.apps["a"]
                .proxy
                .for_target("api.push.apple.com", 443)
                .unwrap()
                .to_string(),
            "proxy.corp:3128"
        );
    }

    #[test]
    fn credentials_stay_out_of_debug() {
        let text = format!(
            "{MINIMAL}{}",
            app("a", "proxy = \"http://alice:hunter2@p:3128\"")
        );
        let c = parse_with(&text, &env(Some("http://bob:sw0rdfish@q:1"), None)).unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("sw0rdfish"),
            "{shown}"
        );
        assert_eq!(
            c.apps["a"].proxy.credentials(),
            Some("Basic YWxpY2U6aHVudGVyMg==")
        );
    }
}
