//! Where a PostgreSQL store connects, and how: a libpq connection string
//! (a `postgres://` URL or `key=value` pairs) read once, TLS as libpq's
//! `sslmode` means it, and a way to show it that holds no secret.
//!
//! TLS is rustls (with ring), so a fresh machine needs no system library.
//! `sslmode`:
//! - `disable`: never TLS;
//! - `prefer`: TLS when the server offers it, the certificate unchecked
//!   (as libpq does); plain text otherwise;
//! - `require`: TLS or no connection; the certificate is checked against
//!   `sslrootcert` when one is given (libpq's rule), else unchecked;
//! - `verify-ca`: TLS, and the certificate must chain to a trusted root;
//! - `verify-full`: as `verify-ca`, and it must name the host connected to.
//!
//! Trusted roots: the `sslrootcert` file (PEM), or `sslrootcert=system`
//! for the Mozilla roots built in; without it, `~/.postgresql/root.crt`
//! when that exists (libpq's default), else the built-in roots.
//!
//! The default, when the string names no `sslmode`, is `prefer` for a
//! server on this machine (a Unix socket, `localhost`, a loopback address)
//! and `verify-full` for any other: payloads and passwords never cross a
//! network in clear, and a server elsewhere must prove it is the one named.
//! TLS does not apply to Unix sockets, whatever the mode.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use postgres::config::{Host, SslMode as PgSslMode};
use postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::client_config;
use crate::error::{Error, ErrorKind, Result};

/// How a connection uses TLS: libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SslMode {
    /// Never.
    Disable,
    /// When the server offers it, unchecked.
    Prefer,
    /// Always; checked against `sslrootcert` only when one is given.
    Require,
    /// Always, and the certificate chains to a trusted root.
    VerifyCa,
    /// Always, from a trusted root, naming the host.
    VerifyFull,
}

impl SslMode {
    /// The mode as libpq spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<SslMode> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(Error::invalid(
                    "sslmode is not one of disable, prefer, require, verify-ca, verify-full",
                ))
            }
        })
    }
}

/// The keys of a connection string that may be shown: never a password,
/// nor anything unknown (which could be one misspelt).
const SHOWN: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "dbname",
    "application_name",
    "target_session_attrs",
];

/// The keys the connection takes, besides `sslmode` and `sslrootcert`,
/// which are ours to act on.
const KNOWN: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslnegotiation",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// Where and how a [`PostgresStore`](crate::PostgresStore) connects: a
/// connection string, read. Its `Display` and `Debug` show the host, port,
/// user, database and TLS mode, never a password or anything unknown.
#[derive(Clone)]
pub struct PostgresTarget {
    config: postgres::Config,
    mode: SslMode,
    tls: Option<MakeRustlsConnect>,
    shown: String,
}

impl fmt::Debug for PostgresTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PostgresTarget").field(&self.shown).finish()
    }
}

impl fmt::Display for PostgresTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl PostgresTarget {
    /// Reads a connection string: a `postgres://` (or `postgresql://`)
    /// URL, or libpq's `key=value` pairs (values may be quoted with `'`,
    /// spaces around `=` allowed), with `sslmode` and `sslrootcert` as
    /// libpq means them (see the module's docs for the default).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a string that cannot be read, a key that is not
    /// supported, or an `sslrootcert` that cannot be read. The message
    /// never repeats a value that could be a secret.
    pub fn parse(text: &str) -> Result<PostgresTarget> {
        let pairs = if is_url(text) {
            url_pairs(text)?
        } else {
            keyword_pairs(text)?
        };
        PostgresTarget::from_pairs(pairs)
    }

    /// Whether `text` reads as a PostgreSQL connection string (rather than,
    /// say, a file name): a `postgres://` URL, or `key=value` pairs whose
    /// keys are all known.
    pub fn looks_like(text: &str) -> bool {
        if is_url(text) {
            return true;
        }
        match keyword_pairs(text) {
            Ok(pairs) => {
                !pairs.is_empty()
                    && pairs.iter().all(|(k, _)| {
                        KNOWN.contains(&k.as_str()) || k == "sslmode" || k == "sslrootcert"
                    })
            }
            Err(_) => false,
        }
    }

