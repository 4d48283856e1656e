//! HTTP proxies between the daemon and APNs: which proxy a connection goes through, and
//! the CONNECT tunnel through it.
//!
//! - `url`: [`Proxy`], parsed from `http://[user:pass@]host:port`; its credentials are a
//!   [`Secret`](crate::secret::Secret) and never shown;
//! - `NO_PROXY`: a [`HostList`](crate::host_list::HostList);
//! - `tunnel`: the CONNECT handshake and its [`TunnelError`]s;
//! - here: [`ProxyPolicy`] (an app's choice, resolved by the config from its keys and
//!   the environment) and [`connect`], the TCP stream every APNs connection (HTTP/2,
//!   the binary gateway, the feedback service) runs its TLS over.
//!
//! Through a tunnel, TLS is still end to end with Apple: the certificate is verified
//! against Apple's host name, as without a proxy, and the proxy sees only ciphertext.

mod tunnel;
mod url;

use std::time::Duration;

use tokio::net::TcpStream;

use crate::host_list::HostList;
pub use tunnel::{authority, handshake, TunnelError, MAX_HEAD};
pub use url::Proxy;

/// Which proxy, if any, an app's connections go through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ProxyPolicy {
    /// Straight to the host: the config says `proxy = "none"`, or nothing says otherwise.
    #[default]
    Direct,
    /// The config names the proxy (`[apps.NAME]` or `[network]`): every connection.
    Configured(Proxy),
    /// `HTTPS_PROXY` names it; hosts `NO_PROXY` lists are reached directly.
    Environment { proxy: Proxy, no_proxy: HostList },
}

impl ProxyPolicy {
    /// The proxy a connection to `host:port` goes through, if any.
    pub fn for_target(&self, host: &str, port: u16) -> Option<&Proxy> {
        match self {
            ProxyPolicy::Direct => None,
            ProxyPolicy::Configured(proxy) => Some(proxy),
            ProxyPolicy::Environment { proxy, no_proxy } => {
                (!no_proxy.matches(host, port)).then_some(proxy)
            }
        }
    }

    /// What a reload compares besides the policy's `Debug` (which masks them): the
    /// proxy's credentials, so that changed ones count as a change.
    pub fn credentials(&self) -> Option<&str> {
        match self {
            ProxyPolicy::Direct => None,
            ProxyPolicy::Configured(p) | ProxyPolicy::Environment { proxy: p, .. } => {
                p.authorization.as_ref().map(|a| a.expose().as_str())
            }
        }
    }
}

/// A connection's destination as logs and errors name it: `host:port`, and the proxy
/// when it goes through one.
pub fn describe(host: &str, port: u16, via: Option<&Proxy>) -> String {
    match via {
        None => authority(host, port),
        Some(proxy) => format!("{} through proxy {proxy}", authority(host, port)),
    }
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {source}")]
    Direct {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

/// A TCP stream to `host:port`: directly, or through a CONNECT tunnel of `via` (the
/// proxy's part bounded by `timeout`; the caller bounds the whole). `prepare` sets up
/// the socket (the one to the proxy, when there is one) before anything is written on
/// it: TCP keepalive, NODELAY.
pub async fn connect(
    host: &str,
    port: u16,
    via: Option<&Proxy>,
    timeout: Duration,
    prepare: impl FnOnce(&TcpStream) -> std::io::Result<()>,
) -> Result<TcpStream, ConnectError> {
    match via {
        Some(proxy) => Ok(tunnel::open(proxy, host, port, timeout, prepare).await?),
        None => {
            let direct = async {
                let tcp = TcpStream::connect((host, port)).await?;
                prepare(&tcp)?;
                Ok(tcp)
            };
            direct.await.map_err(|source| ConnectError::Direct {
                addr: authority(host, port),
                source,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_choose_per_target() {
        let proxy = Proxy::parse("http://u:p@proxy:3128").unwrap();
        assert_eq!(
            ProxyPolicy::Direct.for_target("api.push.apple.com", 443),
            None
        );
        let configured = ProxyPolicy::Configured(proxy.clone());
        assert_eq!(configured.for_target("localhost", 2197), Some(&proxy));
        let env = ProxyPolicy::Environment {
            proxy: proxy.clone(),
            no_proxy: HostList::parse("localhost,.internal"),
        };
        assert_eq!(env.for_target("api.push.apple.com", 443), Some(&proxy));
        assert_eq!(env.for_target("localhost", 2197), None);
        assert_eq!(env.for_target("gw.internal", 2195), None);
        assert_eq!(env.credentials(), Some("Basic dTpw"));
        assert!(!format!("{env:?}").contains("dTpw"));
        assert_eq!(
            describe("::1", 2197, Some(&proxy)),
            "[::1]:2197 through proxy proxy:3128"
        );
        assert_eq!(describe("localhost", 443, None), "localhost:443");
    }
}
