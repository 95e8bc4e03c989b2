//! `outbox relay` against hostile endpoints and commands: only an accepted
//! delivery marks an event done, no command outlives its timeout, nothing
//! stalls a worker, and no secret or control character leaks out.
#![cfg(feature = "cli")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlite_outbox::{Event, NewEvent, Operator, SqliteStore, Status};

mod common;

use common::cli::{outbox, stderr, BIN};
use common::endpoint::{Seen, Server};
use common::TestResult;

fn relay(db: &Path, args: &[&str]) -> std::io::Result<Output> {
    outbox(db, &[&["relay"], args].concat())
}

/// A fresh outbox with one event of type `t`.
fn one_event(
    dir: &Path,
    payload: serde_json::Value,
) -> Result<(PathBuf, SqliteStore, Event), Box<dyn std::error::Error>> {
    let db = dir.join("o.db");
    let store = SqliteStore::open(&db)?;
    let event = store.enqueue(NewEvent::new("t", payload))?;
    Ok((db, store, event))
}

fn stored(store: &SqliteStore, e: &Event) -> Result<Event, Box<dyn std::error::Error>> {
    Ok(store.find(e.id)?.ok_or("the event is gone")?)
}

#[test]
fn a_redirect_is_not_a_delivery_and_goes_nowhere() -> TestResult {
    for code in [301u16, 302, 303, 307, 308] {
        let elsewhere = Server::start(|| (200, vec![], b"login page".to_vec()))?;
        let target = format!("{}/login?session=abc", elsewhere.url);
        let endpoint = Server::start(move || (code, vec![("Location", target.clone())], vec![]))?;
        let dir = tempfile::tempdir()?;
        let (db, store, event) = one_event(dir.path(), json!({"n": 1}))?;
        let out = relay(
            &db,
            &[
                "--http",
                &format!("{}/events", endpoint.url),
                "--header",
                "X-Api-Key: k-123",
                "--drain",
            ],
        )?;
        assert_eq!(out.status.code(), Some(3), "HTTP {code}: {}", stderr(&out));
        let e = stored(&store, &event)?;
        assert_eq!(e.status, Status::Failed, "HTTP {code}");
        let err = e.last_error.unwrap_or_default();
        assert!(
            err.contains(&format!("HTTP {code}")) && err.contains("/login?***"),
            "{err}"
        );
        assert!(!err.contains("session=abc"), "{err}");
        assert!(
            elsewhere.seen().is_empty(),
            "HTTP {code}: the redirect was followed"
        );
        assert_eq!(endpoint.seen().len(), 1);
        assert_eq!(endpoint.seen()[0].method, "POST");
        assert_eq!(endpoint.seen()[0].url, "/events");
    }
    Ok(())
}

#[test]
fn a_bad_url_is_refused_before_any_attempt() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (db, store, event) = one_event(dir.path(), json!({}))?;
    for bad in ["not a url", "ftp://example.com/x", "http://", "/events"] {
        let out = relay(&db, &["--http", bad, "--drain"])?;
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
    }
    let e = stored(&store, &event)?;
    assert_eq!((e.status, e.attempts), (Status::Pending, 0));
    Ok(())
}

#[test]
fn retry_after_cannot_park_an_event_for_years() -> TestResult {
    let endpoint = Server::start(|| {
        (
            503,
            vec![("Retry-After", "18446744073709551615".to_owned())],
            vec![],
        )
    })?;
    let dir = tempfile::tempdir()?;
    let (db, store, event) = one_event(dir.path(), json!({}))?;
    let before = chrono::Utc::now();
    relay(&db, &["--http", &endpoint.url, "--drain"])?;
    let e = stored(&store, &event)?;
    // Busy is not the event's fault: no attempt spent, and it waits, even
    // for a later run, as long as the endpoint asked, but no longer than a
    // day.
    assert_eq!((e.status, e.attempts), (Status::Pending, 0));
    let wait = e.next_attempt_at - before;
    assert!(
        wait <= chrono::Duration::hours(24) + chrono::Duration::minutes(1)
            && wait >= chrono::Duration::hours(23),
        "parked for {wait}"
    );
    Ok(())
}

