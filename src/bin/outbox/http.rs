//! The HTTP front of `outbox ui` and `relay --metrics`: safe on an open
//! port. hyper (HTTP/1.1 only) on a small tokio runtime of its own, one
//! thread for every connection's I/O and a few for the handlers, which
//! read the outbox and may block.
//!
//! What any client can cost it is bounded:
//! - the request line and headers: [`Limits::header_bytes`] (431 beyond),
//!   and they must arrive within [`Limits::header_timeout`], which is also
//!   how long a kept-alive connection may sit idle;
//! - the app's checks ([`App::admit`]: Host, authentication, method) run on
//!   the head alone, before a byte of the body is read;
//! - a body is read only when the app admits it, up to
//!   [`Limits::body_bytes`] (a larger `Content-Length` is answered 413
//!   unread) and within [`Limits::body_timeout`] (408);
//! - connections: at most [`Limits::max_connections`] at once (more are
//!   closed at once), each for at most [`Limits::lifetime`];
//! - handler threads: [`Limits::handlers`]; a slow client never holds one,
//!   since a handler runs only once the whole request is in.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_rustls::rustls;

/// What a client may cost the server.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) header_bytes: usize,
    pub(crate) header_timeout: Duration,
    pub(crate) body_bytes: u64,
    pub(crate) body_timeout: Duration,
    pub(crate) tls_timeout: Duration,
    pub(crate) lifetime: Duration,
    pub(crate) handlers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            header_bytes: 32 * 1024,
            header_timeout: Duration::from_secs(10),
            body_bytes: 64 * 1024,
            body_timeout: Duration::from_secs(10),
            tls_timeout: Duration::from_secs(10),
            lifetime: Duration::from_secs(300),
            handlers: 4,
        }
    }
}

/// A request's head: all an app sees before it admits a body.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: String,
    /// Whether it came over TLS.
    pub(crate) secure: bool,
    /// Lower-case names; a value that is not visible ASCII is left out.
    headers: HashMap<String, String>,
}

impl Head {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    #[cfg(test)]
    pub(crate) fn new(method: &str, target: &str, headers: &[(&str, &str)]) -> Head {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Head {
            method: method.to_owned(),
            path: path.to_owned(),
            query: query.to_owned(),
            secure: false,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
                .collect(),
        }
    }
}

/// A response.
#[derive(Debug)]
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

/// What the server serves.
pub(crate) trait App: Send + Sync + 'static {
    /// Whether to read the request's body and handle it, from its head
    /// alone; cheap and non-blocking (it runs on the I/O thread). `Err` is
    /// the answer, and the body is never read.
    fn admit(&self, head: &Head) -> Result<(), Reply>;

    /// The answer to an admitted request (on a handler thread: it may read
    /// the outbox).
    fn handle(&self, head: Head, body: Vec<u8>) -> Reply;

    /// Headers every answer carries (security policy and the like).
    fn fixed_headers(&self) -> &[(&'static str, &'static str)] {
        &[]
    }
}

/// A bound listener, not yet serving.
pub(crate) struct Listener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Listener {
    pub(crate) fn bind(addr: SocketAddr) -> Result<Listener, String> {
        let listener =
            TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        Ok(Listener { listener, addr })
    }

    /// The address it got (for port 0).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `app` on a thread of its own, for as long as the process
    /// lives.
    pub(crate) fn spawn(
        self,
        app: Arc<dyn App>,
        tls: Option<Arc<rustls::ServerConfig>>,
        limits: Limits,
    ) -> Result<std::thread::JoinHandle<()>, String> {
        let limits = Limits {
            max_connections: limits.max_connections.min(open_files_allowed()),
            ..limits
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(limits.handlers.max(1))
            .thread_name("outbox-http")
            .build()
            .map_err(|e| format!("cannot start the HTTP server: {e}"))?;
        std::thread::Builder::new()
            .name("outbox-http".into())
            .spawn(move || runtime.block_on(accept_loop(self.listener, app, tls, limits)))
            .map_err(|e| format!("cannot start the HTTP server: {e}"))
    }
}

/// How many connections the process may hold open: the soft limit on open
/// files, raised to the hard one, less a margin for everything else.
fn open_files_allowed() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 512;
    };
    let soft = if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    usize::try_from(soft.saturating_sub(128))
        .unwrap_or(usize::MAX)
        .max(16)
}

