//! `outbox-torture`: a process that the reliability tests run, kill and
//! restart. It uses only the crate's public API and appends one flushed
//! line per step, so that a `SIGKILL` loses at most a torn last line.
//!
//! ```text
//! outbox-torture enqueue  --db P --producer N --from S --count C --batch B [--sync full|normal]
//! outbox-torture work     --db P --journal J [--threads K] [--lease-ms T] [--handler-ms LO..HI]
//!                         [--overrun-pct X] [--fail-pct Y] [--seed S] [--exit-when-idle]
//! outbox-torture dispatch --db P --journal J [--workers K] [--handler-ms LO..HI] [--exit-when-idle]
//!                         [--unreachable-while FILE]
//! outbox-torture power    --db P --producer N --from S [--batch B] [--sync full|normal]
//! outbox-torture open     --db P
//! ```
//!
//! For `work` and `dispatch`, `--db` may also be a PostgreSQL server's URL
//! (with the `postgres` feature), and `--schema S` names the outbox's schema.
//!
//! `open` opens the store (creating or migrating the schema) and prints
//! `ok`: the process the migration tests kill and cut from power.
//!
//! `power` enqueues batches and completes events in one process, printing
//! `ok P FIRST LAST` after each enqueue commit and `done ID` after each
//! accepted completion, until it is killed (or a power cut is simulated).
//!
//! `work --weak-ack` acknowledges with a guard on the status alone, not on
//! the lease token: the weak guard that the checker must catch.
//!
//! Journal lines (times are wall-clock nanoseconds):
//! `claim ID ATTEMPT LOCKED_AT_NS TOKEN`, `hstart ID ATTEMPT T`,
//! `asent ID ATTEMPT SENT_AT` (an ack about to be sent),
//! `ack ID ATTEMPT ACCEPTED(0|1) KIND SENT_AT`.
//! Producer lines on stdout: `ok P FIRST LAST` after a commit returned,
//! `err P FIRST LAST KIND` after it failed.

#![allow(missing_docs)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlite_outbox::{
    Dispatcher, Durability, Event, HandlerError, NewEvent, Operator, SqliteStore, Store,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("outbox-torture: {e}");
        std::process::exit(1);
    }
}

struct Args(HashMap<String, String>);

impl Args {
    fn parse() -> Res<(String, Args)> {
        let mut it = std::env::args().skip(1);
        let mode = it.next().ok_or("missing mode")?;
        let mut map = HashMap::new();
        while let Some(key) = it.next() {
            let key = key
                .strip_prefix("--")
                .ok_or(format!("unexpected {key}"))?
                .to_owned();
            if key.starts_with("exit-when") || key == "weak-ack" {
                map.insert(key, "1".to_owned());
            } else {
                map.insert(
                    key.clone(),
                    it.next().ok_or(format!("--{key} needs a value"))?,
                );
            }
        }
        Ok((mode, Args(map)))
    }

    fn str(&self, key: &str) -> Res<&str> {
        Ok(self.0.get(key).ok_or(format!("missing --{key}"))?)
    }

    fn num(&self, key: &str, default: u64) -> Res<u64> {
        match self.0.get(key) {
            Some(v) => Ok(v.parse().map_err(|e| format!("--{key}: {e}"))?),
            None => Ok(default),
        }
    }

    fn range(&self, key: &str) -> Res<(u64, u64)> {
        match self.0.get(key) {
            None => Ok((0, 0)),
            Some(v) => {
                let (lo, hi) = v.split_once("..").ok_or(format!("--{key} wants LO..HI"))?;
                Ok((lo.parse()?, hi.parse()?))
            }
        }
    }

    fn flag(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// A small deterministic generator, so runs can be replayed by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn between(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }
}

#[derive(Clone)]
struct Journal(Arc<Mutex<BufWriter<File>>>);

impl Journal {
    fn open(path: &str) -> Res<Journal> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Journal(Arc::new(Mutex::new(BufWriter::new(file)))))
    }

    fn line(&self, text: std::fmt::Arguments<'_>) {
        if let Ok(mut w) = self.0.lock() {
            // Flushed per line: a kill loses at most the line being written.
            let _ = w.write_fmt(text);
            let _ = w.write_all(b"\n");
            let _ = w.flush();
        }
    }
}

fn open_store(args: &Args) -> Res<SqliteStore> {
    let durability = match args.0.get("sync").map(String::as_str) {
        None | Some("full") => Durability::Full,
        Some("normal") => Durability::Normal,
        Some(other) => return Err(format!("--sync {other}?").into()),
    };
    Ok(SqliteStore::builder(args.str("db")?)
        .durability(durability)
        .busy_timeout(Duration::from_secs(10))
        .build()?)
}

