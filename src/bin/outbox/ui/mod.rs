//! `outbox ui`: a dashboard for one outbox, served by the hardened HTTP
//! front ([`crate::http`]). Every asset is in the binary; nothing is
//! fetched from elsewhere.
//!
//! Safety: pages are [`html::Html`], which only literals and escaped
//! values can become (see [`html::html!`]); a strict
//! Content-Security-Policy allows only this server's own script and style;
//! changes are POST-only, need a same-origin `Origin` (or `Referer`) and
//! the form token of the browser's session (an HMAC of the session's id
//! under a key of this process), and are refused with `--read-only`. On
//! loopback the `Host` must name loopback too (no DNS rebinding); bound to
//! anything else, an access token from a file or the environment is
//! required, and nothing about the outbox is shown before sign-in. The
//! dashboard serves TLS itself (`--tls-cert`, `--tls-key`) or sits behind
//! a TLS proxy (`--public-origin https://…`); either way its cookies are
//! then `Secure`.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Args;
use sqlite_outbox::Operator;

use crate::db::Db;
pub(crate) use crate::http::Reply;
use crate::http::{App, Head, Limits, Listener};
use crate::Failure;

mod actions;
mod counts;
mod host;
mod html;
mod overview;
mod pages;
mod session;

use counts::Cached;
pub(crate) use counts::Overview;
use host::HostRule;
use session::Sessions;

/// The environment variable that may hold the access token.
pub(crate) const TOKEN_ENV: &str = "OUTBOX_UI_TOKEN";

#[derive(Args)]
pub(crate) struct UiArgs {
    /// Where to listen. Anything but loopback needs an access token.
    #[arg(long, default_value = "127.0.0.1:8025")]
    listen: SocketAddr,
    /// Show the outbox without the actions, and refuse them.
    #[arg(long)]
    read_only: bool,
    /// A file holding the access token (or set OUTBOX_UI_TOKEN). Required
    /// when --listen is not a loopback address.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs
    /// --tls-key.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The address browsers use when a proxy in front serves the dashboard
    /// (e.g. `https://outbox.example.com`): its Host and Origin are
    /// accepted, and with https its cookies are Secure.
    #[arg(long, value_name = "URL")]
    public_origin: Option<String>,
    /// Seconds between the pages' own refreshes (0: none).
    #[arg(long, default_value_t = 5)]
    refresh: u64,
}

/// The dashboard's state, shared by its threads.
pub(crate) struct Ui {
    store: Arc<dyn Operator>,
    /// How the outbox is shown (a file's path, or a server without its
    /// password).
    db: String,
    read_only: bool,
    refresh: u64,
    /// The access token, if one is required.
    token: Option<String>,
    sessions: Sessions,
    /// Which `Host` values a request may name.
    hosts: HostRule,
    /// The public origin behind a proxy, as browsers send it.
    public_origin: Option<String>,
    /// Whether browsers reach the dashboard over HTTPS (its own TLS or a
    /// proxy's): cookies are then `Secure`.
    https: bool,
    overview: Mutex<Option<Cached>>,
}

/// What the handlers need from a request.
pub(crate) struct Req {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: HashMap<String, String>,
    pub(crate) form: HashMap<String, String>,
    /// The form token of the request's session (empty without one).
    pub(crate) csrf: String,
}

impl Req {
    pub(crate) fn q(&self, key: &str) -> Option<&str> {
        self.query
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub(crate) fn f(&self, key: &str) -> Option<&str> {
        self.form
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

fn cookie<'h>(head: &'h Head, name: &str) -> Option<&'h str> {
    head.header("cookie")?.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

const SESSION_COOKIE: &str = "outbox_ui";

pub(crate) fn run(db: &Db, args: &UiArgs) -> Result<(), Failure> {
    let token = access_token(args)?;
    let loopback = args.listen.ip().is_loopback();
    if !loopback && token.is_none() {
        return Err(Failure::usage(format!(
            "listening on {} (not loopback) needs an access token: --token-file PATH or {TOKEN_ENV}",
            args.listen
        )));
    }
    let public_origin = args
        .public_origin
        .as_deref()
        .map(public_origin)
        .transpose()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(crate::http::tls_config(cert, key).map_err(Failure::usage)?)
        }
        _ => None,
    };
    let store = if args.read_only {
        db.open_read()?
    } else {
        db.open_write()?
    };
    let listener = Listener::bind(args.listen).map_err(|e| Failure(e, 1))?;
    let addr = listener.addr();
    let https = tls.is_some()
        || public_origin
            .as_deref()
            .is_some_and(|o| o.starts_with("https://"));
    let hosts = if loopback {
        HostRule::Loopback {
            port: addr.port(),
            default_port: if tls.is_some() { 443 } else { 80 },
            public: public_origin
                .as_deref()
                .and_then(|o| o.split_once("://"))
                .map(|(_, h)| h.to_owned()),
        }
    } else {
        HostRule::Any
    };
    let ui = Arc::new(Ui {
        store,
        db: db.to_string(),
        read_only: args.read_only,
        refresh: args.refresh,
        token,
        sessions: Sessions::new().map_err(|e| Failure(e, 1))?,
        hosts,
        public_origin,
        https,
        overview: Mutex::new(None),
    });
    let scheme = if tls.is_some() { "https" } else { "http" };
    let shown = if addr.ip().is_unspecified() {
        format!("{scheme}://127.0.0.1:{}/", addr.port())
    } else {
        format!("{scheme}://{addr}/")
    };
    println!(
        "outbox ui: {shown}{}",
        if args.read_only { " (read-only)" } else { "" }
    );
    let _ = std::io::stdout().flush();
    let server = listener
        .spawn(ui, tls, Limits::default())
        .map_err(|e| Failure(e, 1))?;
    let _ = server.join();
    Ok(())
}