async fn accept_loop(
    listener: TcpListener,
    app: Arc<dyn App>,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        tracing::error!("the HTTP listener cannot be registered");
        return;
    };
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let handlers = Arc::new(Semaphore::new(limits.handlers.max(1)));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it
                // was taken: pause a little rather than spin.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Over the cap: closed at once, never queued.
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, handlers, limits, acceptor) = (
            Arc::clone(&app),
            Arc::clone(&handlers),
            limits.clone(),
            acceptor.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                None => serve_connection(stream, app, handlers, &limits, false).await,
                Some(acceptor) => {
                    let shake = tokio::time::timeout(limits.tls_timeout, acceptor.accept(stream));
                    if let Ok(Ok(stream)) = shake.await {
                        serve_connection(stream, app, handlers, &limits, true).await;
                    }
                }
            }
        });
    }
}

async fn serve_connection<I>(
    io: I,
    app: Arc<dyn App>,
    handlers: Arc<Semaphore>,
    limits: &Limits,
    secure: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits2 = limits.clone();
    let service = service_fn(move |rq| {
        let (app, handlers, limits) = (Arc::clone(&app), Arc::clone(&handlers), limits2.clone());
        async move {
            Ok::<_, std::convert::Infallible>(answer(rq, app, handlers, &limits, secure).await)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.header_bytes.max(8192))
        .serve_connection(TokioIo::new(io), service);
    let mut conn = pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = tokio::time::sleep(limits.lifetime) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

async fn answer(
    rq: hyper::Request<Incoming>,
    app: Arc<dyn App>,
    handlers: Arc<Semaphore>,
    limits: &Limits,
    secure: bool,
) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = rq.into_parts();
    let head = Head {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        secure,
        headers: parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
    };
    let fixed = app.fixed_headers();
    if let Err(reply) = app.admit(&head) {
        return response(reply, fixed);
    }
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.body_bytes) {
        return response(Reply::text(413, "the request body is too large\n"), fixed);
    }
    let limit = usize::try_from(limits.body_bytes).unwrap_or(usize::MAX);
    let read = Limited::new(body, limit).collect();
    let body = match tokio::time::timeout(limits.body_timeout, read).await {
        Err(_) => {
            return response(
                Reply::text(408, "the request body came too slowly\n"),
                fixed,
            )
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return response(Reply::text(413, "the request body is too large\n"), fixed)
        }
        Ok(Err(_)) => return response(Reply::text(400, "the request body was cut off\n"), fixed),
        Ok(Ok(collected)) => collected.to_bytes().to_vec(),
    };
    let Ok(permit) = handlers.acquire_owned().await else {
        return response(Reply::text(503, "the server is stopping\n"), fixed);
    };
    let app2 = Arc::clone(&app);
    let handled = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        app2.handle(head, body)
    });
    match handled.await {
        Ok(reply) => response(reply, fixed),
        // A bug costs one request, never a thread of the server.
        Err(_) => response(
            Reply::text(500, "the request could not be handled\n"),
            fixed,
        ),
    }
}

fn response(reply: Reply, fixed: &[(&'static str, &'static str)]) -> hyper::Response<Full<Bytes>> {
    let mut builder = hyper::Response::builder()
        .status(reply.status)
        .header("Content-Type", reply.content_type);
    for (k, v) in fixed {
        builder = builder.header(*k, *v);
    }
    for (k, v) in &reply.headers {
        builder = builder.header(*k, v.as_str());
    }
    builder
        .body(Full::new(Bytes::from(reply.body)))
        .unwrap_or_else(|_| {
            let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"bad response\n")));
            *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
}

/// A TLS configuration from PEM files: the certificate chain (leaf first)
/// and its private key.
pub(crate) fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "--tls-cert {}: no certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-cert and --tls-key do not make a pair: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
