//! [`HostList`]: a list of hosts, matched as curl matches `NO_PROXY`: the hosts the
//! environment's `NO_PROXY` / `no_proxy` says to reach directly, and the push services a
//! Web Push app may send to (`[apps.NAME.webpush] push_services`).
//!
//! Each entry, case-insensitive (`NO_PROXY` separates them with commas or spaces):
//! - `*` alone: every host;
//! - `example.com`, `.example.com` or `*.example.com`: that domain and every name under
//!   it (`api.example.com`, but not `badexample.com`);
//! - an IP address: that address, written the same way (no name is resolved);
//! - `10.0.0.0/8`, `fd00::/8`: an address in that range;
//! - any of these with `:port` (`[::1]:2197` for IPv6): only connections to that port.
//!
//! In `NO_PROXY`, an entry that fits none of these never matches, as curl has it; a
//! config's list refuses it ([`HostList::from_entries`]). Names are never resolved: an
//! entry `127.0.0.1` does not cover `localhost`.

use std::net::IpAddr;

/// A parsed list of hosts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostList {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    pattern: Pattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Everything,
    /// Lower case, without leading dots or a trailing one.
    Domain(String),
    Address(IpAddr),
    Range {
        network: IpAddr,
        prefix: u8,
    },
    /// Written so that it can never match (a port that is not one, ...).
    Nothing,
}

impl HostList {
    pub fn parse(text: &str) -> HostList {
        HostList {
            entries: text
                .split([',', ' ', '\t', '\n'])
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(Entry::parse)
                .collect(),
        }
    }

    /// A config's list: every entry must be one of the forms above, a name of letters,
    /// digits, `.`, `-` and `_` only.
    pub fn from_entries(entries: &[String]) -> Result<HostList, String> {
        let entries = entries
            .iter()
            .map(|text| {
                let entry = Entry::parse(text.trim());
                entry
                    .pattern
                    .is_host()
                    .then_some(entry)
                    .ok_or_else(|| not_a_host(text))
            })
            .collect::<Result<_, _>>()?;
        Ok(HostList { entries })
    }

    /// Whether `host:port` is on the list (for `NO_PROXY`: whether a connection to it goes
    /// direct). `host` as an endpoint names it:
    /// a name, or an IP address (an IPv6 one with or without brackets).
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let address: Option<IpAddr> = host.parse().ok();
        self.entries.iter().any(|e| {
            e.port.is_none_or(|p| p == port)
                && match &e.pattern {
                    Pattern::Everything => true,
                    Pattern::Domain(d) => {
                        address.is_none()
                            && (host == *d
                                || host
                                    .strip_suffix(d.as_str())
                                    .is_some_and(|rest| rest.ends_with('.')))
                    }
                    Pattern::Address(a) => address == Some(*a),
                    Pattern::Range { network, prefix } => {
                        address.is_some_and(|a| in_range(a, *network, *prefix))
                    }
                    Pattern::Nothing => false,
                }
        })
    }
}

impl Entry {
    fn parse(text: &str) -> Entry {
        let text = text.to_ascii_lowercase();
        let (host, port) = split_port(&text);
        let port = match port.map(str::parse::<u16>) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                return Entry {
                    pattern: Pattern::Nothing,
                    port: None,
                }
            }
        };
        Entry {
            pattern: Pattern::parse(host),
            port,
        }
    }
}

impl Pattern {
    /// Whether a config may list it: it can match, and a name is one DNS could hold.
    fn is_host(&self) -> bool {
        match self {
            Pattern::Nothing => false,
            Pattern::Domain(d) => d
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
            _ => true,
        }
    }

    fn parse(host: &str) -> Pattern {
        if host == "*" {
            return Pattern::Everything;
        }
        if let Ok(a) = host.parse::<IpAddr>() {
            return Pattern::Address(a);
        }
        if let Some((network, prefix)) = host.split_once('/') {
            return match (network.parse::<IpAddr>(), prefix.parse::<u8>()) {
                (Ok(network), Ok(prefix)) if prefix <= if network.is_ipv4() { 32 } else { 128 } => {
                    Pattern::Range { network, prefix }
                }
                _ => Pattern::Nothing,
            };
        }
        let domain = host.trim_start_matches("*.").trim_start_matches('.');
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if domain.is_empty() || domain.contains(['*', '/', '[', ']', ':']) {
            return Pattern::Nothing;
        }
        Pattern::Domain(domain.to_owned())
    }
}