#[test]
fn credentials_never_reach_errors_or_logs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (db, store, event) = one_event(dir.path(), json!({}))?;
    // A port nothing listens on: a transport error naming the URL.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://ada:pw-s3cret@127.0.0.1:{closed}/hook?token=t0k3n-value");
    let out = relay(&db, &["--http", &url, "--drain"])?;
    // Nobody listens: the endpoint is unreachable, which the exit message
    // and the log say (the event itself is untouched).
    assert_eq!(stored(&store, &event)?.attempts, 0);
    let err = stderr(&out);
    assert!(err.contains("transport error"), "{err}");
    assert!(err.contains("is unreachable since"), "{err}");
    for shown in [&err, &String::from_utf8_lossy(&out.stdout).into_owned()] {
        for secret in ["pw-s3cret", "t0k3n-value", "ada:"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }
    Ok(())
}

#[test]
fn headers_come_from_a_file_or_the_environment_and_plain_http_is_flagged() -> TestResult {
    let endpoint = Server::start(|| (200, vec![], vec![]))?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    store.enqueue(NewEvent::new("t", json!(1)))?;
    let file = dir.path().join("headers");
    std::fs::write(&file, "# secrets\nAuthorization: Bearer from-file\n\n")?;
    let out = relay(
        &db,
        &[
            "--http",
            &endpoint.url,
            "--header-file",
            &file.display().to_string(),
            "--drain",
        ],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    store.enqueue(NewEvent::new("t", json!(2)))?;
    let out = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["relay", "--http", &endpoint.url, "--drain"])
        .env("OUTBOX_HEADERS", "X-Api-Key: from-env")
        .stdin(Stdio::null())
        .output()?;
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = endpoint.seen();
    let header = |i: usize, name: &str| {
        seen[i]
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header(0, "authorization").as_deref(),
        Some("Bearer from-file")
    );
    assert_eq!(header(1, "x-api-key").as_deref(), Some("from-env"));
    assert!(!stderr(&out).contains("from-env"));
    // Loopback is fine; anywhere else over http gets a warning.
    assert!(!stderr(&out).contains("plain http"));
    let out = relay(
        &db,
        &[
            "--http",
            "http://outbox-test.invalid/x",
            "--header",
            "Authorization: Bearer x",
            "--drain",
            "--timeout",
            "2s",
        ],
    )?;
    assert!(stderr(&out).contains("plain http"), "{}", stderr(&out));
    // A header that is not `Name: value` is a usage error that echoes no value.
    let out = relay(
        &db,
        &[
            "--http",
            &endpoint.url,
            "--header",
            "Authorization Bearer sekrit",
            "--drain",
        ],
    )?;
    assert_eq!(out.status.code(), Some(2));
    assert!(!stderr(&out).contains("sekrit"), "{}", stderr(&out));
    Ok(())
}

#[test]
fn hostile_responses_do_not_reach_the_terminal() -> TestResult {
    let endpoint =
        Server::start(|| (400, vec![], b"\x1b]0;pwned\x07\x1b[2J bad \x9b31m".to_vec()))?;
    let dir = tempfile::tempdir()?;
    let (db, store, event) = one_event(dir.path(), json!({}))?;
    relay(&db, &["--http", &endpoint.url, "--drain"])?;
    assert_eq!(stored(&store, &event)?.status, Status::Failed);
    for args in [vec!["list"], vec!["show", &event.id.to_string()]] {
        let out = Command::new(BIN)
            .arg("--db")
            .arg(&db)
            .args(&args)
            .output()?;
        assert!(out.status.success());
        let text = [out.stdout, out.stderr].concat();
        assert!(
            !text.contains(&0x1b) && !text.contains(&0x07),
            "{args:?}: {}",
            String::from_utf8_lossy(&text)
        );
        assert!(
            String::from_utf8_lossy(&text).contains("\\u{1b}"),
            "{args:?}"
        );
    }
    Ok(())
}

