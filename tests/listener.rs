//! The HTTP front of `outbox ui` and `relay --metrics`, attacked from
//! outside over real sockets: a huge Content-Length, a header that never
//! ends, slow bodies on more connections than there are handler threads,
//! and thousands of idle connections, all at once. The process must live,
//! stay small, and answer `/metrics` throughout.
#![cfg(feature = "cli")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::browser::{Dashboard, Result};
use common::cli::BIN;
use sqlite_outbox::{NewEvent, SqliteStore};

/// Idle connections held open during the attack.
const IDLE: usize = 3000;

/// One request on a fresh connection; the status line's code (0 when the
/// server closed without answering).
fn request(addr: SocketAddr, raw: &[u8]) -> Result<u16> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(raw)?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let line = String::from_utf8_lossy(&buf[..n]);
    Ok(line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// How long a scrape of `/metrics` takes, and that it succeeds.
fn scrape(addr: SocketAddr, host: &str) -> Result<Duration> {
    let started = Instant::now();
    let code = request(
        addr,
        format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    assert_eq!(code, 200, "/metrics did not answer");
    Ok(started.elapsed())
}

/// Raises this process's limit on open files, for the idle connections.
fn room_for(n: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 500;
    };
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    let hard = usize::try_from(hard).unwrap_or(usize::MAX);
    n.min(hard.saturating_sub(200))
}

/// A line of `/proc/PID/status`, as a number (`VmRSS` in kB, `Threads`).
fn proc_status(pid: u32, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .ok_or_else(|| format!("no {key} in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or("not a number")?)
}

/// `admits_bodies`: whether the server reads a body for `post_path` at all
/// (the dashboard does for its actions; the metrics server reads none).
fn attack(
    child: &mut Child,
    addr: SocketAddr,
    host: &str,
    post_path: &str,
    admits_bodies: bool,
) -> Result<()> {
    let pid = child.id();
    let baseline = scrape(addr, host)?;
    // A Content-Length of a terabyte, on a GET and on an admitted POST:
    // refused unread (tiny_http once allocated it all, and aborted).
    for method in ["GET /x", post_path] {
        let raw = format!(
            "{method} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n\
             Content-Length: 1000000000000\r\n\r\n"
        );
        let code = request(addr, raw.as_bytes())?;
        // Refused at once, from the header alone: not after waiting for a
        // body (408) nor after reading one.
        if admits_bodies {
            assert_eq!(code, 413, "{method}");
        } else {
            assert!(
                (400..500).contains(&code) && code != 408,
                "{method}: {code}"
            );
        }
    }
    // A body of exactly the limit is read, and the request goes on to the
    // app's own checks.
    let limit = 64 * 1024;
    let raw = format!(
        "{post_path} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {limit}\r\n\r\n{}",
        "a".repeat(limit)
    );
    let code = request(addr, raw.as_bytes())?;
    if admits_bodies {
        assert_ne!(code, 413, "a body of exactly the limit was refused");
    }
    assert!((400..500).contains(&code), "{code}");
    // A chunked body, with no length declared, is cut at the limit.
    if admits_bodies {
        let chunk = "b".repeat(16 * 1024);
        let mut raw = format!(
            "{post_path} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        );
        for _ in 0..5 {
            raw.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
        }
        raw.push_str("0\r\n\r\n");
        assert_eq!(
            request(addr, raw.as_bytes())?,
            413,
            "a chunked body over the limit"
        );
    }
    // A header line that never ends: the server hangs up long before
    // 256 MiB (tiny_http held all of it).
    let mut s = TcpStream::connect(addr)?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Long: ").as_bytes())?;
    let chunk = vec![b'a'; 1 << 20];
    let mut sent = 0usize;
    while sent < 256 << 20 {
        if s.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    assert!(sent < 8 << 20, "the server took {sent} bytes of one header");
    drop(s);
    // Slow bodies: more than there are handler threads, each a POST the
    // server admits, whose body never comes.
    let mut slow = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect(addr)?;
        s.write_all(
            format!(
                "{post_path} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ncsrf="
            )
            .as_bytes(),
        )?;
        slow.push(s);
    }
    // Thousands of connections that send nothing.
    let mut idle = Vec::new();
    for _ in 0..room_for(IDLE) {
        match TcpStream::connect(addr) {
            Ok(s) => idle.push(s),
            Err(_) => break,
        }
    }
    assert!(idle.len() >= 500, "only {} idle connections", idle.len());
    // Prometheus still gets its numbers, at once.
    let under_attack = scrape(addr, host)?;
    eprintln!(
        "/metrics: {baseline:?} idle, {under_attack:?} with {} idle connections and {} slow bodies",
        idle.len(),
        slow.len()
    );
    assert!(
        // A stall would last the 10 s header timeout or more; anything
        // short of that answered.
        under_attack < Duration::from_secs(8),
        "/metrics took {under_attack:?} under attack"
    );
    assert!(child.try_wait()?.is_none(), "the server died");
    let rss_kb = proc_status(pid, "VmRSS:")?;
    let threads = proc_status(pid, "Threads:")?;
    assert!(rss_kb < 300_000, "{rss_kb} kB resident");
    assert!(threads < 32, "{threads} threads");
    drop(idle);
    drop(slow);
    scrape(addr, host)?;
    assert!(child.try_wait()?.is_none(), "the server died");
    Ok(())
}

fn addr_of(url: &str) -> Result<SocketAddr> {
    Ok(url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()?)
}

#[test]
fn the_dashboard_survives_what_anyone_can_send() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("app.db");
    SqliteStore::open(&db)?.enqueue(NewEvent::new("t", serde_json::json!({})))?;
    let mut ui = Dashboard::start(&db, &[])?;
    let addr = addr_of(&ui.url)?;
    let host = addr.to_string();
    attack(ui.child(), addr, &host, "POST /actions/retry", true)
}

#[test]
fn the_relays_metrics_port_cannot_stop_delivery() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut relay = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["relay", "--exec", "cat > /dev/null"])
        .args(["--metrics", &format!("127.0.0.1:{port}"), "--poll", "50ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let result = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while scrape(addr, "x").is_err() {
            assert!(Instant::now() < deadline, "the relay never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        attack(&mut relay, addr, "x", "POST /metrics", false)?;
        // And it still delivers.
        let e = store.enqueue(NewEvent::new("t", serde_json::json!({})))?;
        while store.find(e.id)?.map(|e| e.status) != Some(sqlite_outbox::Status::Done) {
            assert!(Instant::now() < deadline, "the relay stopped delivering");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })();
    let _ = relay.kill();
    let _ = relay.wait();
    result
}