/// `--public-origin`: `http(s)://host[:port]`, nothing after it.
fn public_origin(text: &str) -> Result<String, Failure> {
    let bad = || {
        Failure::usage(format!(
            "--public-origin {text:?}: give the address browsers use, as https://host[:port]"
        ))
    };
    let url = url::Url::parse(text).map_err(|_| bad())?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
        || url.path() != "/"
    {
        return Err(bad());
    }
    Ok(url.origin().ascii_serialization())
}

/// The token from `--token-file` or the environment; never from argv,
/// where other users of the machine can read it.
fn access_token(args: &UiArgs) -> Result<Option<String>, Failure> {
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| Failure::usage(format!("--token-file {}: {e}", path.display())))?,
        ),
        None => std::env::var(TOKEN_ENV).ok(),
    };
    match token.map(|t| t.trim().to_owned()) {
        Some(t) if t.len() < 16 => Err(Failure::usage(
            "the access token must be at least 16 characters",
        )),
        other => Ok(other),
    }
}

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const FIXED: &[(&str, &str)] = &[
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
];

impl App for Ui {
    /// Everything that can be decided without the body: the Host, the
    /// session or bearer token, the method, the Origin of a change, and
    /// read-only mode.
    fn admit(&self, head: &Head) -> Result<(), Reply> {
        if !head.header("host").is_some_and(|h| self.hosts.allows(h)) {
            return Err(Reply::text(
                421,
                "this dashboard answers to its loopback address only",
            ));
        }
        let path = head.path.as_str();
        if path.starts_with("/assets/") {
            return Ok(());
        }
        let post = head.method == "POST";
        if self.token.is_some() && path == "/login" {
            return if post { self.same_origin(head) } else { Ok(()) };
        }
        if self.token.is_some() && !self.authorised(head) {
            return Err(if path == "/metrics" {
                Reply::text(401, "an access token is required (Authorization: Bearer …)")
            } else {
                Reply::redirect("/login".into())
            });
        }
        if post {
            self.same_origin(head)?;
            if self.read_only {
                return Err(Reply::text(403, "refused: the dashboard is read-only"));
            }
            if !path.starts_with("/actions/") {
                return Err(Reply::text(404, "there is no such action"));
            }
            return Ok(());
        }
        if head.method != "GET" && head.method != "HEAD" || path.starts_with("/actions/") {
            let mut r = Reply::text(405, "changes are POSTed from the dashboard's own forms");
            let allow = if path.starts_with("/actions/") {
                "POST"
            } else {
                "GET, POST"
            };
            r.headers.push(("Allow", allow.into()));
            return Err(r);
        }
        Ok(())
    }

    fn handle(&self, head: Head, body: Vec<u8>) -> Reply {
        let mut reply = self.route(&head, &body);
        let cache = !reply.headers.iter().any(|(k, _)| *k == "Cache-Control");
        if cache {
            reply.headers.push(("Cache-Control", "no-store".into()));
        }
        reply
    }

    fn fixed_headers(&self) -> &[(&'static str, &'static str)] {
        FIXED
    }
}

