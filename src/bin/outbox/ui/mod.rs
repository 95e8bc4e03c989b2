//! `outbox ui`: a dashboard for one outbox, served by a few threads of a
//! small synchronous HTTP server. Every asset is in the binary; nothing is
//! fetched from elsewhere.
//!
//! Safety: everything from the database is escaped; a strict
//! Content-Security-Policy allows only this server's own script and style;
//! changes are POST-only, need the page's CSRF token and a same-origin
//! `Origin` (or `Referer`), and are refused with `--read-only`. On
//! loopback the `Host` must name loopback too (no DNS rebinding); bound to
//! anything else, an access token from a file or the environment is
//! required.

use std::collections::HashMap;
use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use sqlite_outbox::{Operator, Stats};

use crate::db::Db;
use crate::{describe, Failure};

mod html;
mod pages;

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
    /// Every form carries it; a POST without it is refused.
    csrf: String,
    /// The access token, if one is required, and the session cookie value
    /// given for it.
    token: Option<String>,
    session: String,
    /// The `Host` values a request may name (on loopback).
    hosts: Option<Vec<String>>,
    overview: Mutex<Option<Cached>>,
}

/// A span of a chart: its start, done and failed events.
pub(crate) type Span = (chrono::DateTime<chrono::Utc>, u64, u64);

/// The overview's numbers, counted at most every so often: on a large
/// outbox a count reads every row.
#[derive(Clone)]
pub(crate) struct Overview {
    pub(crate) stats: Stats,
    /// Finished events per minute over the last hour, and per hour over
    /// the last day: (span start, done, failed).
    pub(crate) hour: Vec<Span>,
    pub(crate) day: Vec<Span>,
    pub(crate) at: chrono::DateTime<chrono::Utc>,
}

struct Cached {
    value: Arc<Overview>,
    at: Instant,
    cost: Duration,
}

/// A response.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) body: Vec<u8>,
    pub(crate) headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub(crate) fn html(status: u16, body: String) -> Reply {
        Reply {
            status,
            content_type: "text/html; charset=utf-8",
            body: body.into_bytes(),
            headers: Vec::new(),
        }
    }

    pub(crate) fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
            headers: Vec::new(),
        }
    }

    /// 303 See Other to `location` (a path on this server).
    pub(crate) fn redirect(location: String) -> Reply {
        let mut r = Reply::text(303, "");
        r.headers.push(("Location", location));
        r
    }
}

/// What the handlers need from a request.
pub(crate) struct Req {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: HashMap<String, String>,
    pub(crate) form: HashMap<String, String>,
    headers: HashMap<String, String>,
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

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    fn cookie(&self, name: &str) -> Option<&str> {
        self.header("cookie")?.split(';').find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then_some(v)
        })
    }
}

const MAX_BODY: u64 = 64 * 1024;
const SESSION_COOKIE: &str = "outbox_ui";
const THREADS: usize = 4;

pub(crate) fn run(db: &Db, args: &UiArgs) -> Result<(), Failure> {
    let token = access_token(args)?;
    let loopback = args.listen.ip().is_loopback();
    if !loopback && token.is_none() {
        return Err(Failure::usage(format!(
            "listening on {} (not loopback) needs an access token: --token-file PATH or {TOKEN_ENV}",
            args.listen
        )));
    }
    let store = if args.read_only {
        db.open_read()?
    } else {
        db.open_write()?
    };
    let (server, addr) = listen(args.listen).map_err(|e| Failure(e, 1))?;
    let hosts = loopback.then(|| {
        let port = addr.port();
        vec![
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[::1]:{port}"),
        ]
    });
    let ui = Arc::new(Ui {
        store,
        db: db.to_string(),
        read_only: args.read_only,
        refresh: args.refresh,
        csrf: secret(),
        token,
        session: secret(),
        hosts,
        overview: Mutex::new(None),
    });
    let shown = if addr.ip().is_unspecified() {
        format!("http://127.0.0.1:{}/", addr.port())
    } else {
        format!("http://{addr}/")
    };
    println!(
        "outbox ui: {shown}{}",
        if args.read_only { " (read-only)" } else { "" }
    );
    let _ = std::io::stdout().flush();
    let server = Arc::new(server);
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (server, ui) = (Arc::clone(&server), Arc::clone(&ui));
            std::thread::spawn(move || serve(&server, &ui))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// An HTTP server on `addr`, and the address it got (for port 0).
/// Connections accepted from the listener inherit TCP_NODELAY (on Linux):
/// a response's header and body go out at once, instead of the body
/// waiting on a delayed ACK (40 ms a request on a kept-alive connection).
pub(crate) fn listen(addr: SocketAddr) -> Result<(tiny_http::Server, SocketAddr), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let _ = nix::sys::socket::setsockopt(&listener, nix::sys::socket::sockopt::TcpNoDelay, &true);
    let bound = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| format!("cannot serve on {bound}: {e}"))?;
    Ok((server, bound))
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