/// The store `--db` names, for the modes that only need the traits: a
/// file, or (with the `postgres` feature) a server's URL with `--schema`.
fn open_any(args: &Args) -> Res<Arc<dyn Operator>> {
    let db = args.str("db")?;
    #[cfg(feature = "postgres")]
    if db.starts_with("postgres") || db.contains("host=") {
        let schema = args.0.get("schema").map(String::as_str).unwrap_or("outbox");
        return Ok(Arc::new(
            sqlite_outbox::PostgresStore::builder(db)
                .schema(schema)
                .build()?,
        ));
    }
    let _ = db;
    Ok(Arc::new(open_store(args)?))
}

fn run() -> Res<()> {
    let (mode, args) = Args::parse()?;
    match mode.as_str() {
        "enqueue" => enqueue(&args),
        "work" => work(&args),
        "dispatch" => dispatch(&args),
        "power" => power(&args),
        "open" => {
            SqliteStore::open(args.str("db")?)?;
            println!("ok");
            Ok(())
        }
        other => Err(format!("unknown mode {other}").into()),
    }
}

/// The producers' business table: one row per batch, written in the same
/// transaction as the batch's events.
fn create_biz(store: &SqliteStore) -> sqlite_outbox::Result<()> {
    store.transaction(|tx| {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS biz (producer INTEGER, first_seq INTEGER, last_seq INTEGER)",
        )?;
        Ok(())
    })
}

/// One business row and the events `first..=last` in one transaction.
fn enqueue_batch(
    store: &SqliteStore,
    producer: u64,
    first: u64,
    last: u64,
    pad: usize,
) -> sqlite_outbox::Result<()> {
    store.transaction(|tx| {
        tx.execute(
            "INSERT INTO biz (producer, first_seq, last_seq) VALUES (?1, ?2, ?3)",
            (producer as i64, first as i64, last as i64),
        )?;
        let events = (first..=last)
            .map(|n| {
                NewEvent::new(
                    "torture",
                    json!({"p": producer, "seq": n, "pad": "x".repeat(pad)}),
                )
            })
            .collect();
        store.enqueue_batch_tx(tx, events)?;
        Ok(())
    })
}

fn enqueue(args: &Args) -> Res<()> {
    let store = open_store(args)?;
    let producer = args.num("producer", 0)?;
    let from = args.num("from", 0)?;
    let count = args.num("count", 1000)?;
    let batch = args.num("batch", 50)?.max(1);
    create_biz(&store)?;
    let stdout = std::io::stdout();
    let mut seq = from;
    while seq < from + count {
        let last = (seq + batch - 1).min(from + count - 1);
        let result = enqueue_batch(&store, producer, seq, last, 64);
        let mut out = stdout.lock();
        match result {
            Ok(()) => writeln!(out, "ok {producer} {seq} {last}")?,
            Err(e) => writeln!(out, "err {producer} {seq} {last} {:?}", e.kind())?,
        }
        out.flush()?;
        seq = last + 1;
    }
    Ok(())
}

