//! Several processes on one file, and processes killed mid-flight: the
//! quick tier of the reliability plan (T1, T2, T16 and two dispatching
//! processes). Needs the `torture` feature for the driver binary.
#![cfg(feature = "torture")]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::journal::{self, Entry};
use common::{shim, Reaper, TestResult};
use rusqlite::Connection;
use serde_json::json;
use sqlite_outbox::{NewEvent, Operator, SqliteStore, Status, Store};

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

/// The guard every process test uses: a timeout kills and reaps every
/// child, not only the one that was late.
#[test]
fn a_timed_out_process_test_leaves_no_process_behind() -> TestResult {
    let children = (0..3)
        .map(|_| Command::new("sleep").arg("30").spawn())
        .collect::<Result<Vec<_>, _>>()?;
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let err = Reaper(children)
        .wait_all(Duration::from_millis(200))
        .expect_err("a timeout");
    assert!(err.to_string().contains("in time"), "{err}");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} is still running"
        );
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

/// The producers' business rows: one (first, last) seq range per committed
/// batch, in order. Empty when even the table's creation was lost.
fn committed_batches(conn: &Connection) -> rusqlite::Result<Vec<(u64, u64)>> {
    let has_biz: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_schema WHERE name = 'biz'",
        [],
        |row| row.get(0),
    )?;
    if !has_biz {
        return Ok(Vec::new());
    }
    conn.prepare("SELECT first_seq, last_seq FROM biz ORDER BY first_seq")?
        .query_map([], |row| {
            Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64))
        })?
        .collect()
}

/// A fresh outbox file in a temporary directory, holding `n` pending events
/// of type `t` with payload `{"seq": i}`; also returns their ids.
struct Fresh {
    dir: tempfile::TempDir,
    db: PathBuf,
    store: SqliteStore,
    ids: HashSet<String>,
}

fn fresh_outbox(n: usize) -> Result<Fresh, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let mut ids = HashSet::new();
    for start in (0..n).step_by(1000) {
        let batch = (start..n.min(start + 1000))
            .map(|i| NewEvent::new("t", json!({"seq": i})))
            .collect();
        ids.extend(
            store
                .enqueue_batch(batch)?
                .into_iter()
                .map(|e| e.id.to_string()),
        );
    }
    Ok(Fresh {
        dir,
        db,
        store,
        ids,
    })
}

fn integrity_ok(path: &Path) -> rusqlite::Result<bool> {
    let conn = Connection::open(path)?;
    let r: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    Ok(r == "ok")
}

#[test]
fn two_processes_dispatch_one_file_without_running_an_event_twice() -> TestResult {
    let Fresh {
        dir,
        db,
        store,
        ids: expected,
    } = fresh_outbox(1000)?;
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
    Reaper(children).wait_all(Duration::from_secs(60))?;
    let entries = journal::read(&journals)?;
    let mut started = HashSet::new();
    for e in &entries {
        if let Entry::Start { id, .. } = e {
            assert!(started.insert(id.clone()), "event {id} ran twice");
        }
    }
    assert_eq!(started, expected);
    assert_eq!(done_ids(&store)?, expected);
    let per_journal: Vec<usize> = journals
        .iter()
        .map(|j| journal::read(&[j]).map(|v| v.len()).unwrap_or(0))
        .collect();
    println!("handled per process: {per_journal:?}");
    Ok(())
}