#[test]
fn the_relay_logs_to_a_pipe() -> TestResult {
    let endpoint = Server::start(|| (500, vec![], b"down".to_vec()))?;
    let dir = tempfile::tempdir()?;
    let (db, _, _) = one_event(dir.path(), json!({}))?;
    let out = relay(&db, &["--http", &endpoint.url, "--drain"])?;
    let log = stderr(&out);
    assert!(log.contains("relay started"), "{log}");
    assert!(
        log.contains("outbox handler failed") && log.contains("HTTP 500: down"),
        "{log}"
    );
    assert!(log.contains("relay stopped"), "{log}");
    Ok(())
}

fn exec_relay(db: &Path, cmd: &str, extra: &[&str]) -> std::io::Result<(Output, Duration)> {
    let started = Instant::now();
    let mut args = vec!["--exec", cmd, "--drain"];
    args.extend_from_slice(extra);
    let out = relay(db, &args)?;
    Ok((out, started.elapsed()))
}

#[test]
fn a_command_that_never_reads_its_input_is_timed_out() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (db, store, event) = one_event(dir.path(), json!({"big": "x".repeat(300_000)}))?;
    // A hung command against a timeout of 1 s: a bound far from either.
    let (out, took) = exec_relay(&db, "sleep 60", &["--timeout", "1s"])?;
    assert!(
        took < Duration::from_secs(30),
        "took {took:?}: {}",
        stderr(&out)
    );
    let e = stored(&store, &event)?;
    assert_eq!(e.status, Status::Pending);
    assert!(e.last_error.unwrap_or_default().contains("timed out"));
    Ok(())
}

#[test]
fn a_chatty_command_is_not_deadlocked() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (db, store, event) = one_event(dir.path(), json!({}))?;
    let (out, took) = exec_relay(
        &db,
        "head -c 300000 /dev/zero | tr '\\0' x >&2; cat >/dev/null",
        &["--timeout", "60s"],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(stored(&store, &event)?.status, Status::Done);
    Ok(())
}

#[test]
fn a_timed_out_command_takes_everything_it_started_with_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (db, store, event) = one_event(dir.path(), json!({}))?;
    let marker = dir.path().join("delivered-late");
    // The script's own child would deliver 5 s in, long after the timeout.
    let cmd = format!("(sleep 5; touch {}) & sleep 60", marker.display());
    let (out, took) = exec_relay(&db, &cmd, &["--timeout", "500ms"])?;
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}: {}",
        stderr(&out)
    );
    assert_eq!(stored(&store, &event)?.status, Status::Pending);
    std::thread::sleep(Duration::from_secs(6).saturating_sub(took));
    assert!(
        !marker.exists(),
        "a child of the timed-out command delivered late"
    );
    Ok(())
}

#[test]
fn lease_sets_how_long_a_killed_relay_holds_its_events() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (db, store, event) = one_event(dir.path(), json!({}))?;
    let mut child = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["relay", "--exec", "sleep 30", "--lease", "3s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let claimed = loop {
        let e = stored(&store, &event)?;
        if e.status == Status::Processing {
            break e;
        }
        assert!(Instant::now() < deadline, "never claimed");
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill()?;
    child.wait()?;
    let (at, until) = (
        claimed.locked_at.ok_or("locked_at")?,
        claimed.locked_until.ok_or("locked_until")?,
    );
    assert_eq!((until - at).num_seconds(), 3);
    Ok(())
}