/// 128 random bits, as hex (UUID v4 takes them from the OS).
fn secret() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn serve(server: &tiny_http::Server, ui: &Ui) {
    loop {
        let Ok(rq) = server.recv() else { return };
        // A bug must cost one request, not a thread of the server.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(ui, rq)));
    }
}

fn handle(ui: &Ui, mut rq: tiny_http::Request) {
    let reply = match read(&mut rq) {
        Ok(req) => route(ui, &req),
        Err(reply) => reply,
    };
    let _ = rq.respond(respond(reply));
}

/// The request's method, path, query, headers and (for a form) body.
fn read(rq: &mut tiny_http::Request) -> Result<Req, Reply> {
    let (path, query) = match rq.url().split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (rq.url().to_owned(), String::new()),
    };
    let headers = rq
        .headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_ascii_lowercase(),
                h.value.as_str().to_owned(),
            )
        })
        .collect();
    let mut body = Vec::new();
    let method = rq.method().as_str().to_owned();
    if method == "POST" {
        rq.as_reader()
            .take(MAX_BODY + 1)
            .read_to_end(&mut body)
            .map_err(|_| Reply::text(400, "the request body could not be read"))?;
        if body.len() as u64 > MAX_BODY {
            return Err(Reply::text(413, "the request body is too large"));
        }
    }
    let pairs = |s: &[u8]| {
        url::form_urlencoded::parse(s)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect::<HashMap<_, _>>()
    };
    Ok(Req {
        method,
        path,
        query: pairs(query.as_bytes()),
        form: pairs(&body),
        headers,
    })
}

fn route(ui: &Ui, req: &Req) -> Reply {
    if let Some(hosts) = &ui.hosts {
        if !req
            .header("host")
            .is_some_and(|h| hosts.iter().any(|a| a == h))
        {
            return Reply::text(421, "this dashboard answers to its loopback address only");
        }
    }
    let path = req.path.as_str();
    if let Some(asset) = path.strip_prefix("/assets/") {
        return assets(asset);
    }
    if ui.token.is_some() {
        if path == "/login" {
            return login(ui, req);
        }
        if !authorised(ui, req) {
            return if path == "/metrics" {
                Reply::text(401, "an access token is required (Authorization: Bearer …)")
            } else {
                Reply::redirect("/login".into())
            };
        }
    }
    if req.method == "POST" {
        if let Err(reply) = check_post(ui, req) {
            return reply;
        }
        if ui.read_only {
            return Reply::text(403, "refused: the dashboard is read-only");
        }
        return pages::act(ui, req);
    }
    if req.method != "GET" && req.method != "HEAD" || path.starts_with("/actions/") {
        let mut r = Reply::text(405, "changes are POSTed from the dashboard's own forms");
        r.headers.push((
            "Allow",
            if path.starts_with("/actions/") {
                "POST"
            } else {
                "GET, POST"
            }
            .into(),
        ));
        return r;
    }
    match path {
        "/" => pages::overview(ui, req),
        "/events" => pages::events(ui, req),
        "/confirm" => pages::confirm(ui, req),
        "/metrics" => match ui.overview() {
            Ok(o) => Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: crate::prometheus::render(&o.stats).into_bytes(),
                headers: Vec::new(),
            },
            Err(e) => Reply::text(503, e),
        },
        _ => match path.strip_prefix("/events/") {
            Some(id) => pages::event(ui, req, id),
            None => Reply::html(404, pages::not_found(ui)),
        },
    }
}

/// A change must come from this dashboard's own page: the form's CSRF
/// token, and an `Origin` (or else a `Referer`) naming this server.
fn check_post(ui: &Ui, req: &Req) -> Result<(), Reply> {
    let host = req.header("host").unwrap_or_default();
    let own = format!("http://{host}");
    let same_origin = match (req.header("origin"), req.header("referer")) {
        (Some(origin), _) => origin == own,
        (None, Some(referer)) => referer
            .strip_prefix(&own)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        (None, None) => false,
    };
    if !same_origin {
        return Err(Reply::text(
            403,
            "refused: the request did not come from this dashboard",
        ));
    }
    if !req.f("csrf").is_some_and(|t| same(t, &ui.csrf)) {
        return Err(Reply::text(
            403,
            "refused: the form's token is missing or stale; reload the page",
        ));
    }
    Ok(())
}