/// A dispatcher killed (`SIGKILL`) while its destination is unreachable
/// loses nothing and spends nothing: the next process, with the
/// destination back, delivers every event, each on its first counted
/// attempt (the few in hand at the kill on their second).
#[test]
fn a_dispatcher_killed_while_its_destination_is_down_loses_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let events = store.enqueue_batch(
        (0..200)
            .map(|i| NewEvent::new("t", json!({"seq": i})).with_ordering_key(format!("k{}", i % 7)))
            .collect(),
    )?;
    let expected: HashSet<String> = events.iter().map(|e| e.id.to_string()).collect();
    let marker = dir.path().join("down");
    std::fs::write(&marker, b"")?;
    let first = dir.path().join("j1");
    let mut child = Reaper::one(
        driver(&[
            "dispatch",
            "--db",
            &s(&db),
            "--journal",
            &s(&first),
            "--lease-ms",
            "1000",
            "--unreachable-while",
            &s(&marker),
            "--max-secs",
            "60",
        ])
        .stdout(Stdio::null())
        .spawn()?,
    );
    // Kill it once it has found the destination down and given its events
    // back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let said = std::fs::read_to_string(&first).unwrap_or_default();
        let given_back = store.stats()?.processing == 0;
        if said.contains("hunavail") && given_back {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never found the destination down"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.child().kill()?;
    child.child().wait()?;
    let waiting = store.list(&sqlite_outbox::ListFilter {
        limit: usize::MAX,
        ..Default::default()
    })?;
    assert_eq!(waiting.len(), 200);
    assert!(
        waiting
            .iter()
            .all(|e| e.status == Status::Pending && e.attempts == 0),
        "nothing spent while down"
    );
    std::fs::remove_file(&marker)?;
    let second = dir.path().join("j2");
    Reaper::one(
        driver(&[
            "dispatch",
            "--db",
            &s(&db),
            "--journal",
            &s(&second),
            "--exit-when-idle",
        ])
        .stdout(Stdio::null())
        .spawn()?,
    )
    .wait_all(Duration::from_secs(60))?;
    assert_eq!(done_ids(&store)?, expected, "every event delivered");
    let done = store.list(&sqlite_outbox::ListFilter {
        limit: usize::MAX,
        ..Default::default()
    })?;
    assert!(
        done.iter().all(|e| e.attempts == 1),
        "one counted attempt each"
    );
    Ok(())
}

