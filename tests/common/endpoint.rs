//! A local HTTP endpoint for the relay's tests: answers each request as
//! told and keeps what it saw.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A request as a server saw it: method, URL, headers (lowercase names).
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// A local HTTP server that answers every request with `answer` and keeps
/// what it saw.
pub struct Server {
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

pub type Answer = (u16, Vec<(&'static str, String)>, Vec<u8>);

impl Server {
    pub fn start(
        answer: impl Fn() -> Answer + Send + Sync + 'static,
    ) -> Result<Server, Box<dyn std::error::Error>> {
        Server::start_on("127.0.0.1:0", answer)
    }

    pub fn start_on(
        addr: &str,
        answer: impl Fn() -> Answer + Send + Sync + 'static,
    ) -> Result<Server, Box<dyn std::error::Error>> {
        Server::answering(addr, move |_| answer())
    }

    /// A server whose answer depends on the request. Requests are logged
    /// in the order they arrive and answered each on a thread of its own,
    /// so a slow answer holds up no other request.
    pub fn answering(
        addr: &str,
        answer: impl Fn(&Seen) -> Answer + Send + Sync + 'static,
    ) -> Result<Server, Box<dyn std::error::Error>> {
        let answer = Arc::new(answer);
        let server = Arc::new(tiny_http::Server::http(addr).map_err(|e| e.to_string())?);
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .ok_or("no port")?;
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (srv, log) = (server.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while let Ok(Some(mut req)) = srv.recv_timeout(Duration::from_secs(60)) {
                let mut body = String::new();
                let _ = std::io::Read::read_to_string(req.as_reader(), &mut body);
                let seen = Seen {
                    method: req.method().to_string(),
                    url: req.url().to_owned(),
                    headers: req
                        .headers()
                        .iter()
                        .map(|h| {
                            (
                                h.field.as_str().as_str().to_ascii_lowercase(),
                                h.value.as_str().to_owned(),
                            )
                        })
                        .collect(),
                    body,
                };
                if let Ok(mut log) = log.lock() {
                    log.push(seen.clone());
                }
                let answer = Arc::clone(&answer);
                std::thread::spawn(move || {
                    let (code, headers, body) = answer(&seen);
                    let mut resp = tiny_http::Response::from_data(body).with_status_code(code);
                    for (k, v) in headers {
                        if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
                            resp.add_header(h);
                        }
                    }
                    let _ = req.respond(resp);
                });
            }
        });
        Ok(Server {
            url: format!("http://127.0.0.1:{port}"),
            seen,
            server,
            thread: Some(thread),
        })
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