fn authorised(ui: &Ui, req: &Req) -> bool {
    let Some(token) = &ui.token else { return true };
    req.cookie(SESSION_COOKIE)
        .is_some_and(|c| same(c, &ui.session))
        || req
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| same(t.trim(), token))
}

fn login(ui: &Ui, req: &Req) -> Reply {
    let Some(token) = &ui.token else {
        return Reply::redirect("/".into());
    };
    if req.method == "POST" {
        if let Err(reply) = check_post(ui, req) {
            return reply;
        }
        if req.f("token").is_some_and(|t| same(t.trim(), token)) {
            let mut r = Reply::redirect("/".into());
            r.headers.push((
                "Set-Cookie",
                format!(
                    "{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
                    ui.session
                ),
            ));
            return r;
        }
        return Reply::html(403, pages::login_page(ui, true));
    }
    Reply::html(200, pages::login_page(ui, false))
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

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn respond(reply: Reply) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let mut r = tiny_http::Response::from_data(reply.body).with_status_code(reply.status);
    let cache = if reply.headers.iter().any(|(k, _)| *k == "Cache-Control") {
        None
    } else {
        Some(("Cache-Control", "no-store".to_owned()))
    };
    let fixed = [
        ("Content-Type", reply.content_type.to_owned()),
        ("Content-Security-Policy", CSP.to_owned()),
        ("X-Content-Type-Options", "nosniff".to_owned()),
        ("X-Frame-Options", "DENY".to_owned()),
        ("Referrer-Policy", "same-origin".to_owned()),
    ];
    for (k, v) in fixed.into_iter().chain(cache).chain(reply.headers) {
        if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            r.add_header(h);
        }
    }
    r
}

impl Ui {
    /// The overview's numbers, counted again when the last count is older
    /// than ten times what it cost (at least a second): the dashboard
    /// takes no more than a tenth of a core from the app.
    pub(crate) fn overview(&self) -> Result<Arc<Overview>, String> {
        let mut cached = self.overview.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.as_ref() {
            if c.at.elapsed() < (c.cost * 10).max(Duration::from_secs(1)) {
                return Ok(Arc::clone(&c.value));
            }
        }
        let started = Instant::now();
        let now = chrono::Utc::now();
        let fail = |e: sqlite_outbox::Error| describe(&e);
        let stats = self.store.stats().map_err(fail)?;
        // One read for both charts: the day per minute, summed per hour.
        let minutes = self
            .store
            .throughput(now - chrono::Duration::hours(24), Duration::from_secs(60))
            .map_err(fail)?;
        let hour_ago = now - chrono::Duration::hours(1);
        let hour: Vec<(chrono::DateTime<chrono::Utc>, u64, u64)> = minutes
            .iter()
            .filter(|t| t.start >= hour_ago - chrono::Duration::minutes(1))
            .map(|t| (t.start, t.done, t.failed))
            .collect();
        let mut day: Vec<(chrono::DateTime<chrono::Utc>, u64, u64)> = Vec::new();
        for t in &minutes {
            let ms = t.start.timestamp_millis();
            let start = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(
                ms - ms.rem_euclid(3_600_000),
            )
            .unwrap_or(t.start);
            match day.last_mut() {
                Some(last) if last.0 == start => {
                    last.1 += t.done;
                    last.2 += t.failed;
                }
                _ => day.push((start, t.done, t.failed)),
            }
        }
        let value = Arc::new(Overview {
            stats,
            hour,
            day,
            at: now,
        });
        *cached = Some(Cached {
            value: Arc::clone(&value),
            at: Instant::now(),
            cost: started.elapsed(),
        });
        Ok(value)
    }

    /// The last numbers counted, however old, without counting: for what
    /// only decorates a page (the type names offered in a filter).
    pub(crate) fn last_overview(&self) -> Option<Arc<Overview>> {
        let cached = self.overview.lock().unwrap_or_else(|p| p.into_inner());
        cached.as_ref().map(|c| Arc::clone(&c.value))
    }

    /// Forgets the overview's numbers, after a change.
    pub(crate) fn changed(&self) {
        *self.overview.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