/// T16: a process that starts later never takes over a live lease, and
/// takes over an expired one only after it expired.
#[test]
fn a_new_process_does_not_steal_live_leases() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let held = store.enqueue(NewEvent::new("t", json!({"seq": 0})))?;
    let claimed = store.claim(1, Duration::from_secs(60), None)?;
    let lease = claimed.first().and_then(|e| e.lease()).ok_or("claim")?;
    let held_until = claimed
        .first()
        .and_then(|e| e.locked_until)
        .and_then(|t| t.timestamp_nanos_opt())
        .ok_or("lease time")?;
    let crashed = store.enqueue(NewEvent::new("t", json!({"seq": 1})))?;
    let crashed_claim = store.claim(1, Duration::from_millis(1500), None)?;
    let crashed_at = crashed_claim
        .first()
        .and_then(|e| e.locked_at)
        .ok_or("claim")?;
    let others = store.enqueue_batch(
        (2..22)
            .map(|i| NewEvent::new("t", json!({"seq": i})))
            .collect(),
    )?;

    let j = dir.path().join("j");
    let mut child = Reaper::one(
        driver(&[
            "dispatch",
            "--db",
            &s(&db),
            "--journal",
            &s(&j),
            "--max-secs",
            "60",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr"))?)
        .spawn()?,
    );
    // Watch the journal until the expired lease was taken over and the other
    // events ran (or give up), then stop the child.
    let deadline = Instant::now() + Duration::from_secs(30);
    let wanted = others.len() + 1;
    while Instant::now() < deadline {
        let started = journal::read(&[&j])?
            .iter()
            .filter(|e| matches!(e, Entry::Start { .. }))
            .count();
        if started >= wanted {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let exited_early = child.child().try_wait()?;
    child.child().kill()?;
    child.child().wait()?;
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    assert!(
        exited_early.is_none(),
        "the child stopped early ({exited_early:?}): {stderr}"
    );
    let starts: Vec<(String, i64)> = journal::read(&[&j])?
        .into_iter()
        .filter_map(|e| match e {
            Entry::Start { id, at, .. } => Some((id, at)),
            _ => None,
        })
        .collect();
    assert!(
        !starts
            .iter()
            .any(|(id, at)| *id == held.id.to_string() && *at < held_until),
        "a live lease was stolen"
    );
    let (_, taken_at) = starts
        .iter()
        .find(|(id, _)| *id == crashed.id.to_string())
        .ok_or_else(|| {
            let state = store
                .find(crashed.id)
                .map(|e| format!("{e:?}"))
                .unwrap_or_default();
            format!(
                "the expired lease was never taken over; {} starts; event now {state}; child stderr: {stderr}",
                starts.len()
            )
        })?;
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
        store.find(held.id)?.map(|e| (e.status, e.attempts)),
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
        let mut child = Reaper::one(
            driver(&[
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
            .spawn()?,
        );
        std::thread::sleep(Duration::from_millis(rng.between(50, 400)));
        child.child().kill()?;
        child.child().wait()?;
        for line in std::fs::read_to_string(&out)?.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() == 4 && f[0] == "ok" {
                acked.push((f[2].parse()?, f[3].parse()?));
            }
        }
        assert!(integrity_ok(&db)?, "cycle {cycle}: integrity");
        let conn = Connection::open(&db)?;
        let batches = committed_batches(&conn)?;
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
    let Fresh {
        dir,
        db,
        store,
        ids: expected,
    } = fresh_outbox(events)?;
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
    let mut workers = Reaper::default();
    for _ in 0..3 {
        workers
            .0
            .push(spawn(journal_no, rng.between(1, u64::MAX - 1))?);
        journal_no += 1;
    }
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.between(200, 800)));
        let victim = rng.between(0, workers.0.len() as u64 - 1) as usize;
        workers.0[victim].kill()?;
        workers.0[victim].wait()?;
        workers.0[victim] = spawn(journal_no, rng.between(1, u64::MAX - 1))?;
        journal_no += 1;
    }
    workers.wait_all(Duration::from_secs(120))?;
    let journals: Vec<PathBuf> = (0..journal_no)
        .map(|n| dir.path().join(format!("j{n}")))
        .collect();
    let entries = journal::read(&journals)?;
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

/// T14: six processes open a fresh file at the same moment and each
/// enqueues one event: all succeed and the schema is created once.
#[test]
fn six_processes_open_a_fresh_file_at_once() -> TestResult {
    for round in 0..10 {
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("fresh.db");
        let children = (0..6)
            .map(|p| {
                driver(&[
                    "enqueue",
                    "--db",
                    &s(&db),
                    "--producer",
                    &p.to_string(),
                    "--from",
                    "0",
                    "--count",
                    "1",
                    "--batch",
                    "1",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
            })
            .collect::<Result<Vec<_>, _>>()?;
        for child in children {
            let out = child.wait_with_output()?;
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                String::from_utf8_lossy(&out.stdout).starts_with("ok "),
                "round {round}"
            );
        }
        let store = SqliteStore::open(&db)?;
        assert_eq!(store.stats()?.total(), 6, "round {round}");
        // The header belongs to the app: nothing was stamped there.
        assert_eq!(store.pragma("application_id")?, "0");
        assert_eq!(store.pragma("user_version")?, "0");
        let version: i64 = rusqlite::Connection::open(&db)?.query_row(
            "SELECT value FROM outbox_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )?;
        assert_eq!(version, sqlite_outbox::SCHEMA_VERSION, "round {round}");
    }
    Ok(())
}

// ---- the long tier (run by .ci/run with --ignored) ----------------------

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

#[test]
#[ignore = "long tier: run with --ignored"]
fn t1_producer_kills_20_cycles() -> TestResult {
    producer_kill_cycles(20)
}

#[test]
#[ignore = "long tier: run with --ignored"]
fn t2_worker_kills_5000_events() -> TestResult {
    let r = worker_kill_run(5_000, 24, 0)?;
    assert!(r.redelivered >= 1, "{r:?}");
    Ok(())
}

/// T3b: a fifth of the handlers overrun their lease; their late acks are
/// refused, and none is accepted.
#[test]
#[ignore = "long tier: run with --ignored"]
fn t3b_overrunning_handlers_are_fenced() -> TestResult {
    let r = worker_kill_run(1_500, 3, 20)?;
    assert!(
        r.fenced >= 10,
        "the overruns did not produce fenced acks: {r:?}"
    );
    Ok(())
}

/// T3c: the checker has teeth. Workers that acknowledge with a guard on
/// the status alone (no lease token) get late acks accepted, and the
/// checker reports them.
#[test]
#[ignore = "long tier: run with --ignored"]
fn t3c_the_checker_catches_a_weak_ack_guard() -> TestResult {
    let Fresh {
        dir,
        db,
        store,
        ids: expected,
    } = fresh_outbox(600)?;
    let journals: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("j{i}"))).collect();
    let children = journals
        .iter()
        .enumerate()
        .map(|(i, j)| {
            driver(&[
                "work",
                "--db",
                &s(&db),
                "--journal",
                &s(j),
                "--threads",
                "4",
                "--lease-ms",
                "300",
                "--handler-ms",
                "0..5",
                "--overrun-pct",
                "20",
                "--seed",
                &(i + 7).to_string(),
                "--exit-when-idle",
                "--weak-ack",
            ])
            .stdout(Stdio::null())
            .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;
    Reaper(children).wait_all(Duration::from_secs(120))?;
    let r = journal::check(
        &journal::read(&journals)?,
        &expected,
        &done_ids(&store)?,
        300_000_000,
    );
    println!("weak guard: {r:?}");
    assert!(
        r.late_ack_accepted + r.multi_done > 0,
        "the checker missed a weak guard: {r:?}"
    );
    Ok(())
}

/// T5: 4 processes × 8 threads on 20,000 events with long leases (ten
/// minutes: a slow or busy machine must not see one run out): every event
/// is claimed exactly once and no busy error reaches a worker.
#[test]
#[ignore = "long tier: run with --ignored"]
fn t5_contention_claims_each_event_once() -> TestResult {
    let Fresh { dir, db, store, .. } = fresh_outbox(20_000)?;
    let journals: Vec<PathBuf> = (0..4).map(|i| dir.path().join(format!("j{i}"))).collect();
    let started = Instant::now();
    let children = journals
        .iter()
        .map(|j| {
            driver(&[
                "work",
                "--db",
                &s(&db),
                "--journal",
                &s(j),
                "--threads",
                "8",
                "--lease-ms",
                "600000",
                "--exit-when-idle",
            ])
            .stdout(Stdio::piped())
            .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut busy = 0;
    for child in children {
        let out = child.wait_with_output()?;
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        busy += text
            .trim()
            .strip_prefix("busy_errors ")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
    }
    let secs = started.elapsed().as_secs_f64();
    let claims: Vec<(String, u32)> = journal::read(&journals)?
        .into_iter()
        .filter_map(|e| match e {
            Entry::Claim { id, attempt, .. } => Some((id, attempt)),
            _ => None,
        })
        .collect();
    println!(
        "T5: 20000 events, 32 threads in 4 processes, {secs:.1} s ({:.0} ev/s), busy errors {busy}",
        20_000.0 / secs
    );
    assert_eq!(claims.len(), 20_000);
    assert!(claims.iter().all(|(_, a)| *a == 1));
    assert_eq!(
        claims
            .iter()
            .map(|(id, _)| id)
            .collect::<HashSet<_>>()
            .len(),
        20_000
    );
    assert_eq!(busy, 0, "busy errors reached the workers");
    assert_eq!(done_ids(&store)?.len(), 20_000);
    Ok(())
}

/// T6: power cuts simulated by reverting unsynced writes. At FULL no
/// acknowledged enqueue or completion is ever lost; the same run at NORMAL
/// must lose some (proving the simulator bites).
#[test]
#[ignore = "long tier: run with --ignored"]
fn t6_power_loss_loses_nothing_acknowledged_at_full() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let Some(shim) = shim("crashshim", tmp.path()) else {
        return Ok(());
    };
    let full = power_cycles(&shim, "full", 50)?;
    println!("T6 FULL: {full:?}");
    assert_eq!(
        (full.lost_batches, full.reverted_done, full.partial),
        (0, 0, 0),
        "{full:?}"
    );
    assert_eq!(full.integrity_failures, 0);
    let normal = power_cycles(&shim, "normal", 25)?;
    println!("T6 NORMAL (control): {normal:?}");
    assert_eq!(normal.integrity_failures, 0);
    assert!(
        normal.lost_batches + normal.reverted_done > 0,
        "the simulator did not bite: {normal:?}"
    );
    Ok(())
}

#[derive(Debug, Default)]
struct PowerReport {
    cycles: usize,
    acked_batches: usize,
    acked_done: usize,
    lost_batches: usize,
    reverted_done: usize,
    partial: usize,
    integrity_failures: usize,
}

fn power_cycles(
    shim: &Path,
    sync: &str,
    cycles: usize,
) -> Result<PowerReport, Box<dyn std::error::Error>> {
    let mut rng = Rng(seed());
    let dir = tempfile::tempdir()?;
    let dbdir = dir.path().join("db");
    std::fs::create_dir(&dbdir)?;
    let db = dbdir.join("o.db");
    SqliteStore::open(&db)?;
    let mut r = PowerReport::default();
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut next = 0u64;
    for cycle in 0..cycles {
        let trigger = if cycle % 2 == 0 && sync == "full" {
            ("CRASH_AT_SYNC", rng.between(3, 150))
        } else {
            ("CRASH_AT_WRITE", rng.between(10, 3000))
        };
        let keep = [0, 30, 70][cycle % 3];
        let out = driver(&[
            "power",
            "--db",
            &s(&db),
            "--producer",
            "1",
            "--from",
            &next.to_string(),
            "--sync",
            sync,
        ])
        .env("LD_PRELOAD", shim)
        .env("CRASH_DIR", format!("{}/", dbdir.display()))
        .env(trigger.0, trigger.1.to_string())
        .env("CRASH_KEEP_PCT", keep.to_string())
        .env("CRASH_SEED", cycle.to_string())
        .output()?;
        assert_eq!(
            out.status.code(),
            Some(99),
            "cycle {cycle} ({trigger:?}): the child did not crash: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.split(' ').collect();
            match f.as_slice() {
                ["ok", _, first, last] => acked.push((first.parse()?, last.parse()?)),
                ["done", id] => {
                    done.insert((*id).to_owned());
                }
                _ => {}
            }
        }
        if !integrity_ok(&db)? {
            r.integrity_failures += 1;
        }
        let conn = Connection::open(&db)?;
        // At NORMAL even the business table's creation may be undone.
        let batches: HashSet<(u64, u64)> = committed_batches(&conn)?.into_iter().collect();
        let mut seqs: HashMap<u64, (String, String)> = HashMap::new();
        let mut stmt =
            conn.prepare("SELECT json_extract(payload, '$.seq'), id, status FROM outbox_events")?;
        for row in stmt.query_map([], |row| {
            Ok((
                row.get::<_, i64>(0)? as u64,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
            ))
        })? {
            let (seq, id, status) = row?;
            seqs.insert(seq, (id, status));
        }
        for (first, last) in &batches {
            if (*first..=*last).any(|n| !seqs.contains_key(&n)) {
                r.partial += 1;
            }
        }
        r.lost_batches = acked.iter().filter(|b| !batches.contains(b)).count();
        let done_now: HashSet<&String> = seqs
            .values()
            .filter(|(_, st)| st == "done")
            .map(|(id, _)| id)
            .collect();
        r.reverted_done = done.iter().filter(|id| !done_now.contains(id)).count();
        next = batches
            .iter()
            .map(|(_, l)| l + 1)
            .max()
            .unwrap_or(0)
            .max(next)
            + 1_000;
        r.cycles += 1;
    }
    r.acked_batches = acked.len();
    r.acked_done = done.len();
    // Final drain without faults: every acknowledged event ends done. The
    // crashed child's leases are still live now, so drain as of a time
    // after they ran out.
    if sync == "full" {
        let later = chrono::Utc::now() + chrono::Duration::seconds(300);
        let store = SqliteStore::builder(&db)
            .clock(std::sync::Arc::new(sqlite_outbox::ManualClock::at(later)))
            .build()?;
        loop {
            let claimed = store.claim(500, Duration::from_secs(30), None)?;
            if claimed.is_empty() {
                break;
            }
            for e in claimed {
                store.complete(&e.lease().ok_or("lease")?)?;
            }
        }
        let stats = store.stats()?;
        assert_eq!(stats.pending + stats.processing, 0, "drain left {stats:?}");
    }
    Ok(r)
}

/// T7b: a real file system fills up. Writes fail with a disk-full error,
/// nothing committed is lost, and the same store resumes once space is
/// freed.
#[test]
#[ignore = "long tier: run with --ignored"]
fn t7b_a_full_tmpfs_fails_cleanly_and_recovers() -> TestResult {
    if !is_root() {
        println!("SKIPPED: needs root to mount a tmpfs");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()?;
    if !mounted.success() {
        println!("SKIPPED: mount -t tmpfs failed");
        return Ok(());
    }
    let result = (|| -> TestResult {
        let filler = mnt.join("filler");
        std::fs::write(&filler, vec![0u8; 1_536 * 1024])?;
        let store = SqliteStore::open(mnt.join("o.db"))?;
        let mut committed = Vec::new();
        let err = loop {
            match store.enqueue(NewEvent::new("t", json!({"pad": "x".repeat(300)}))) {
                Ok(e) => committed.push(e.id),
                Err(e) => break e,
            }
            assert!(committed.len() < 100_000, "never filled up");
        };
        assert!(err.is_disk_full(), "{err:?}");
        println!("T7b: disk full after {} events", committed.len());
        std::fs::remove_file(&filler)?;
        // The same store, no reopen. A disk-full error is transient: the
        // store gives the WAL's space back, and a retry goes through.
        fn retry<T>(mut op: impl FnMut() -> sqlite_outbox::Result<T>) -> sqlite_outbox::Result<T> {
            match op() {
                Err(e) if e.is_disk_full() => op(),
                other => other,
            }
        }
        for i in 0..50 {
            retry(|| store.enqueue(NewEvent::new("t", json!({"after": i}))))?;
        }
        loop {
            let claimed = retry(|| store.claim(200, Duration::from_secs(30), None))?;
            if claimed.is_empty() {
                break;
            }
            let acks: Vec<sqlite_outbox::Ack> = claimed
                .iter()
                .filter_map(|e| e.lease())
                .map(sqlite_outbox::Ack::complete)
                .collect();
            for result in retry(|| store.settle(&acks))? {
                result?;
            }
        }
        for id in &committed {
            assert_eq!(store.find(*id)?.map(|e| e.status), Some(Status::Done));
        }
        store.verify()?;
        Ok(())
    })();
    let _ = Command::new("umount").arg(&mnt).status();
    result
}

/// T8: I/O errors on the WAL in windows during a load: every failure
/// surfaces as an error (never a false success), the producer resumes
/// after each window, and every acknowledged batch is there.
#[test]
#[ignore = "long tier: run with --ignored"]
fn t8_io_errors_surface_and_nothing_acknowledged_is_lost() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let Some(shim) = shim("faultshim", tmp.path()) else {
        return Ok(());
    };
    for op in ["write", "sync"] {
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("o.db");
        SqliteStore::open(&db)?;
        let arm = dir.path().join("ARM");
        let out_path = dir.path().join("out");
        let mut child = Reaper::one(
            driver(&[
                "enqueue",
                "--db",
                &s(&db),
                "--producer",
                "1",
                "--from",
                "0",
                "--count",
                "100000000",
                "--batch",
                "20",
            ])
            .env("LD_PRELOAD", &shim)
            .env("FAULT_OP", op)
            .env("FAULT_SUFFIX", "-wal")
            .env("FAULT_ERRNO", "5")
            .env("FAULT_ARMFILE", &arm)
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(Stdio::null())
            .spawn()?,
        );
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(200));
            std::fs::write(&arm, b"")?;
            std::thread::sleep(Duration::from_millis(200));
            std::fs::remove_file(&arm)?;
        }
        std::thread::sleep(Duration::from_millis(300));
        child.child().kill()?;
        child.child().wait()?;
        let text = std::fs::read_to_string(&out_path)?;
        let mut acked = Vec::new();
        let (mut errors, mut ok_after_error) = (0, 0);
        for line in text.lines() {
            let f: Vec<&str> = line.splitn(5, ' ').collect();
            match f.as_slice() {
                ["ok", _, a, b] => {
                    acked.push((a.parse::<u64>()?, b.parse::<u64>()?));
                    if errors > 0 {
                        ok_after_error += 1;
                    }
                }
                ["err", _, _, _, kind] => {
                    errors += 1;
                    assert!(
                        kind.starts_with("Io") || kind.starts_with("DiskFull"),
                        "unexpected error kind {kind}"
                    );
                }
                _ => {}
            }
        }
        assert!(integrity_ok(&db)?);
        let conn = Connection::open(&db)?;
        let batches: HashSet<(u64, u64)> = committed_batches(&conn)?.into_iter().collect();
        let lost = acked.iter().filter(|b| !batches.contains(b)).count();
        let recovered = batches.len().saturating_sub(acked.len());
        println!("T8 {op}: {} acknowledged, {errors} errors, {ok_after_error} ok after an error, lost {lost}, recovered {recovered}", acked.len());
        assert!(errors > 0, "no fault was injected");
        assert!(ok_after_error > 0, "the producer never resumed");
        assert_eq!(lost, 0);
    }
    Ok(())
}

/// T9c: an immutable file (chattr +i) can be read; writes fail with a
/// clear error; the file is unchanged.
#[test]
#[ignore = "long tier: run with --ignored"]
fn t9c_an_immutable_file_is_read_only() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    {
        let store = SqliteStore::open(&db)?;
        store.enqueue(NewEvent::new("t", json!(1)))?;
        Connection::open(&db)?.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    }
    let before = std::fs::read(&db)?;
    let locked = Command::new("chattr").arg("+i").arg(&db).status();
    if !matches!(locked, Ok(s) if s.success()) {
        println!("SKIPPED: chattr +i is not available here");
        return Ok(());
    }
    let result = (|| -> TestResult {
        let ro = SqliteStore::builder(&db).read_only(true).build()?;
        assert_eq!(ro.stats()?.pending, 1);
        match SqliteStore::open(&db) {
            Err(e) => println!("T9c: read-write open refused: {e}"),
            Ok(store) => {
                let err = store
                    .enqueue(NewEvent::new("t", json!(2)))
                    .expect_err("wrote to an immutable file");
                assert!(
                    matches!(
                        err.kind(),
                        sqlite_outbox::ErrorKind::ReadOnly | sqlite_outbox::ErrorKind::Io
                    ),
                    "{err:?}"
                );
            }
        }
        Ok(())
    })();
    let _ = Command::new("chattr").arg("-i").arg(&db).status();
    result?;
    assert!(std::fs::read(&db)? == before, "the immutable file changed");
    Ok(())
}

/// T15: a long reader lets the WAL grow; once it lets go, checkpoints and
/// the size limit bring the WAL back down while writes go on.
#[test]
#[ignore = "long tier: run with --ignored"]
fn t15_the_wal_shrinks_back_after_a_long_reader() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let wal = dir.path().join("o.db-wal");
    let store = SqliteStore::open(&db)?;
    let reader = Connection::open(&db)?;
    reader.execute_batch("BEGIN")?;
    let _: i64 = reader.query_row("SELECT count(*) FROM outbox_events", [], |r| r.get(0))?;
    let pad = "x".repeat(400);
    for i in 0..2_000 {
        store.enqueue_batch(
            (0..10)
                .map(|j| NewEvent::new("t", json!({"i": i, "j": j, "pad": pad})))
                .collect(),
        )?;
    }
    let grown = std::fs::metadata(&wal)?.len();
    reader.execute_batch("COMMIT")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut size = grown;
    while Instant::now() < deadline {
        store.enqueue(NewEvent::new("t", json!({"after": true})))?;
        size = std::fs::metadata(&wal)?.len();
        if size <= sqlite_outbox::SqliteStore::WAL_SIZE_LIMIT as u64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "T15: WAL grew to {:.1} MiB under a reader, back to {:.1} MiB after",
        grown as f64 / 1048576.0,
        size as f64 / 1048576.0
    );
    assert!(
        grown > sqlite_outbox::SqliteStore::WAL_SIZE_LIMIT as u64,
        "the reader did not make the WAL grow"
    );
    assert!(
        size <= sqlite_outbox::SqliteStore::WAL_SIZE_LIMIT as u64,
        "the WAL stayed at {size} bytes"
    );

    // Dispatching slow handlers holds no read transaction across them: with
    // the WAL emptied first, it stays near the autocheckpoint size.
    Connection::open(&db)?.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let dispatcher = sqlite_outbox::Dispatcher::builder(store.clone())
        .workers(2)
        .handle("slow", move |_: &sqlite_outbox::Event| {
            std::thread::sleep(Duration::from_secs(2));
            tx.send(()).ok();
            Ok(())
        })
        .start()?;
    store.enqueue_batch((0..2).map(|i| NewEvent::new("slow", json!(i))).collect())?;
    let mut max_wal = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1800) {
        store.enqueue_batch(
            (0..10)
                .map(|j| NewEvent::new("t", json!({"j": j, "pad": pad})))
                .collect(),
        )?;
        max_wal = max_wal.max(std::fs::metadata(&wal)?.len());
    }
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(10))?;
    }
    dispatcher.shutdown(Duration::from_secs(5));
    println!(
        "T15: WAL at most {:.1} MiB while handlers ran",
        max_wal as f64 / 1048576.0
    );
    assert!(
        max_wal <= 2 * 1000 * 4096 + 1_000_000,
        "a read transaction pinned the WAL: {max_wal}"
    );
    Ok(())
}
