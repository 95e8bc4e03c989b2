//! Which `Host` names the dashboard answers (no DNS rebinding on
//! loopback).

use std::net::IpAddr;

/// Which `Host` a request may name.
#[derive(Debug)]
pub(super) enum HostRule {
    /// Bound to loopback: a loopback name or address (any of 127/8,
    /// `localhost`, `[::1]`) with the bound port, or none when the port is
    /// the scheme's default; and the public origin's host, if any.
    Loopback {
        port: u16,
        default_port: u16,
        public: Option<String>,
    },
    /// Bound elsewhere: the access token guards every page.
    Any,
}

impl HostRule {
    pub(super) fn allows(&self, host: &str) -> bool {
        let HostRule::Loopback {
            port,
            default_port,
            public,
        } = self
        else {
            return true;
        };
        if public
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case(host))
        {
            return true;
        }
        let (name, given) = split_host(host);
        let port_ok = match given {
            Some(p) => p.parse::<u16>().is_ok_and(|p| p == *port),
            None => port == default_port,
        };
        let name_ok = name.eq_ignore_ascii_case("localhost")
            || name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        port_ok && name_ok
    }
}

/// `host[:port]` (or `[v6]:port`) into its parts.
pub(super) fn split_host(host: &str) -> (&str, Option<&str>) {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, tail)) => (
                &host[..ip.len() + 2],
                tail.strip_prefix(':').filter(|p| !p.is_empty()),
            ),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    }
}