/// Workers on the store API: claim, journal, "handle", acknowledge.
fn work(args: &Args) -> Res<()> {
    let store = open_any(args)?;
    let journal = Journal::open(args.str("journal")?)?;
    let threads = args.num("threads", 4)?;
    let lease = Duration::from_millis(args.num("lease-ms", 500)?);
    let handler = args.range("handler-ms")?;
    let overrun_pct = args.num("overrun-pct", 0)?;
    let fail_pct = args.num("fail-pct", 0)?;
    let seed = args.num("seed", std::process::id() as u64)?;
    let exit_when_idle = args.flag("exit-when-idle");
    let weak_ack = args.flag("weak-ack");
    let db_path = args.str("db")?.to_owned();
    let busy_errors = Arc::new(AtomicU64::new(0));
    let idle = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..threads {
        let (store, journal, busy_errors, idle) = (
            store.clone(),
            journal.clone(),
            busy_errors.clone(),
            idle.clone(),
        );
        let db_path = db_path.clone();
        handles.push(std::thread::spawn(move || {
            let weak = if weak_ack {
                rusqlite::Connection::open(&db_path).ok()
            } else {
                None
            };
            if let Some(c) = &weak {
                let _ = c.busy_timeout(Duration::from_secs(10));
            }
            let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(t + 1) | 1);
            let mut idle_since: Option<Instant> = None;
            loop {
                let claimed = match store.claim(1, lease, None) {
                    Ok(c) => c,
                    Err(e) => {
                        if e.is_busy() {
                            busy_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let Some(event) = claimed.into_iter().next() else {
                    if exit_when_idle {
                        let since = *idle_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_millis(300)
                            && store
                                .stats()
                                .map(|s| s.pending + s.processing == 0)
                                .unwrap_or(false)
                        {
                            idle.store(true, Ordering::SeqCst);
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                idle_since = None;
                let Some(l) = event.lease() else { continue };
                let locked_ns = event
                    .locked_at
                    .and_then(|t| t.timestamp_nanos_opt())
                    .unwrap_or(0);
                journal.line(format_args!(
                    "claim {} {} {} {}",
                    event.id,
                    l.attempt(),
                    locked_ns,
                    l.token()
                ));
                journal.line(format_args!(
                    "hstart {} {} {}",
                    event.id,
                    l.attempt(),
                    now_ns()
                ));
                let mut ms = rng.between(handler);
                if rng.below(100) < overrun_pct {
                    ms = lease.as_millis() as u64 * 2;
                }
                std::thread::sleep(Duration::from_millis(ms));
                let fail = rng.below(100) < fail_pct;
                // The time the ack was sent: it cannot take effect earlier.
                // Written down first: a worker killed after its ack committed
                // and before the line below leaves this one, and the checker
                // then knows the attempt may have ended (a retry makes the
                // event claimable again before its lease would run out).
                let sent = now_ns();
                journal.line(format_args!("asent {} {} {}", event.id, l.attempt(), sent));
                let (kind, result) = if let Some(c) = &weak {
                    // The weak guard: any processing row is taken as ours.
                    let changed = c.execute(
                        "UPDATE outbox_events SET status = 'done', locked_at = NULL,
                           locked_until = NULL, lease_token = NULL
                         WHERE id = ?1 AND status = 'processing'",
                        [event.id.to_string()],
                    );
                    match changed {
                        Ok(1) => ("done", Ok(())),
                        _ => ("done", store.complete(&l)),
                    }
                } else if fail {
                    (
                        "retry",
                        store.retry(&l, "injected failure", Some(Duration::ZERO)),
                    )
                } else {
                    ("done", store.complete(&l))
                };
                let accepted = match &result {
                    Ok(()) => 1,
                    Err(e) if e.is_lease_lost() => 0,
                    Err(_) => 2,
                };
                journal.line(format_args!(
                    "ack {} {} {} {} {}",
                    event.id,
                    l.attempt(),
                    accepted,
                    kind,
                    sent
                ));
            }
        }));
    }
    for h in handles {
        h.join().map_err(|_| "worker thread panicked")?;
    }
    println!("busy_errors {}", busy_errors.load(Ordering::Relaxed));
    Ok(())
}

/// Producer and worker in one process, for power-cut simulation.
fn power(args: &Args) -> Res<()> {
    let store = open_store(args)?;
    let producer = args.num("producer", 0)?;
    let mut seq = args.num("from", 0)?;
    let batch = args.num("batch", 10)?.max(1);
    create_biz(&store)?;
    let stdout = std::io::stdout();
    loop {
        let last = seq + batch - 1;
        let result = enqueue_batch(&store, producer, seq, last, 0);
        if result.is_ok() {
            let mut out = stdout.lock();
            writeln!(out, "ok {producer} {seq} {last}")?;
            out.flush()?;
        }
        seq = last + 1;
        for event in store.claim(batch as usize, Duration::from_secs(60), None)? {
            if let Some(lease) = event.lease() {
                if store.complete(&lease).is_ok() {
                    let mut out = stdout.lock();
                    writeln!(out, "done {}", event.id)?;
                    out.flush()?;
                }
            }
        }
    }
}

/// A real dispatcher whose handler journals each start. With
/// `--unreachable-while FILE`, the handler answers "unreachable" (journal
/// line `hunavail ID ATTEMPT`) while FILE exists.
fn dispatch(args: &Args) -> Res<()> {
    let store = open_any(args)?;
    let journal = Journal::open(args.str("journal")?)?;
    let handler = args.range("handler-ms")?;
    let workers = args.num("workers", 4)? as usize;
    let lease = Duration::from_millis(args.num("lease-ms", 60_000)?);
    let unreachable_while = args.0.get("unreachable-while").map(PathBuf::from);
    let j = journal.clone();
    let dispatcher = Dispatcher::builder(store.clone() as Arc<dyn Store>)
        .workers(workers)
        .lease(lease)
        .poll_interval(Duration::from_millis(20))
        .fallback(move |e: &Event| -> Result<(), HandlerError> {
            if unreachable_while.as_ref().is_some_and(|f| f.exists()) {
                j.line(format_args!("hunavail {} {}", e.id, e.attempts));
                return Err(HandlerError::unavailable("the marker file says so"));
            }
            j.line(format_args!("hstart {} {} {}", e.id, e.attempts, now_ns()));
            let seq = e.payload["seq"].as_u64().unwrap_or(0);
            let ms = handler.0 + seq % (handler.1.saturating_sub(handler.0) + 1);
            std::thread::sleep(Duration::from_millis(ms));
            Ok(())
        })
        .start()?;
    let deadline = Instant::now() + Duration::from_secs(args.num("max-secs", 120)?);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let s = store.stats()?;
        if (args.flag("exit-when-idle") && s.pending + s.processing == 0)
            || Instant::now() > deadline
        {
            break;
        }
    }
    let report = dispatcher.shutdown(Duration::from_secs(10));
    println!("done {} released {}", report.metrics.done, report.released);
    Ok(())
}