    /// The TLS mode in force.
    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    fn from_pairs(pairs: Vec<(String, String)>) -> Result<PostgresTarget> {
        let mut mode = None;
        let mut root = None;
        let mut rest = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "sslmode" => mode = Some(v.parse::<SslMode>()?),
                "sslrootcert" => root = Some(v),
                "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" | "sslsni" => {
                    return Err(Error::invalid(format!(
                        "{k} is not supported by this build (client certificates and CRLs)"
                    )))
                }
                key if KNOWN.contains(&key) => rest.push((k, v)),
                _ => {
                    return Err(Error::invalid(format!(
                        "{:?} is not a connection setting this build knows",
                        shown_value(&k)
                    )))
                }
            }
        }
        let text: Vec<String> = rest
            .iter()
            .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
            .collect();
        let mut config = postgres::Config::from_str(&text.join(" ")).map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidInput {
                    reason: "the PostgreSQL connection string cannot be read".into(),
                },
                e,
            )
        })?;
        let given = |key: &str| rest.iter().any(|(k, _)| k == key);
        let hosts = config.get_hosts();
        let all_unix = !hosts.is_empty() && hosts.iter().all(|h| matches!(h, Host::Unix(_)));
        let local = all_unix
            || (!hosts.is_empty()
                && hosts.iter().all(|h| match h {
                    Host::Tcp(name) => is_local(name),
                    Host::Unix(_) => true,
                }));
        let mode = mode.unwrap_or(if local {
            SslMode::Prefer
        } else {
            SslMode::VerifyFull
        });
        // A connection that goes silent is noticed: keepalives after 30 s of
        // quiet, and unacknowledged writes give up after a minute, unless
        // the string says otherwise.
        if !given("keepalives_idle") {
            config.keepalives_idle(Duration::from_secs(30));
        }
        if !given("keepalives_interval") {
            config.keepalives_interval(Duration::from_secs(10));
        }
        if !given("keepalives_retries") {
            config.keepalives_retries(3);
        }
        if !given("tcp_user_timeout") {
            config.tcp_user_timeout(Duration::from_secs(60));
        }
        if !given("application_name") {
            config.application_name("sqlite-outbox");
        }
        let tls = if all_unix || mode == SslMode::Disable {
            config.ssl_mode(PgSslMode::Disable);
            None
        } else {
            config.ssl_mode(if mode == SslMode::Prefer {
                PgSslMode::Prefer
            } else {
                PgSslMode::Require
            });
            Some(MakeRustlsConnect::new(client_config(
                mode,
                root.as_deref(),
            )?))
        };
        let mut shown: Vec<String> = SHOWN
            .iter()
            .filter_map(|key| rest.iter().rev().find(|(k, _)| k == key))
            .map(|(k, v)| format!("{k}={}", quoted(v)))
            .collect();
        shown.push(format!("sslmode={}", mode.as_str()));
        Ok(PostgresTarget {
            config,
            mode,
            tls,
            shown: shown.join(" "),
        })
    }

    /// The `postgres` configuration, for what reads it (timeouts, names).
    pub(super) fn config(&self) -> &postgres::Config {
        &self.config
    }

    /// As `config`, to change before connecting.
    pub(super) fn config_mut(&mut self) -> &mut postgres::Config {
        &mut self.config
    }

    /// A new connection, with TLS as the mode says.
    ///
    /// # Errors
    ///
    /// The server cannot be reached, refuses, or cannot prove who it is.
    pub fn connect(&self) -> std::result::Result<postgres::Client, postgres::Error> {
        match &self.tls {
            None => self.config.connect(NoTls),
            Some(tls) => self.config.connect(tls.clone()),
        }
    }
}

fn is_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

fn is_local(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A value as a key/value string holds it: bare when it can be, quoted
/// otherwise, with control characters left out.
fn quoted(v: &str) -> String {
    let v: String = v.chars().filter(|c| !c.is_control()).collect();
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '=']) {
        v
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// Some of an unknown key or value for a message: enough to find it, too
/// little to give away a secret that was put in the wrong place.
fn shown_value(v: &str) -> String {
    let short: String = v.chars().filter(|c| !c.is_control()).take(24).collect();
    if v.chars().count() > 24 {
        format!("{short}…")
    } else {
        short
    }
}

fn bad(reason: &str) -> Error {
    Error::invalid(format!(
        "the PostgreSQL connection string cannot be read: {reason}"
    ))
}

/// libpq's `key = value` pairs.
fn keyword_pairs(text: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut it = text.chars().peekable();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            return Err(bad("a setting without '='"));
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    None => return Err(bad("a quoted value without its closing quote")),
                    Some('\'') => break,
                    Some('\\') => value.extend(it.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(it.next());
                } else {
                    value.push(c);
                }
            }
        }
        if key.is_empty() {
            return Err(bad("a setting without a name"));
        }
        pairs.push((key, value));
    }
}

/// `postgres[ql]://[user[:password]@][host[:port][,...]][/dbname][?k=v&...]`.
fn url_pairs(text: &str) -> Result<Vec<(String, String)>> {
    let rest = text
        .strip_prefix("postgresql://")
        .or_else(|| text.strip_prefix("postgres://"))
        .ok_or_else(|| bad("not a postgres:// URL"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, db) = match rest.split_once('/') {
        Some((a, d)) => (a, Some(d)),
        None => (rest, None),
    };
    let mut pairs = Vec::new();
    let (userinfo, hostspec) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        if !user.is_empty() {
            pairs.push(("user".to_owned(), decode(user)?));
        }
        if let Some(p) = password {
            pairs.push(("password".to_owned(), decode(p)?));
        }
    }
    if !hostspec.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for spec in hostspec.split(',') {
            let (host, port) = if let Some(v6) = spec.strip_prefix('[') {
                let (ip, tail) = v6
                    .split_once(']')
                    .ok_or_else(|| bad("an IPv6 host without its ']'"))?;
                (ip, tail.strip_prefix(':'))
            } else {
                match spec.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (spec, None),
                }
            };
            hosts.push(decode(host)?);
            ports.push(port.unwrap_or("").to_owned());
        }
        pairs.push(("host".to_owned(), hosts.join(",")));
        if ports.iter().any(|p| !p.is_empty()) {
            pairs.push(("port".to_owned(), ports.join(",")));
        }
    }
    if let Some(db) = db.filter(|d| !d.is_empty()) {
        pairs.push(("dbname".to_owned(), decode(db)?));
    }
    for param in query.into_iter().flat_map(|q| q.split('&')) {
        if param.is_empty() {
            continue;
        }
        let (k, v) = param
            .split_once('=')
            .ok_or_else(|| bad("a URL parameter without '='"))?;
        pairs.push((decode(k)?, decode(v)?));
    }
    Ok(pairs)
}

/// Percent-decoding, as libpq does it (no `+` for space).
fn decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("a '%' not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad("a percent-encoded value that is not UTF-8"))
}

#[cfg(test)]
#[path = "target_tests.rs"]
mod tests;
