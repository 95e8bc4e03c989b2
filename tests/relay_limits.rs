//! `outbox relay --rate`, `--concurrency` and `--shared-limits`, measured
//! by the receiving server: deliveries per interval and at once, one relay
//! or two on one file, and no attempt spent while an event waits.
#![cfg(feature = "cli")]

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cli::{stderr, BIN};
use common::endpoint::Server;
use common::TestResult;
use serde_json::json;
use sqlite_outbox::{NewEvent, Operator, SqliteStore, Status};

fn relay(db: &std::path::Path, args: &[&str]) -> std::io::Result<std::process::Child> {
    relay_with(db, &[], args)
}

/// `outbox --db DB GLOBAL... relay ARGS...`, its output kept.
fn relay_with(
    db: &std::path::Path,
    global: &[&str],
    args: &[&str],
) -> std::io::Result<std::process::Child> {
    Command::new(BIN)
        .arg("--db")
        .arg(db)
        .args(global)
        .arg("relay")
        .args(args)
        .env_remove("OUTBOX_DB")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// Two relays on the outbox at `db` (16 events waiting) under one rate
/// limit of 4 per 200 ms they keep together: both succeed, and the server
/// sees every event, paced.
fn two_relays_paced(db: &std::path::Path, global: &[&str]) -> TestResult {
    let (server, arrivals) = timing_server()?;
    let args = [
        "--http",
        &server.url,
        "--rate",
        "4/200ms",
        "--shared-limits",
        "--poll",
        "20ms",
        "--drain",
    ];
    let (a, b) = (
        relay_with(db, global, &args)?,
        relay_with(db, global, &args)?,
    );
    for child in [a, b] {
        let out = child.wait_with_output()?;
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let seen = arrivals.lock().map_err(|_| "poisoned")?.clone();
    assert_eq!(seen.len(), 16);
    paced(&seen, 4, Duration::from_millis(200));
    Ok(())
}

/// When each request arrived.
type Arrivals = Arc<Mutex<Vec<Instant>>>;

/// A server that notes when each request arrived.
fn timing_server() -> Result<(Server, Arrivals), Box<dyn std::error::Error>> {
    let arrivals: Arrivals = Arc::default();
    let log = arrivals.clone();
    let server = Server::answering("127.0.0.1:0", move |_| {
        if let Ok(mut v) = log.lock() {
            v.push(Instant::now());
        }
        (200, vec![], b"ok".to_vec())
    })?;
    Ok((server, arrivals))
}

/// No `per` at the server holds more than the bucket allows (a burst of
/// `max`, what it refills over the window, and as much again for requests
/// that left apart and arrived together), and the whole run took at least
/// as long as the rate demands, less one `per` for the first request's way
/// to the server (a new connection, a busy machine).
fn paced(arrivals: &[Instant], max: usize, per: Duration) {
    let mut v = arrivals.to_vec();
    v.sort();
    for (i, t) in v.iter().enumerate() {
        let inside = v[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < per)
            .count();
        assert!(inside <= 2 * max + 1, "{inside} requests within {per:?}");
    }
    let least = per * (v.len() - max) as u32 / max as u32;
    let took = v[v.len() - 1].duration_since(v[0]);
    assert!(took + per >= least, "{took:?} < {least:?} - {per:?}");
}

fn one_attempt_each(store: &SqliteStore, n: usize) -> TestResult {
    let events = store.list(&sqlite_outbox::ListFilter {
        limit: 1000,
        ..Default::default()
    })?;
    assert_eq!(events.len(), n);
    for e in events {
        assert_eq!((e.status, e.attempts), (Status::Done, 1), "{e:?}");
    }
    Ok(())
}

#[test]
fn a_rate_limit_paces_what_the_server_receives() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    for i in 0..12 {
        store.enqueue(NewEvent::new("t", json!(i)))?;
    }
    let (server, arrivals) = timing_server()?;
    let out = relay(
        &db,
        &["--http", &server.url, "--rate", "4/200ms", "--drain"],
    )?
    .wait_with_output()?;
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = arrivals.lock().map_err(|_| "poisoned")?.clone();
    assert_eq!(seen.len(), 12);
    paced(&seen, 4, Duration::from_millis(200));
    one_attempt_each(&store, 12)
}

#[test]
fn two_relays_share_one_rate_limit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    for i in 0..16 {
        store.enqueue(NewEvent::new("t", json!(i)))?;
    }
    two_relays_paced(&db, &[])?;
    // And the operator sees the shared limit: in stats, and in metrics
    // that Prometheus's own parser accepts.
    let limits = store.stats()?.limits;
    assert!(
        limits.iter().any(|l| l.shared && l.kind.max() == 4),
        "{limits:?}"
    );
    let table = common::cli::ok(&common::cli::outbox(&db, &["stats"])?)?;
    assert!(table.contains("limits dispatchers keep"), "{table}");
    assert!(table.contains("4 per 200ms"), "{table}");
    let metrics = common::cli::ok(&common::cli::outbox(&db, &["stats", "--prometheus"])?)?;
    assert!(
        metrics.contains("outbox_limit_max{scope=\"destination\",name=\"")
            && metrics.contains("kind=\"rate\"} 4"),
        "{metrics}"
    );
    assert!(metrics.contains("outbox_limit_waiting{"), "{metrics}");
    assert!(common::cli::promtool_accepts(&metrics)?, "{metrics}");
    one_attempt_each(&store, 16)
}