impl Ui {
    fn route(&self, head: &Head, body: &[u8]) -> Reply {
        let path = head.path.as_str();
        if let Some(asset) = path.strip_prefix("/assets/") {
            return assets(asset);
        }
        let pairs = |s: &[u8]| {
            url::form_urlencoded::parse(s)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect::<HashMap<_, _>>()
        };
        // The browser's session: signed in (with a token), or a visitor's
        // (without one), given on its first page.
        let mut new_session = None;
        let session = match cookie(head, SESSION_COOKIE).and_then(|c| self.sessions.check(c)) {
            Some(id) => Some(id),
            None if self.token.is_none() && head.method != "POST" => {
                let (id, value) = self.sessions.issue();
                new_session = Some(value);
                Some(id)
            }
            None => None,
        };
        let req = Req {
            method: head.method.clone(),
            path: path.to_owned(),
            query: pairs(head.query.as_bytes()),
            form: pairs(body),
            csrf: session
                .as_deref()
                .map(|id| self.sessions.csrf(id))
                .unwrap_or_default(),
        };
        let mut reply = if self.token.is_some() && path == "/login" {
            self.login(&req)
        } else if req.method == "POST" {
            if req.csrf.is_empty() || !req.f("csrf").is_some_and(|t| same(t, &req.csrf)) {
                Reply::text(
                    403,
                    "refused: the form's token is missing or stale; reload the page",
                )
            } else {
                actions::act(self, &req)
            }
        } else {
            self.page(&req)
        };
        if let Some(value) = new_session {
            reply
                .headers
                .push(("Set-Cookie", self.session_cookie(&value)));
        }
        reply
    }

    fn page(&self, req: &Req) -> Reply {
        match req.path.as_str() {
            "/" => overview::overview(self, req),
            "/events" => pages::events(self, req),
            "/confirm" => actions::confirm(self, req),
            "/metrics" => match self.overview() {
                Ok(o) => Reply {
                    status: 200,
                    content_type: "text/plain; version=0.0.4; charset=utf-8",
                    body: crate::prometheus::render(&o.stats).into_bytes(),
                    headers: Vec::new(),
                },
                Err(e) => Reply::text(503, e),
            },
            path => match path.strip_prefix("/events/") {
                Some(id) => pages::event(self, req, id),
                None => Reply::html(404, pages::not_found(self)),
            },
        }
    }

    fn session_cookie(&self, value: &str) -> String {
        format!(
            "{SESSION_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/{}",
            if self.https { "; Secure" } else { "" }
        )
    }

    /// A change must come from this dashboard's own page: an `Origin` (or
    /// else a `Referer`) naming this server as the browser reaches it.
    fn same_origin(&self, head: &Head) -> Result<(), Reply> {
        let host = head.header("host").unwrap_or_default();
        let scheme = if head.secure { "https" } else { "http" };
        let own = format!("{scheme}://{host}");
        let ours = |origin: &str| origin == own || self.public_origin.as_deref() == Some(origin);
        let same_origin = match (head.header("origin"), head.header("referer")) {
            (Some(origin), _) => ours(origin),
            (None, Some(referer)) => [Some(own.as_str()), self.public_origin.as_deref()]
                .into_iter()
                .flatten()
                .any(|o| {
                    referer
                        .strip_prefix(o)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
                }),
            (None, None) => false,
        };
        if same_origin {
            Ok(())
        } else {
            Err(Reply::text(
                403,
                "refused: the request did not come from this dashboard",
            ))
        }
    }

    fn authorised(&self, head: &Head) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        cookie(head, SESSION_COOKIE).is_some_and(|c| self.sessions.check(c).is_some())
            || head
                .header("authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .is_some_and(|t| same(t.trim(), token))
    }

    fn login(&self, req: &Req) -> Reply {
        let Some(token) = &self.token else {
            return Reply::redirect("/".into());
        };
        if req.method != "POST" {
            return Reply::html(200, pages::login_page(self, false));
        }
        if req.f("token").is_some_and(|t| same(t.trim(), token)) {
            let (_, value) = self.sessions.issue();
            let mut r = Reply::redirect("/".into());
            r.headers.push(("Set-Cookie", self.session_cookie(&value)));
            return r;
        }
        Reply::html(403, pages::login_page(self, true))
    }
}

/// Equal, in a time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn assets(name: &str) -> Reply {
    let (content_type, body): (&'static str, &'static [u8]) = match name {
        "app.css" => ("text/css; charset=utf-8", include_bytes!("assets/app.css")),
        "app.js" => (
            "text/javascript; charset=utf-8",
            include_bytes!("assets/app.js"),
        ),
        _ => return Reply::text(404, "no such asset"),
    };
    Reply {
        status: 200,
        content_type,
        body: body.to_vec(),
        headers: vec![("Cache-Control", "max-age=3600".into())],
    }
}

#[cfg(test)]
mod tests;
