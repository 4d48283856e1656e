//! [`Proxy`]: an HTTP proxy as a URL names it, `http://[user:pass@]host:port`.
//!
//! Only `http://` proxies: the connection to the proxy is plain TCP, and what goes
//! through the tunnel is TLS to Apple end to end, so the proxy sees only ciphertext
//! (and the credentials, which Basic authentication sends as they are).

use std::fmt;

use base64::Engine as _;
use percent_encoding::percent_decode_str;

use crate::secret::Secret;

/// An HTTP proxy that tunnels with CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// As written, without brackets around an IPv6 address.
    pub host: String,
    pub port: u16,
    /// The `Proxy-Authorization` header's value (`Basic base64(user:pass)`) when the URL
    /// carries credentials.
    pub authorization: Option<Secret<String>>,
}

/// `host:port` (IPv6 in brackets): what logs and errors name. Never the credentials.
impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("authorization", &self.authorization)
            .finish()
    }
}

impl Proxy {
    /// Parses `http://[user[:password]@]host:port[/]`. User and password are
    /// percent-decoded (a `@` or `:` in a password is written `%40`, `%3A`). The message
    /// of an error never repeats the URL, which may hold a password.
    pub fn parse(text: &str) -> Result<Proxy, String> {
        // A scheme is letters, digits, `+`, `-` and `.` (RFC 3986): anything else before
        // a `://` is not one, and may be a password, which the message must not repeat.
        let split = text.split_once("://").filter(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        });
        let Some((scheme, rest)) = split else {
            return Err(
                "not a proxy URL; write it as http://host:port or http://user:password@host:port"
                    .into(),
            );
        };
        match scheme.to_ascii_lowercase().as_str() {
            "http" => {}
            "https" => {
                return Err(
                    "https:// proxies (TLS to the proxy) are not supported; use an \
                            http:// proxy: the tunnel through it carries TLS to Apple end to \
                            end either way"
                        .into(),
                )
            }
            s if s.starts_with("socks") => {
                return Err(format!(
                    "{s}:// proxies are not supported; only http:// proxies (HTTP CONNECT)"
                ))
            }
            s => {
                return Err(format!(
                    "unsupported scheme {s:?}; only http:// proxies (HTTP CONNECT)"
                ))
            }
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err("a proxy URL has no path, query or fragment: http://host:port".into());
        }
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        // The authority parser checks the characters; the port is split off here, so
        // that a missing one and a wrong one get their own messages.
        let _: http::uri::Authority = hostport
            .parse()
            .map_err(|_| format!("{hostport:?} is not a host:port"))?;
        let (host, port) = match hostport.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((host, "")) => (host, None),
                Some((host, rest)) => (host, Some(rest.strip_prefix(':').unwrap_or(rest))),
                None => return Err(format!("{hostport:?} is not a host:port")),
            },
            None => match hostport.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            },
        };
        if host.is_empty() {
            return Err("the proxy URL has no host".into());
        }
        let port = match port.map(str::parse::<u16>) {
            Some(Ok(0)) => return Err(format!("{hostport:?}: port 0 is not a port")),
            Some(Ok(port)) => port,
            Some(Err(_)) => return Err(format!("{hostport:?}: not a port number")),
            None => {
                return Err(format!(
                    "{hostport:?} has no port; write the proxy's port, like {hostport}:3128"
                ))
            }
        };
        let authorization = userinfo.map(basic_authorization).transpose()?;
        Ok(Proxy {
            host: host.to_owned(),
            port,
            authorization,
        })
    }
}

/// `Basic base64(user:password)` from the URL's percent-encoded `user[:password]`.
fn basic_authorization(userinfo: &str) -> Result<Secret<String>, String> {
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let decode = |part: &str, what: &str| {
        percent_decode_str(part)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| format!("the proxy URL's {what} is not UTF-8 once percent-decoded"))
    };
    let (user, password) = (decode(user, "user")?, decode(password, "password")?);
    if user.is_empty() {
        return Err("the proxy URL has credentials without a user name".into());
    }
    if user.contains(':') {
        return Err(
            "the proxy URL's user name contains ':', which Basic authentication \
                    cannot carry"
                .into(),
        );
    }
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    Ok(Secret::new(format!("Basic {token}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_and_credentials() {
        let p = Proxy::parse("http://proxy.example.com:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.example.com", 3128));
        assert_eq!(p.authorization, None);
        assert_eq!(p.to_string(), "proxy.example.com:3128");

        let p = Proxy::parse("HTTP://alice:s3cr%40t%3Ax@10.0.0.1:8080/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("10.0.0.1", 8080));
        // base64("alice:s3cr@t:x")
        assert_eq!(
            p.authorization.as_ref().unwrap().expose(),
            "Basic YWxpY2U6czNjckB0Ong="
        );

        let p = Proxy::parse("http://bob@[::1]:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("::1", 3128));
        assert_eq!(p.to_string(), "[::1]:3128");
        assert_eq!(
            p.authorization.as_ref().unwrap().expose(),
            "Basic Ym9iOg==" // "bob:"
        );
    }

    #[test]
    fn credentials_never_show() {
        let p = Proxy::parse("http://alice:hunter2@proxy:3128").unwrap();
        let shown = format!("{p:?} {p}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("YWxpY2U6aHVudGVyMg"), "{shown}");
        assert!(shown.contains("proxy"), "{shown}");
        for bad in [
            "http://alice:hunter2@proxy",
            "http://alice:hunter2@proxy:99999",
            "http://alice:hunter2@proxy:3128/path",
            "https://alice:hunter2@proxy:3128",
            "http://alice:hunter2@:3128",
            "alice:hunter2@proxy://x",
            "alice:hunter2@proxy:3128",
        ] {
            let e = Proxy::parse(bad).unwrap_err();
            assert!(!e.contains("hunter2"), "{bad}: {e}");
        }
    }

    #[test]
    fn what_is_refused_says_why() {
        for (text, says) in [
            ("proxy.example.com:3128", "write it as http://host:port"),
            (
                "https://proxy:3128",
                "https:// proxies (TLS to the proxy) are not supported",
            ),
            ("socks5://proxy:1080", "socks5:// proxies are not supported"),
            ("ftp://proxy:21", "unsupported scheme \"ftp\""),
            (
                "http://proxy",
                "has no port; write the proxy's port, like proxy:3128",
            ),
            ("http://proxy:", "not a port number"),
            ("http://proxy:http", "not a port number"),
            ("http://proxy:65536", "not a port number"),
            ("http://proxy:0", "port 0 is not a port"),
            ("http://proxy:3128/pac", "no path"),
            ("http://proxy:3128?x=1", "no path"),
            ("http://:3128", "no host"),
            ("http://", "is not a host:port"),
            ("http://:pw@proxy:3128", "credentials without a user name"),
            ("http://a%3Ab:pw@proxy:3128", "contains ':'"),
            ("http://a:%ff@proxy:3128", "not UTF-8"),
        ] {
            let e = Proxy::parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