#[test]
fn an_event_waiting_for_a_limit_says_so() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    for i in 0..6 {
        store.enqueue(NewEvent::new("t", json!(i)))?;
    }
    let (server, _arrivals) = timing_server()?;
    // One per 10 minutes: the first goes, the rest wait.
    let mut child = relay(&db, &["--http", &server.url, "--rate", "1/10m"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let waiting = store
            .limits()?
            .into_iter()
            .find(|l| l.limited_since.is_some());
        if waiting.is_some() || Instant::now() > deadline {
            break waiting;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        waiting.is_some(),
        "the limit was never written down as waited for"
    );
    let pending = store.list(&sqlite_outbox::ListFilter {
        status: Some(Status::Pending),
        limit: 10,
        ..Default::default()
    })?;
    assert_eq!(pending.len(), 5);
    let shown = common::cli::ok(&common::cli::outbox(
        &db,
        &["show", &pending[0].id.to_string()],
    )?)?;
    assert!(
        shown.contains("limited: waits for the rate limit"),
        "{shown}"
    );
    let listed = common::cli::ok(&common::cli::outbox(&db, &["list", "--why"])?)?;
    assert!(listed.contains("limited 5"), "{listed}");
    // Waiting cost them nothing.
    assert!(pending.iter().all(|e| e.attempts == 0), "{pending:?}");
    Ok(())
}

/// Two relay processes on one PostgreSQL outbox, under one rate limit
/// they keep together (the bucket in the schema's `outbox_limits`, taken
/// under the limit's advisory lock).
#[test]
#[cfg(feature = "postgres")]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn two_relays_share_one_rate_limit_on_postgresql() -> TestResult {
    let Some(schema) = common::pg::Schema::fresh() else {
        return Ok(());
    };
    let store = sqlite_outbox::PostgresStore::builder(&schema.url)
        .schema(&schema.name)
        .build()?;
    for i in 0..16 {
        store.enqueue(NewEvent::new("t", json!(i)))?;
    }
    two_relays_paced(
        std::path::Path::new(&schema.url),
        &["--schema", &schema.name],
    )?;
    let events = store.list(&sqlite_outbox::ListFilter {
        limit: 100,
        ..Default::default()
    })?;
    assert_eq!(events.len(), 16);
    assert!(
        events
            .iter()
            .all(|e| (e.status, e.attempts) == (Status::Done, 1)),
        "{events:?}"
    );
    Ok(())
}

#[test]
fn a_concurrency_limit_holds_at_the_server() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    for i in 0..8 {
        store.enqueue(NewEvent::new("slow", json!(i)))?;
        store.enqueue(NewEvent::new("fast", json!(i)))?;
    }
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, m) = (now.clone(), most.clone());
    let server = Server::answering("127.0.0.1:0", move |seen| {
        if seen.body.contains("\"slow\"") {
            let at_once = n.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(at_once, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(40));
            n.fetch_sub(1, Ordering::SeqCst);
        }
        (200, vec![], b"ok".to_vec())
    })?;
    let out = relay(
        &db,
        &[
            "--http",
            &server.url,
            "--workers",
            "6",
            "--concurrency",
            "slow=2",
            "--drain",
        ],
    )?
    .wait_with_output()?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(most.load(Ordering::SeqCst), 2);
    one_attempt_each(&store, 16)
}

#[test]
fn bad_limits_are_usage_errors() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    SqliteStore::open(&db)?;
    for (args, says) in [
        (vec!["--rate", "ten/s"], "N/INTERVAL"),
        (vec!["--rate", "10/fortnight"], "N/INTERVAL"),
        (vec!["--rate", "0/s"], "N/INTERVAL"),
        (vec!["--concurrency", "t"], "TYPE=N"),
        (vec!["--concurrency", "t=0"], "TYPE=N"),
        (vec!["--type", "a", "--concurrency", "b=1"], "no handler"),
    ] {
        let mut full = vec!["--http", "http://127.0.0.1:9/", "--drain"];
        full.extend(args.iter().copied());
        let out = relay(&db, &full)?.wait_with_output()?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    Ok(())
}
