//! Several processes on one file, and processes killed mid-flight: the
//! quick tier of the reliability plan (T1, T2, T16 and two dispatching
//! processes). Needs the `torture` feature for the driver binary.
#![cfg(feature = "torture")]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::journal::{self, Entry};
use common::TestResult;
use rusqlite::Connection;
use serde_json::json;
use sqlite_outbox::{NewEvent, SqliteStore, Status, Store};

const DRIVER: &str = env!("CARGO_BIN_EXE_outbox-torture");

fn driver(args: &[&str]) -> Command {
    let mut c = Command::new(DRIVER);
    c.args(args).stdin(Stdio::null());
    c
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A seed per run, printed so a failure can be replayed.
fn seed() -> u64 {
    let seed = std::env::var("OUTBOX_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp_subsec_nanos() as u64 | 1);
    println!("OUTBOX_SEED={seed}");
    seed
}

struct Rng(u64);
impl Rng {
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo + 1)
    }
}

fn wait_all(children: Vec<Child>, limit: Duration) -> TestResult {
    let deadline = Instant::now() + limit;
    for mut child in children {
        loop {
            if let Some(status) = child.try_wait()? {
                assert!(status.success(), "child failed: {status}");
                break;
            }
            if Instant::now() > deadline {
                child.kill().ok();
                return Err("child did not finish in time".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

fn done_ids(store: &SqliteStore) -> sqlite_outbox::Result<HashSet<String>> {
    Ok(store
        .list(&sqlite_outbox::ListFilter {
            status: Some(Status::Done),
            limit: usize::MAX,
            ..Default::default()
        })?
        .into_iter()
        .map(|e| e.id.to_string())
        .collect())
}

fn integrity_ok(path: &Path) -> rusqlite::Result<bool> {
    let conn = Connection::open(path)?;
    let r: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    Ok(r == "ok")
}

#[test]
fn two_processes_dispatch_one_file_without_running_an_event_twice() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let events = store.create_batch(
        (0..1000)
            .map(|i| NewEvent::new("t", json!({"seq": i})))
            .collect(),
    )?;
    let journals: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("j{i}"))).collect();
    let children = journals
        .iter()
        .map(|j| {
            driver(&[
                "dispatch",
                "--db",
                &s(&db),
                "--journal",
                &s(j),
                "--workers",
                "3",
                "--handler-ms",
                "1..3",
                "--exit-when-idle",
            ])
            .stdout(Stdio::null())
            .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;
    wait_all(children, Duration::from_secs(60))?;
    let entries = journal::read(&journals)?;
    let mut started = HashSet::new();
    for e in &entries {
        if let Entry::Start { id, .. } = e {
            assert!(started.insert(id.clone()), "event {id} ran twice");
        }
    }
    let expected: HashSet<String> = events.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(started, expected);
    assert_eq!(done_ids(&store)?, expected);
    let per_journal: Vec<usize> = journals
        .iter()
        .map(|j| journal::read(&[j]).map(|v| v.len()).unwrap_or(0))
        .collect();
    println!("handled per process: {per_journal:?}");
    Ok(())
}

/// T16: a process that starts later never takes over a live lease, and
/// takes over an expired one only after it expired.
#[test]
fn a_new_process_does_not_steal_live_leases() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let held = store.create(NewEvent::new("t", json!({"seq": 0})))?;
    let claimed = store.claim(1, Duration::from_secs(10), None)?;
    let lease = claimed.first().and_then(|e| e.lease()).ok_or("claim")?;
    let crashed = store.create(NewEvent::new("t", json!({"seq": 1})))?;
    let crashed_claim = store.claim(1, Duration::from_millis(1500), None)?;
    let crashed_at = crashed_claim
        .first()
        .and_then(|e| e.locked_at)
        .ok_or("claim")?;
    let others = store.create_batch(
        (2..22)
            .map(|i| NewEvent::new("t", json!({"seq": i})))
            .collect(),
    )?;

    let j = dir.path().join("j");
    let child = driver(&[
        "dispatch",
        "--db",
        &s(&db),
        "--journal",
        &s(&j),
        "--max-secs",
        "3",
    ])
    .stdout(Stdio::null())
    .spawn()?;
    wait_all(vec![child], Duration::from_secs(30))?;
    let starts: Vec<(String, i64)> = journal::read(&[&j])?
        .into_iter()
        .filter_map(|e| match e {
            Entry::Start { id, at, .. } => Some((id, at)),
            _ => None,
        })
        .collect();
    assert!(
        !starts.iter().any(|(id, _)| *id == held.id.to_string()),
        "a live lease was stolen"
    );
    let (_, taken_at) = starts
        .iter()
        .find(|(id, _)| *id == crashed.id.to_string())
        .ok_or("the expired lease was never taken over")?;
    let expiry = crashed_at.timestamp_nanos_opt().ok_or("time")? + 1_500_000_000;
    assert!(
        *taken_at >= expiry - 100_000_000,
        "taken over {} ms early",
        (expiry - taken_at) / 1_000_000
    );
    for e in &others {
        assert!(starts.iter().any(|(id, _)| *id == e.id.to_string()));
    }
    store.complete(&lease)?;
    assert_eq!(
        store.find_by_id(held.id)?.map(|e| (e.status, e.attempts)),
        Some((Status::Done, 1))
    );
    Ok(())
}

/// T1 (quick): a producer killed at random keeps every acknowledged batch
/// whole, and leaves no partial batch.
#[test]
fn killed_producers_leave_whole_batches() -> TestResult {
    producer_kill_cycles(5)
}

/// Runs T1 for `cycles` kill cycles.
pub fn producer_kill_cycles(cycles: usize) -> TestResult {
    let mut rng = Rng(seed());
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    SqliteStore::open(&db)?;
    let mut next = 0u64;
    let mut acked: Vec<(u64, u64)> = Vec::new();
    for cycle in 0..cycles {
        let out = dir.path().join(format!("out{cycle}"));
        let mut child = driver(&[
            "enqueue",
            "--db",
            &s(&db),
            "--producer",
            "1",
            "--from",
            &next.to_string(),
            "--count",
            "1000000",
            "--batch",
            "50",
        ])
        .stdout(std::fs::File::create(&out)?)
        .spawn()?;
        std::thread::sleep(Duration::from_millis(rng.between(50, 400)));
        child.kill()?;
        child.wait()?;
        for line in std::fs::read_to_string(&out)?.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() == 4 && f[0] == "ok" {
                acked.push((f[2].parse()?, f[3].parse()?));
            }
        }
        assert!(integrity_ok(&db)?, "cycle {cycle}: integrity");
        let conn = Connection::open(&db)?;
        let batches: Vec<(u64, u64)> = conn
            .prepare("SELECT first_seq, last_seq FROM biz ORDER BY first_seq")?
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<_, _>>()?;
        let seqs: HashSet<u64> = conn
            .prepare("SELECT json_extract(payload, '$.seq') FROM outbox_events")?
            .query_map([], |r| Ok(r.get::<_, i64>(0)? as u64))?
            .collect::<Result<_, _>>()?;
        let mut covered = 0;
        for (first, last) in &batches {
            for n in *first..=*last {
                assert!(
                    seqs.contains(&n),
                    "cycle {cycle}: batch {first}..{last} is partial"
                );
            }
            covered += last - first + 1;
        }
        assert_eq!(
            covered as usize,
            seqs.len(),
            "cycle {cycle}: events without their business row"
        );
        for (first, last) in &acked {
            assert!(
                batches.contains(&(*first, *last)),
                "cycle {cycle}: acknowledged batch {first}..{last} lost"
            );
        }
        next = batches.last().map(|(_, l)| l + 1).unwrap_or(0);
    }
    println!(
        "cycles {cycles}, acknowledged batches {}, events {next}",
        acked.len()
    );
    assert!(!acked.is_empty());
    Ok(())
}

/// T2 (quick): workers killed at random; every event still ends done, no
/// ack is accepted after its lease moved on, and reclaim really happened.
#[test]
fn killed_workers_lose_nothing() -> TestResult {
    let r = worker_kill_run(1_000, 5, 0)?;
    assert!(
        r.redelivered >= 1,
        "no event was redelivered: the kills missed; {r:?}"
    );
    Ok(())
}

/// Runs T2 and returns the checker's report.
pub fn worker_kill_run(
    events: usize,
    kills: usize,
    overrun_pct: u64,
) -> Result<journal::Report, Box<dyn std::error::Error>> {
    let mut rng = Rng(seed());
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let created = store.create_batch(
        (0..events)
            .map(|i| NewEvent::new("t", json!({"seq": i})))
            .collect(),
    )?;
    let lease_ms = 500;
    let spawn = |n: usize, seed: u64| -> std::io::Result<Child> {
        driver(&[
            "work",
            "--db",
            &s(&db),
            "--journal",
            &s(&dir.path().join(format!("j{n}"))),
            "--threads",
            "4",
            "--lease-ms",
            &lease_ms.to_string(),
            "--handler-ms",
            "0..10",
            "--overrun-pct",
            &overrun_pct.to_string(),
            "--fail-pct",
            "5",
            "--seed",
            &seed.to_string(),
            "--exit-when-idle",
        ])
        .stdout(Stdio::null())
        .spawn()
    };
    let mut journal_no = 0;
    let mut workers: Vec<Child> = Vec::new();
    for _ in 0..3 {
        workers.push(spawn(journal_no, rng.between(1, u64::MAX - 1))?);
        journal_no += 1;
    }
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.between(200, 800)));
        let victim = rng.between(0, workers.len() as u64 - 1) as usize;
        workers[victim].kill()?;
        workers[victim].wait()?;
        workers[victim] = spawn(journal_no, rng.between(1, u64::MAX - 1))?;
        journal_no += 1;
    }
    wait_all(workers, Duration::from_secs(120))?;
    let journals: Vec<PathBuf> = (0..journal_no)
        .map(|n| dir.path().join(format!("j{n}")))
        .collect();
    let entries = journal::read(&journals)?;
    let expected: HashSet<String> = created.iter().map(|e| e.id.to_string()).collect();
    let report = journal::check(
        &entries,
        &expected,
        &done_ids(&store)?,
        lease_ms * 1_000_000,
    );
    println!("events {events}, kills {kills}, overrun {overrun_pct}%: {report:?}");
    assert!(integrity_ok(&db)?);
    assert!(report.is_clean(), "{report:?}");
    for e in store.list(&sqlite_outbox::ListFilter {
        limit: usize::MAX,
        ..Default::default()
    })? {
        assert!(e.attempts <= e.max_attempts);
    }
    Ok(report)
}