/// `host:port` -> (host, Some(port)); `[v6]:port` and `[v6]` lose their brackets; a bare
/// IPv6 address (more than one colon) has no port.
fn split_port(text: &str) -> (&str, Option<&str>) {
    if let Some(rest) = text.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, port)) => match port.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => ("", Some("")), // garbage after the bracket: never matches
            },
            None => ("", Some("")),
        };
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (text, None),
    }
}

fn not_a_host(text: &str) -> String {
    format!(
        "{text:?} is not a host: a name (which covers the names under it), an IP address, \
         a range like 10.0.0.0/8, any of these with :port, or \"*\" for every host"
    )
}

fn in_range(a: IpAddr, network: IpAddr, prefix: u8) -> bool {
    match (a, network) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(list: &str, host: &str, port: u16) -> bool {
        HostList::parse(list).matches(host, port)
    }

    #[test]
    fn exact_hosts_and_domains() {
        assert!(direct("api.push.apple.com", "api.push.apple.com", 443));
        assert!(direct("API.Push.Apple.com", "api.push.apple.COM.", 443));
        assert!(!direct(
            "api.push.apple.com",
            "api.sandbox.push.apple.com",
            443
        ));
        // A domain covers the names under it, never a name that merely ends the same.
        for entry in ["apple.com", ".apple.com", "*.apple.com", "apple.com."] {
            assert!(direct(entry, "api.push.apple.com", 443), "{entry}");
            assert!(direct(entry, "apple.com", 443), "{entry}");
            assert!(!direct(entry, "notapple.com", 443), "{entry}");
            assert!(!direct(entry, "apple.com.evil.net", 443), "{entry}");
        }
        assert!(!direct("", "apple.com", 443));
        assert!(!direct(".", "apple.com", 443));
    }

    #[test]
    fn star_lists_and_ports() {
        assert!(direct("*", "anything.example", 1));
        assert!(direct("localhost, *", "api.push.apple.com", 443));
        let list = "localhost,127.0.0.1 .internal.example  gateway.push.apple.com:2195";
        assert!(direct(list, "localhost", 2197));
        assert!(direct(list, "127.0.0.1", 2197));
        assert!(direct(list, "db.internal.example", 443));
        assert!(direct(list, "gateway.push.apple.com", 2195));
        assert!(!direct(list, "gateway.push.apple.com", 443));
        assert!(!direct(list, "feedback.push.apple.com", 2196));
        // A name is never resolved: 127.0.0.1 does not cover localhost, nor the reverse.
        assert!(!direct("127.0.0.1", "localhost", 443));
        assert!(!direct("localhost", "127.0.0.1", 443));
        assert!(!direct("apple.com:notaport", "apple.com", 443));
        assert!(!direct("*:443", "apple.com", 2195));
        assert!(direct("*:443", "apple.com", 443));
    }

    #[test]
    fn a_configs_list_refuses_what_is_not_a_host() {
        let list = |entries: &[&str]| {
            HostList::from_entries(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>())
        };
        let ok = list(&[
            "push.example:8443",
            "*.notify.windows.com",
            "10.0.0.0/8",
            "[::1]",
            "*",
        ])
        .unwrap();
        assert!(ok.matches("push.example", 8443));
        assert!(ok.matches("wns2.notify.windows.com", 443));
        for bad in [
            "",
            "https://x/",
            "a b",
            "u@h",
            "a,b",
            "x:notaport",
            "10.0.0.0/40",
        ] {
            let e = list(&["fcm.googleapis.com", bad]).unwrap_err();
            assert!(e.starts_with(&format!("{bad:?} is not a host")), "{e}");
        }
    }

    #[test]
    fn addresses_and_ranges() {
        assert!(direct("10.0.0.0/8", "10.20.30.40", 443));
        assert!(!direct("10.0.0.0/8", "11.0.0.1", 443));
        assert!(direct("192.168.1.7/32", "192.168.1.7", 443));
        assert!(direct("0.0.0.0/0", "8.8.8.8", 443));
        assert!(!direct("10.0.0.0/33", "10.0.0.1", 443));
        assert!(!direct("10.0.0.0/8", "10.example.com", 443));
        assert!(direct("::1", "::1", 443));
        assert!(direct("::1", "[::1]", 443));
        assert!(direct("[::1]:2197", "[::1]", 2197));
        assert!(!direct("[::1]:2197", "::1", 443));
        assert!(direct("fd00::/8", "fd12:3456::1", 443));
        assert!(!direct("fd00::/8", "10.0.0.1", 443));
        assert!(!direct("[::1", "::1", 443));
    }
}
