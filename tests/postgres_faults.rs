//! Faults on PostgreSQL, in a test binary of its own (cargo runs test
//! binaries one at a time, so a restart cannot break another test's
//! connections): a server restart in the middle of a run, and worker
//! processes killed with SIGKILL while they share one table.
#![cfg(feature = "postgres")]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pg::Schema;
use common::TestResult;
use serde_json::json;
use sqlite_outbox::{Dispatcher, Event, NewEvent, Operator, PostgresStore, Status};

const WAIT: Duration = Duration::from_secs(30);

/// The tests here take turns: a restart would break the other's run.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn open(schema: &Schema) -> sqlite_outbox::Result<PostgresStore> {
    PostgresStore::builder(&schema.url)
        .schema(&schema.name)
        .build()
}

/// Waits until `done` events of `store` are done.
fn wait_done(store: &PostgresStore, done: u64) -> TestResult {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = store.stats()?.done;
        if n >= done {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {n} of {done} done").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `pg_ctl restart` while a dispatcher delivers: every event is still
/// delivered, and each exactly once to a handler that finished it.
#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn a_server_restart_loses_nothing() -> TestResult {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let Ok(dir) = std::env::var("OUTBOX_TEST_POSTGRES_DIR") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but OUTBOX_TEST_POSTGRES_DIR is not set"
        );
        println!("SKIPPED: set OUTBOX_TEST_POSTGRES_DIR (scripts/postgres.sh start does) to restart the server");
        return Ok(());
    };
    let store = open(&schema)?;
    let seen: Arc<Mutex<Vec<i64>>> = Arc::default();
    let dispatcher = {
        let seen = seen.clone();
        Dispatcher::builder(store.clone())
            .workers(2)
            .poll_interval(Duration::from_millis(200))
            .handle("t", move |e: &Event| {
                std::thread::sleep(Duration::from_millis(2));
                if let Ok(mut seen) = seen.lock() {
                    seen.push(e.payload["i"].as_i64().unwrap_or(-1));
                }
                Ok(())
            })
            .start()?
    };
    let enqueue = |i: i64| -> TestResult {
        // An app retries an enqueue that failed on a dropped connection;
        // the idempotency key makes the retry safe.
        let deadline = Instant::now() + WAIT;
        loop {
            match store
                .enqueue(NewEvent::new("t", json!({"i": i})).with_idempotency_key(format!("e{i}")))
            {
                Ok(_) => return Ok(()),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    for i in 0..100 {
        enqueue(i)?;
    }
    let restarted = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres.sh"))
        .args(["restart", &dir])
        .status()?;
    assert!(restarted.success(), "pg_ctl restart failed");
    for i in 100..200 {
        enqueue(i)?;
    }
    wait_done(&store, 200)?;
    let report = dispatcher.shutdown(Duration::from_secs(10));
    let seen = seen.lock().map_err(|e| e.to_string())?;
    let distinct: HashSet<i64> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), 200, "every event handled");
    let events = store.list(&sqlite_outbox::ListFilter {
        limit: usize::MAX,
        ..Default::default()
    })?;
    assert!(events.iter().all(|e| e.status == Status::Done));
    // A lease is only reported lost when an outcome's write was cut off by
    // the restart and written again: the first write may have committed
    // before the connection dropped, and the second then finds the event
    // finished. Each such report follows a store error; no lease ran out.
    assert!(
        report.metrics.lease_lost <= report.metrics.store_errors,
        "{report:?}"
    );
    Ok(())
}

/// Worker processes (each its own pool) share one table and are killed
/// with SIGKILL at random: every event ends done, no (event, attempt) is
/// claimed twice, no outcome is accepted after its lease moved on, and
/// events of the killed were claimed again. The same checker as the
/// SQLite process tests reads their journals.
#[cfg(feature = "torture")]
#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn killed_worker_processes_lose_nothing() -> TestResult {
    use std::process::{Command, Stdio};

    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let store = open(&schema)?;
    let n = 600;
    let mut expected = HashSet::new();
    for start in (0..n).step_by(200) {
        let batch = (start..start + 200)
            .map(|i| NewEvent::new("t", json!({"seq": i})))
            .collect();
        expected.extend(
            store
                .enqueue_batch(batch)?
                .into_iter()
                .map(|e| e.id.to_string()),
        );
    }
    let dir = tempfile::tempdir()?;
    let lease_ms = 500;
    let spawn = |k: usize| {
        Command::new(env!("CARGO_BIN_EXE_outbox-torture"))
            .args([
                "work",
                "--db",
                &schema.url,
                "--schema",
                &schema.name,
                "--journal",
            ])
            .arg(dir.path().join(format!("j{k}")))
            .args(["--threads", "3", "--lease-ms", &lease_ms.to_string()])
            .args([
                "--handler-ms",
                "0..10",
                "--fail-pct",
                "5",
                "--exit-when-idle",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
    };
    let mut workers = common::Reaper::default();
    let mut started = 0;
    for _ in 0..3 {
        workers.0.push(spawn(started)?);
        started += 1;
    }
    for kill in 0..4 {
        std::thread::sleep(Duration::from_millis(300));
        let victim = kill % workers.0.len();
        workers.0[victim].kill()?;
        workers.0[victim].wait()?;
        workers.0[victim] = spawn(started)?;
        started += 1;
    }
    workers.wait_all(Duration::from_secs(120))?;
    let journals: Vec<_> = (0..started)
        .map(|k| dir.path().join(format!("j{k}")))
        .collect();
    let entries = common::journal::read(&journals)?;
    let done: HashSet<String> = store
        .list(&sqlite_outbox::ListFilter {
            status: Some(Status::Done),
            limit: usize::MAX,
            ..Default::default()
        })?
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    let report = common::journal::check(&entries, &expected, &done, lease_ms * 1_000_000);
    println!("{report:?}");
    assert!(report.is_clean(), "{report:?}");
    assert!(report.redelivered >= 1, "the kills missed: {report:?}");
    Ok(())
}