#[test]
fn an_unreadable_row_does_not_stop_the_relay() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (db, store, _) = one_event(dir.path(), json!({"n": 1}))?;
    rusqlite::Connection::open(&db)?.execute_batch(
        "INSERT INTO outbox_events (event_type, payload) VALUES ('t', CAST(X'7B2261223A22FF227D' AS TEXT));",
    )?;
    store.enqueue(NewEvent::new("t", json!({"n": 2})))?;
    let (out, took) = exec_relay(&db, "cat >/dev/null", &["--timeout", "5s"])?;
    assert!(took < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("column payload is not valid UTF-8"),
        "{}",
        stderr(&out)
    );
    let stats = store.stats()?;
    assert_eq!((stats.done, stats.failed), (2, 1));
    for args in [vec!["list"], vec!["list", "--status", "failed"]] {
        let listed = Command::new(BIN)
            .arg("--db")
            .arg(&db)
            .args(&args)
            .output()?;
        assert!(listed.status.success(), "{args:?}: {}", stderr(&listed));
    }
    Ok(())
}

#[test]
fn commands_still_running_after_the_grace_are_killed_with_their_group() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (db, store, event) = one_event(dir.path(), json!({}))?;
    let marker = dir.path().join("delivered-after-shutdown");
    let cmd = format!("(sleep 2; touch {}) & sleep 30", marker.display());
    let mut child = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args([
            "relay",
            "--exec",
            &cmd,
            "--timeout",
            "60s",
            "--grace",
            "300ms",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored(&store, &event)?.status != Status::Processing {
        assert!(Instant::now() < deadline, "never claimed");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    send_sigterm(child.id())?;
    let started = Instant::now();
    let status = child.wait()?;
    assert!(started.elapsed() < Duration::from_secs(5), "{status:?}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !marker.exists(),
        "a command outlived the relay and delivered late"
    );
    Ok(())
}

/// SIGTERM, the way a service manager stops the relay.
fn send_sigterm(pid: u32) -> std::io::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    assert!(status.success());
    Ok(())
}

/// An endpoint that is down: nothing is spent, a `--drain` run stops at
/// once saying so (exit 3), and a running relay probes it, says so once,
/// and delivers everything when it comes up.
#[test]
fn an_endpoint_that_is_down_spends_nothing_and_is_delivered_to_when_back() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    for i in 0..5 {
        store.enqueue(NewEvent::new("t", json!({ "n": i })))?;
    }
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}/events");

    let started = Instant::now();
    let out = relay(&db, &["--http", &url, "--drain"])?;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        stderr(&out).contains("is unreachable since"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("5 event(s) wait"), "{}", stderr(&out));
    let pending = store.list(&sqlite_outbox::ListFilter::default())?;
    assert!(pending
        .iter()
        .all(|e| e.status == Status::Pending && e.attempts == 0));

    let mut child = common::Reaper::one(
        Command::new(BIN)
            .arg("--db")
            .arg(&db)
            .args(["relay", "--http", &url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let mut pipe = child.child().stderr.take().ok_or("no stderr")?;
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut log);
        log
    });
    // Another process sees that the relay holds the endpoint back.
    let deadline = Instant::now() + Duration::from_secs(20);
    let held = loop {
        let stats = common::cli::json_of(&outbox(&db, &["--json", "stats"])?)?;
        if let Some(d) = stats["destinations"].as_array().and_then(|d| d.first()) {
            break d.clone();
        }
        assert!(Instant::now() < deadline, "never written down: {stats}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(held["name"], json!(url));
    assert_eq!(held["hold"], json!("unreachable"));
    let shown = common::cli::ok(&outbox(&db, &["stats"])?)?;
    assert!(
        shown.contains("held back by a dispatcher") && shown.contains("unreachable"),
        "{shown}"
    );
    let server = Server::start_on(&format!("127.0.0.1:{port}"), || (200, vec![], vec![]))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.stats()?.done < 5 {
        assert!(
            Instant::now() < deadline,
            "not delivered after the endpoint came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.seen().len(), 5, "each delivered once");
    let done = store.list(&sqlite_outbox::ListFilter::default())?;
    assert!(done.iter().all(|e| e.attempts == 1), "{done:?}");
    send_sigterm(child.child().id())?;
    child.wait_all(Duration::from_secs(30))?;
    let log = reader.join().map_err(|_| "the reader panicked")?;
    assert_eq!(
        log.matches("destination unreachable").count(),
        1,
        "said once, not per event: {log}"
    );
    assert!(log.contains("reachable again"), "{log}");
    let stats = common::cli::json_of(&outbox(&db, &["--json", "stats"])?)?;
    assert_eq!(
        stats["destinations"],
        json!([]),
        "nothing held back any more"
    );
    Ok(())
}

#[test]
fn trace_context_travels_as_a_header_and_a_forged_one_does_not() -> TestResult {
    let endpoint = Server::start(|| (200, vec![], vec![]))?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = store.enqueue(NewEvent::new("t", json!(1)).with_traceparent(tp))?;
    // Another program bypasses the table's check to write a header
    // injection; the event is still delivered, without it.
    let conn = rusqlite::Connection::open(&db)?;
    conn.execute_batch(
        "PRAGMA ignore_check_constraints = ON;
         INSERT INTO outbox_events (event_type, payload, traceparent)
         VALUES ('t', '2', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX-Evil: 1');",
    )?;
    let out = relay(&db, &["--http", &endpoint.url, "--drain"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = endpoint.seen();
    assert_eq!(seen.len(), 2);
    let traceparent = |s: &Seen| {
        s.headers
            .iter()
            .find(|(k, _)| k == "traceparent")
            .map(|(_, v)| v.clone())
    };
    let by_id = |s: &Seen| {
        s.headers
            .iter()
            .any(|(k, v)| k == "idempotency-key" && *v == traced.id.to_string())
    };
    let (first, second) = if by_id(&seen[0]) {
        (&seen[0], &seen[1])
    } else {
        (&seen[1], &seen[0])
    };
    assert_eq!(traceparent(first).as_deref(), Some(tp));
    assert_eq!(traceparent(second), None);
    assert!(second.headers.iter().all(|(k, _)| k != "x-evil"));
    assert_eq!(store.stats()?.done, 2);
    Ok(())
}

#[test]
fn the_relay_serves_its_counters_and_run_times_to_prometheus() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    for kind in ["good", "good", "bad"] {
        store.enqueue(NewEvent::new(kind, json!({})))?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut relay = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["relay", "--exec"])
        .arg("cat > /dev/null; [ \"$OUTBOX_EVENT_TYPE\" != bad ] || exit 65")
        .args(["--metrics", &format!("127.0.0.1:{port}"), "--poll", "50ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(30);
        let text = loop {
            let stats = store.stats()?;
            if stats.done == 2 && stats.failed == 1 {
                if let Ok(r) = ureq::get(&format!("http://127.0.0.1:{port}/metrics")).call() {
                    let text = r.into_string()?;
                    if text.contains("outbox_failures_total") {
                        break text;
                    }
                }
            }
            assert!(Instant::now() < deadline, "{stats:?}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let sample = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        assert_eq!(sample("outbox_deliveries_total"), Some(2.0), "{text}");
        assert_eq!(sample("outbox_failures_total"), Some(1.0), "{text}");
        assert_eq!(
            sample("outbox_handler_duration_seconds_count{type=\"good\"}"),
            Some(2.0),
            "{text}"
        );
        assert!(
            text.contains("outbox_handler_duration_seconds_bucket{type=\"bad\",le=\"+Inf\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("outbox_events{status=\"done\",type=\"good\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE outbox_deliveries_total counter"),
            "{text}"
        );
        common::cli::promtool_accepts(&text)?;
        Ok(())
    })();
    let _ = relay.kill();
    let _ = relay.wait();
    result
}

#[test]
fn header_values_an_endpoint_echoes_never_reach_the_stored_error() -> TestResult {
    let token = "tok-9f8e7d6c5b4a";
    // The endpoint echoes the request's Authorization in its error body,
    // whole and as the bare token.
    let echo = format!("unauthorised: Authorization: Bearer {token} (token {token})");
    let endpoint = Server::start(move || (401, vec![], echo.clone().into_bytes()))?;
    let dir = tempfile::tempdir()?;
    let (db, store, event) = one_event(dir.path(), json!({"n": 1}))?;
    let headers = dir.path().join("headers");
    std::fs::write(&headers, format!("Authorization: Bearer {token}\n"))?;
    let out = relay(
        &db,
        &[
            "--http",
            &endpoint.url,
            "--header-file",
            headers.to_str().ok_or("path")?,
            "--drain",
        ],
    )?;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stored(&store, &event)?.last_error.unwrap_or_default();
    assert!(err.contains("HTTP 401") && err.contains("***"), "{err}");
    assert!(!err.contains(token) && !err.contains("tok-9f8e"), "{err}");
    assert!(!stderr(&out).contains(token));
    // The header did go out, as given.
    assert_eq!(
        endpoint.seen()[0]
            .headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .map(|(_, v)| v.as_str()),
        Some(format!("Bearer {token}").as_str())
    );
    Ok(())
}

#[test]
fn commands_never_inherit_the_outboxs_secrets() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (db, store, event) = one_event(dir.path(), json!({"n": 1}))?;
    let seen = dir.path().join("env");
    let out = Command::new(BIN)
        .args(["relay", "--exec"])
        .arg(format!("cat > /dev/null; env > '{}'", seen.display()))
        .arg("--drain")
        .env("OUTBOX_DB", &db)
        .env("OUTBOX_HEADERS", "Authorization: Bearer hdr-secret-123")
        .env("OUTBOX_UI_TOKEN", "ui-secret-token-456")
        .env("APP_SETTING", "kept")
        .stdin(Stdio::null())
        .output()?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stored(&store, &event)?.status, Status::Done);
    let env = std::fs::read_to_string(&seen)?;
    for secret in [
        "OUTBOX_DB=",
        "OUTBOX_HEADERS=",
        "OUTBOX_UI_TOKEN=",
        "hdr-secret",
        "ui-secret",
    ] {
        assert!(
            !env.contains(secret),
            "{secret} reached the command:\n{env}"
        );
    }
    // The command's own environment and the event's variables remain.
    assert!(env.contains("APP_SETTING=kept"), "{env}");
    assert!(
        env.contains(&format!("OUTBOX_EVENT_ID={}", event.id)),
        "{env}"
    );
    Ok(())
}

#[test]
fn cloudevents_in_both_modes_read_back_with_the_reference_sdk() -> TestResult {
    use cloudevents::{AttributesReader, Data};
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for mode in ["cloudevents", "cloudevents-binary"] {
        let endpoint = Server::start(|| (200, vec![], vec![]))?;
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("o.db");
        let store = SqliteStore::open(&db)?;
        let event = store.enqueue(
            NewEvent::new("order.placed", json!({"order": 7, "note": "ß\u{1b}"}))
                .with_ordering_key("customer-1")
                .with_correlation_id("req-9")
                .with_traceparent(tp),
        )?;
        let out = relay(
            &db,
            &[
                "--http",
                &endpoint.url,
                "--format",
                mode,
                "--source",
                "/shop/orders",
                "--drain",
            ],
        )?;
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        let seen = endpoint.seen();
        let request = seen.first().ok_or("nothing arrived")?;
        let mut headers = http::HeaderMap::new();
        for (k, v) in &request.headers {
            headers.append(
                http::header::HeaderName::from_bytes(k.as_bytes())?,
                http::header::HeaderValue::from_str(v)?,
            );
        }
        let ce = cloudevents::binding::http::to_event(&headers, request.body.clone().into_bytes())?;
        assert_eq!(ce.id(), event.id.to_string(), "{mode}");
        assert_eq!(ce.ty(), "order.placed");
        assert_eq!(ce.source().as_str(), "/shop/orders");
        assert_eq!(ce.specversion().as_str(), "1.0");
        assert_eq!(ce.datacontenttype(), Some("application/json"));
        assert_eq!(
            ce.time().map(|t| t.timestamp_millis()),
            Some(event.created_at.timestamp_millis())
        );
        let ext = |name: &str| ce.extension(name).map(ToString::to_string);
        assert_eq!(ext("traceparent").as_deref(), Some(tp), "{mode}");
        assert_eq!(ext("partitionkey").as_deref(), Some("customer-1"));
        assert_eq!(ext("correlationid").as_deref(), Some("req-9"));
        let data = match ce.data() {
            Some(Data::Json(v)) => v.clone(),
            Some(Data::Binary(b)) => serde_json::from_slice(b)?,
            Some(Data::String(s)) => serde_json::from_str(s)?,
            None => return Err(format!("{mode}: no data").into()),
        };
        assert_eq!(data, json!({"order": 7, "note": "ß\u{1b}"}), "{mode}");
        let content_type = request
            .headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.as_str());
        let expected = if mode == "cloudevents" {
            "application/cloudevents+json"
        } else {
            "application/json"
        };
        assert_eq!(content_type, Some(expected));
    }
    Ok(())
}

/// The README's plain-SQL rows share the key `user-17`; its head meets a
/// 500: `relay --drain` exits 3 saying what waits and why, and `show`,
/// `list` and `stats` say the same of the events behind the head.
#[test]
fn events_behind_a_stalled_key_are_named_and_the_drain_says_so() -> TestResult {
    let endpoint = Server::start(|| (500, vec![], b"database is down".to_vec()))?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let conn = rusqlite::Connection::open(&db)?;
    for i in 0..3 {
        conn.execute(
            "INSERT INTO outbox_events (event_type, payload, ordering_key) VALUES ('user.updated', ?1, 'user-17')",
            [json!({ "i": i }).to_string()],
        )?;
    }
    let out = relay(&db, &["--http", &endpoint.url, "--drain"])?;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("3 event(s) wait")
            && err.contains("1 due later")
            && err.contains("HTTP 500: database is down")
            && err.contains("2 behind ordering key \"user-17\""),
        "{err}"
    );
    let events = store.list(&sqlite_outbox::ListFilter::default())?;
    let (head, behind) = (&events[0], &events[2]);
    let show = outbox(&db, &["show", &behind.id.to_string()])?;
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(
        shown.contains("behind ordering key \"user-17\"") && shown.contains(&head.id.to_string()),
        "{shown}"
    );
    let stats = outbox(&db, &["stats"])?;
    let said = String::from_utf8_lossy(&stats.stdout);
    assert!(
        said.contains("(due 2, 2 of them behind their ordering key)"),
        "{said}"
    );
    let list = outbox(
        &db,
        &["list", "--why", "--type", "user.updated", "--type", "other"],
    )?;
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("WHY") && listed.contains("by reason: scheduled 1, behind_key 2"),
        "{listed}"
    );
    let list = outbox(&db, &["--json", "list", "--reason", "behind_key"])?;
    let v: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    let ids: Vec<&str> = v
        .as_array()
        .ok_or("not a list")?
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(ids, [events[1].id.to_string(), behind.id.to_string()]);
    let metrics = outbox(&db, &["stats", "--prometheus"])?;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("\noutbox_events_behind_key 2\n"),
        "{metrics}"
    );
    let json = outbox(&db, &["--json", "show", &behind.id.to_string()])?;
    let v: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(v["why"]["reason"], "behind_key");
    assert_eq!(v["why"]["head"], json!(head.id.to_string()));
    Ok(())
}
