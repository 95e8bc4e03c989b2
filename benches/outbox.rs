//! How close sqlite-outbox comes to raw SQLite, measured side by side.
//!
//! ```text
//! cargo bench --bench outbox                 # full run, a few minutes
//! cargo bench --bench outbox -- --quick      # smoke run
//! cargo bench --bench outbox -- --json F     # also write the rows as JSON
//! cargo bench --bench outbox -- --only G     # one group: enqueue, dispatch,
//!                                            # latency, scaling, memory, idle
//! ```
//!
//! Every figure is paired with a raw-rusqlite baseline doing the same SQL
//! work on the same schema with the same pragmas, in the same process, run
//! interleaved with ours, and reported as a ratio: absolute times on a
//! shared machine drift, ratios much less.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, TransactionBehavior};
use serde_json::json;
use sqlite_outbox::{Ack, Dispatcher, Durability, Event, NewEvent, SqliteStore, Store, SCHEMA_SQL};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Config {
    quick: bool,
    enqueue_n: usize,
    dispatch_n: usize,
    latency_secs: u64,
    scale_small: usize,
    scale_large: usize,
    rss_large: usize,
}

#[derive(serde::Serialize)]
struct Row {
    group: &'static str,
    name: String,
    ours: f64,
    raw: Option<f64>,
    unit: &'static str,
    /// ours / raw for rates (higher is better), raw / ours for costs.
    ratio: Option<f64>,
    note: String,
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child-enqueue") {
        return child_enqueue(&args[2], args[3].parse()?, args[4].parse()?);
    }
    if args.get(1).map(String::as_str) == Some("child-rss") {
        return child_rss(&args[2], args[3].parse()?);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let json_out = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let cfg = if quick {
        Config {
            quick,
            enqueue_n: 2_000,
            dispatch_n: 5_000,
            latency_secs: 2,
            scale_small: 2_000,
            scale_large: 20_000,
            rss_large: 20_000,
        }
    } else {
        Config {
            quick,
            enqueue_n: 100_000,
            dispatch_n: 100_000,
            latency_secs: 10,
            scale_small: 10_000,
            scale_large: 1_000_000,
            rss_large: 1_000_000,
        }
    };
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))?;
    println!(
        "sqlite-outbox benchmark{} in {}",
        if quick { " (quick)" } else { "" },
        dir.path().display()
    );
    println!(
        "sqlite {} | {} cores",
        rusqlite::version(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    type Group = fn(&Config, &Path, &mut Vec<Row>) -> Res<()>;
    let groups: [(&str, Group); 6] = [
        ("enqueue", enqueue_benches),
        ("dispatch", dispatch_benches),
        ("latency", latency_benches),
        ("scaling", scaling_benches),
        ("memory", memory_benches),
        ("idle", idle_benches),
    ];
    let mut rows = Vec::new();
    for (name, run) in groups {
        if only.as_deref().is_none_or(|o| o == name) {
            run(&cfg, dir.path(), &mut rows)?;
        }
    }
    print_table(&rows);
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
        println!("wrote {path}");
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!();
    println!("| group | measurement | ours | raw SQLite | ratio | note |");
    println!("| --- | --- | ---: | ---: | ---: | --- |");
    for r in rows {
        let fmt = |v: f64| {
            if v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        };
        println!(
            "| {} | {} | {} {} | {} | {} | {} |",
            r.group,
            r.name,
            fmt(r.ours),
            r.unit,
            r.raw
                .map(|v| format!("{} {}", fmt(v), r.unit))
                .unwrap_or_else(|| "-".into()),
            r.ratio
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "-".into()),
            r.note
        );
    }
}

fn raw_conn(path: &Path, sync: &str) -> Res<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", sync)?;
    Ok(conn)
}

/// A raw database with the outbox schema and an app table.
fn raw_db(path: &Path, sync: &str) -> Res<Connection> {
    let conn = raw_conn(path, sync)?;
    conn.execute_batch(SCHEMA_SQL)?;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS app (id INTEGER PRIMARY KEY, v INTEGER)")?;
    Ok(conn)
}

fn our_db(path: &Path, durability: Durability) -> Res<SqliteStore> {
    let store = SqliteStore::builder(path).durability(durability).build()?;
    store.transaction(|tx| {
        tx.execute_batch("CREATE TABLE IF NOT EXISTS app (id INTEGER PRIMARY KEY, v INTEGER)")?;
        Ok::<_, sqlite_outbox::Error>(())
    })?;
    Ok(store)
}

const RAW_INSERT: &str =
    "INSERT INTO outbox_events (id, event_type, payload, status, attempts, max_attempts, \
     next_attempt_at, created_at) VALUES (?1, ?2, ?3, 'pending', 0, 10, ?4, ?4)";

fn raw_insert(conn: &Connection, i: usize) -> rusqlite::Result<()> {
    let now = chrono::Utc::now().timestamp_millis();
    conn.prepare_cached(RAW_INSERT)?.execute(params![
        uuid::Uuid::now_v7().to_string(),
        "bench.event",
        json!({"i": i, "pad": "abcdefghijklmnopqrstuvwxyz"}).to_string(),
        now
    ])?;
    Ok(())
}

fn event(i: usize) -> NewEvent {
    NewEvent::new(
        "bench.event",
        json!({"i": i, "pad": "abcdefghijklmnopqrstuvwxyz"}),
    )
}

/// Runs `ours` and `raw` alternately in `rounds` chunks; returns total
/// seconds for each.
fn interleave(
    rounds: usize,
    mut ours: impl FnMut(usize) -> Res<()>,
    mut raw: impl FnMut(usize) -> Res<()>,
) -> Res<(f64, f64)> {
    let (mut t_ours, mut t_raw) = (0.0, 0.0);
    for r in 0..rounds {
        let t = Instant::now();
        ours(r)?;
        t_ours += t.elapsed().as_secs_f64();
        let t = Instant::now();
        raw(r)?;
        t_raw += t.elapsed().as_secs_f64();
    }
    Ok((t_ours, t_raw))
}

fn rate_row(
    group: &'static str,
    name: String,
    n: usize,
    (ours, raw): (f64, f64),
    note: String,
) -> Row {
    let (o, r) = (n as f64 / ours, n as f64 / raw);
    Row {
        group,
        name,
        ours: o,
        raw: Some(r),
        unit: "ev/s",
        ratio: Some(o / r),
        note,
    }
}

fn enqueue_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let rounds = 10;
    for (label, durability, sync) in [
        ("FULL", Durability::Full, "FULL"),
        ("NORMAL", Durability::Normal, "NORMAL"),
    ] {
        let n = cfg.enqueue_n / 10;
        let store = our_db(&dir.join(format!("enq1-{label}.db")), durability)?;
        let mut raw = raw_db(&dir.join(format!("enq1-{label}-raw.db")), sync)?;
        let per = n / rounds;
        let times = interleave(
            rounds,
            |r| {
                for i in 0..per {
                    store.transaction(|tx| {
                        tx.prepare_cached("INSERT INTO app (v) VALUES (?1)")?
                            .execute([i as i64])?;
                        store.enqueue(tx, event(r * per + i))?;
                        Ok::<_, sqlite_outbox::Error>(())
                    })?;
                }
                Ok(())
            },
            |r| {
                for i in 0..per {
                    let tx = raw.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    tx.prepare_cached("INSERT INTO app (v) VALUES (?1)")?
                        .execute([i as i64])?;
                    raw_insert(&tx, r * per + i)?;
                    tx.commit()?;
                }
                Ok(())
            },
        )?;
        rows.push(rate_row(
            "enqueue",
            format!("1 event + 1 app row per tx, {label}"),
            n,
            times,
            format!("{n} tx"),
        ));
    }

    let n = cfg.enqueue_n;
    let store = our_db(&dir.join("enq100.db"), Durability::Full)?;
    let mut raw = raw_db(&dir.join("enq100-raw.db"), "FULL")?;
    let batches = n / 100;
    let times = interleave(
        rounds,
        |r| {
            for b in 0..batches / rounds {
                store.transaction(|tx| {
                    store.enqueue_batch(
                        tx,
                        (0..100)
                            .map(|i| event(r * 1_000_000 + b * 100 + i))
                            .collect(),
                    )?;
                    Ok::<_, sqlite_outbox::Error>(())
                })?;
            }
            Ok(())
        },
        |r| {
            for b in 0..batches / rounds {
                let tx = raw.transaction_with_behavior(TransactionBehavior::Immediate)?;
                for i in 0..100 {
                    raw_insert(&tx, r * 1_000_000 + b * 100 + i)?;
                }
                tx.commit()?;
            }
            Ok(())
        },
    )?;
    rows.push(rate_row(
        "enqueue",
        "100 events per tx, FULL".into(),
        n,
        times,
        format!("{n} events"),
    ));

    // Four threads at once, one event per transaction.
    let n = cfg.enqueue_n / 10;
    let store = our_db(&dir.join("enq4.db"), Durability::Full)?;
    let raw_path = dir.join("enq4-raw.db");
    drop(raw_db(&raw_path, "FULL")?);
    let times = interleave(
        2,
        |_| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let store = store.clone();
                    std::thread::spawn(move || -> sqlite_outbox::Result<()> {
                        for i in 0..n / 8 {
                            store.transaction(|tx| {
                                store.enqueue(tx, event(t * n + i)).map(|_| ())
                            })?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| "thread panicked")??;
            }
            Ok(())
        },
        |_| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let path = raw_path.clone();
                    std::thread::spawn(move || -> Result<(), String> {
                        let mut conn = raw_conn(&path, "FULL").map_err(|e| e.to_string())?;
                        for i in 0..n / 8 {
                            let tx = conn
                                .transaction_with_behavior(TransactionBehavior::Immediate)
                                .map_err(|e| e.to_string())?;
                            raw_insert(&tx, t * n + i).map_err(|e| e.to_string())?;
                            tx.commit().map_err(|e| e.to_string())?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| "thread panicked")??;
            }
            Ok(())
        },
    )?;
    rows.push(rate_row(
        "enqueue",
        "4 threads, 1 event per tx, FULL".into(),
        n,
        times,
        format!("{n} tx"),
    ));
    Ok(())
}

/// Our dispatcher with a no-op handler over `n` pending events, until the
/// last outcome is written.
fn dispatch_ours(path: &Path, n: usize, workers: usize, durability: Durability) -> Res<f64> {
    let store = our_db(path, durability)?;
    for chunk in 0..n / 1000 {
        store.create_batch((0..1000).map(|i| event(chunk * 1000 + i)).collect())?;
    }
    let t = Instant::now();
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(workers)
        .batch_size(256)
        .handle("bench.event", |_: &Event| Ok(()))
        .start()?;
    while dispatcher.metrics().done < n as u64 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = t.elapsed().as_secs_f64();
    let report = dispatcher.shutdown(Duration::from_secs(10));
    if store.stats()?.done != n as u64 || !report.is_clean() {
        return Err(format!("dispatch incomplete: {report:?}").into());
    }
    Ok(secs)
}

/// The raw loop: claim 100 in one UPDATE ... RETURNING, complete them in
/// another transaction.
fn dispatch_raw(path: &Path, n: usize, sync: &str) -> Res<f64> {
    let mut conn = raw_db(path, sync)?;
    {
        let tx = conn.transaction()?;
        for i in 0..n {
            raw_insert(&tx, i)?;
        }
        tx.commit()?;
    }
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let now = chrono::Utc::now().timestamp_millis();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let claimed: Vec<(i64, i64)> = tx
            .prepare_cached(
                "UPDATE outbox_events SET status = 'processing', attempts = attempts + 1, locked_at = ?1,
                   locked_until = ?1 + 60000, lease_token = random()
                 WHERE seq IN (SELECT seq FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= ?1
                               ORDER BY next_attempt_at, seq LIMIT 100)
                 RETURNING seq, lease_token",
            )?
            .query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        tx.commit()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (seq, token) in &claimed {
            tx.prepare_cached(
                "UPDATE outbox_events SET status = 'done', completed_at = ?3, locked_at = NULL,
                   locked_until = NULL, lease_token = NULL
                 WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'",
            )?
            .execute(params![seq, token, now])?;
        }
        tx.commit()?;
        done += claimed.len();
    }
    Ok(t.elapsed().as_secs_f64())
}

fn dispatch_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let n = cfg.dispatch_n;
    for (label, durability, sync, worker_counts) in [
        ("FULL", Durability::Full, "FULL", &[1, 2, 4][..]),
        ("NORMAL", Durability::Normal, "NORMAL", &[4][..]),
    ] {
        let raw_a = dispatch_raw(&dir.join(format!("disp-raw-a-{label}.db")), n, sync)?;
        let mut results = Vec::new();
        for &workers in worker_counts {
            let path = dir.join(format!("disp-{workers}-{label}.db"));
            results.push((workers, dispatch_ours(&path, n, workers, durability)?));
        }
        let raw_b = dispatch_raw(&dir.join(format!("disp-raw-b-{label}.db")), n, sync)?;
        // The raw loop runs before and after ours; the faster of the two is
        // the baseline.
        let raw = raw_a.min(raw_b);
        for (workers, secs) in results {
            rows.push(rate_row(
                "dispatch",
                format!("no-op handler, {workers} worker(s), {label}"),
                n,
                (secs, raw),
                format!("{n} events; raw = claim-100/complete-100 loop"),
            ));
        }
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn latency_rows(rows: &mut Vec<Row>, name: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let note = format!("{} events", ms.len());
    for (label, v) in [
        ("p50", percentile(&ms, 0.5)),
        ("p99", percentile(&ms, 0.99)),
        ("max", percentile(&ms, 1.0)),
    ] {
        rows.push(Row {
            group: "latency",
            name: format!("{name} {label}"),
            ours: v,
            raw: None,
            unit: "ms",
            ratio: None,
            note: note.clone(),
        });
    }
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
}

fn latency_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    latency_bench(
        cfg,
        &dir.join("latency-full.db"),
        Durability::Full,
        "FULL",
        rows,
    )?;
    latency_bench(
        cfg,
        &dir.join("latency-normal.db"),
        Durability::Normal,
        "NORMAL",
        rows,
    )
}

/// Enqueue → handler start at a steady 1,000 events/s.
fn latency_bench(
    cfg: &Config,
    path: &Path,
    durability: Durability,
    label: &str,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let n = cfg.latency_secs as usize * 1000;
    let starts: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let store = our_db(path, durability)?;
    let s = starts.clone();
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(4)
        .poll_interval(Duration::from_millis(100))
        .handle("bench.event", move |e: &Event| {
            let t = now_ns();
            s.lock().map(|mut m| m.insert(e.id.to_string(), t)).ok();
            Ok(())
        })
        .start()?;

    // (a) in this process
    let mut committed = HashMap::new();
    let t0 = Instant::now();
    for i in 0..n {
        let due = t0 + Duration::from_micros(i as u64 * 1000);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let e = store.create(event(i))?;
        committed.insert(e.id.to_string(), now_ns());
    }
    std::thread::sleep(Duration::from_millis(300));
    let lat = |committed: &HashMap<String, i64>| -> Res<Vec<f64>> {
        let starts = starts.lock().map_err(|_| "poisoned")?;
        Ok(committed
            .iter()
            .filter_map(|(id, c)| starts.get(id).map(|s| ((s - c).max(0)) as f64 / 1e6))
            .collect())
    };
    latency_rows(
        rows,
        &format!("{label}: in-process enqueue → handler"),
        lat(&committed)?,
    );
    if durability != Durability::Full {
        dispatcher.shutdown(Duration::from_secs(5));
        return Ok(());
    }

    // (b) another process enqueues; noticed by polling data_version every 100 ms
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args([
            "child-enqueue",
            &path.display().to_string(),
            &n.to_string(),
            "1000",
        ])
        .stdout(Stdio::piped())
        .output()?;
    std::thread::sleep(Duration::from_millis(300));
    let committed: HashMap<String, i64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_once(' ')
                .and_then(|(id, t)| t.parse().ok().map(|t| (id.to_owned(), t)))
        })
        .collect();
    latency_rows(
        rows,
        &format!("{label}: other-process enqueue → handler (poll 100 ms)"),
        lat(&committed)?,
    );
    dispatcher.shutdown(Duration::from_secs(5));
    Ok(())
}

fn child_enqueue(path: &str, n: usize, per_sec: u64) -> Res<()> {
    let store = SqliteStore::open(path)?;
    let t0 = Instant::now();
    let mut out = String::new();
    for i in 0..n {
        let due = t0 + Duration::from_micros(i as u64 * 1_000_000 / per_sec);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let e = store.create(event(i))?;
        out.push_str(&format!("{} {}\n", e.id, now_ns()));
    }
    print!("{out}");
    Ok(())
}

/// Fills a store quickly with `pending` due events and `done` finished ones.
fn fill(path: &Path, pending: usize, done: usize) -> Res<SqliteStore> {
    let store = our_db(path, Durability::Full)?;
    let conn = raw_conn(path, "OFF")?;
    let now = chrono::Utc::now().timestamp_millis();
    for (count, status, kind) in [
        (done, "done", "bench.old"),
        (pending, "pending", "bench.event"),
    ] {
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
             INSERT INTO outbox_events (event_type, payload, status, next_attempt_at, created_at, completed_at)
             SELECT ?4, '{\"i\":' || i || '}', ?2, ?3, ?3, CASE WHEN ?2 = 'done' THEN ?3 END FROM n",
            params![count as i64, status, now - 1000, kind],
        )?;
    }
    Ok(store)
}

/// Microseconds per event of claim(100) + complete(100), over `rounds`.
fn claim_complete_cost(store: &SqliteStore, rounds: usize) -> Res<f64> {
    let t = Instant::now();
    let mut events = 0;
    for _ in 0..rounds {
        let claimed = store.claim(100, Duration::from_secs(60), None)?;
        let acks: Vec<Ack> = claimed
            .iter()
            .filter_map(|e| e.lease())
            .map(Ack::complete)
            .collect();
        store.settle(&acks)?;
        events += claimed.len();
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / events.max(1) as f64)
}

fn scaling_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let (reps, rounds) = if cfg.quick { (3, 5) } else { (9, 20) };
    let small_path = dir.join("scale-small.db");
    let large_path = dir.join("scale-large.db");
    let done_path = dir.join("scale-done.db");
    let small = fill(&small_path, cfg.scale_small, 0)?;
    let large = fill(&large_path, cfg.scale_large, 0)?;
    let done = fill(&done_path, cfg.scale_small, cfg.scale_large)?;
    // Between runs the handled events become pending again, so every run
    // sees the same backlog.
    let reset = |path: &Path| -> Res<()> {
        raw_conn(path, "OFF")?.execute(
            "UPDATE outbox_events SET status = 'pending', attempts = 0, completed_at = NULL
             WHERE status = 'done' AND event_type = 'bench.event'",
            [],
        )?;
        Ok(())
    };
    // Warm each file's cache once, then interleave the three.
    for s in [&small, &large, &done] {
        claim_complete_cost(s, 2)?;
    }
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        a.push(claim_complete_cost(&small, rounds)?);
        b.push(claim_complete_cost(&large, rounds)?);
        c.push(claim_complete_cost(&done, rounds)?);
        for p in [&small_path, &large_path, &done_path] {
            reset(p)?;
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let (a, b, c) = (med(a), med(b), med(c));
    let k = |n: usize| {
        if n >= 1_000_000 {
            format!("{}M", n / 1_000_000)
        } else {
            format!("{}k", n / 1000)
        }
    };
    let note = format!("median of {reps} runs of {rounds} × (claim 100 + complete 100)");
    rows.push(Row {
        group: "scaling",
        name: format!("claim+complete, {} pending", k(cfg.scale_small)),
        ours: a,
        raw: None,
        unit: "µs/ev",
        ratio: None,
        note: note.clone(),
    });
    rows.push(Row {
        group: "scaling",
        name: format!("claim+complete, {} pending", k(cfg.scale_large)),
        ours: b,
        raw: None,
        unit: "µs/ev",
        ratio: Some(b / a),
        note: format!("ratio to {} pending", k(cfg.scale_small)),
    });
    rows.push(Row {
        group: "scaling",
        name: format!(
            "claim+complete, {} pending + {} done",
            k(cfg.scale_small),
            k(cfg.scale_large)
        ),
        ours: c,
        raw: None,
        unit: "µs/ev",
        ratio: Some(c / a),
        note: format!("ratio to {} pending", k(cfg.scale_small)),
    });
    Ok(())
}

fn child_rss(path: &str, n: usize) -> Res<()> {
    let p = PathBuf::from(path);
    let store = fill(&p, n, 0)?;
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(4)
        .batch_size(256)
        .handle("bench.event", |_: &Event| Ok(()))
        .start()?;
    while dispatcher.metrics().done < n as u64 {
        std::thread::sleep(Duration::from_millis(5));
    }
    dispatcher.shutdown(Duration::from_secs(10));
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    println!("{hwm} {}", std::fs::metadata(&p)?.len());
    Ok(())
}

fn memory_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let exe = std::env::current_exe()?;
    let mut measured = Vec::new();
    for n in [cfg.scale_small, cfg.rss_large] {
        let path = dir.join(format!("rss-{n}.db"));
        let t = Instant::now();
        let out = Command::new(&exe)
            .args(["child-rss", &path.display().to_string(), &n.to_string()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut f = text.split_whitespace();
        let (kib, bytes): (f64, f64) = (
            f.next().unwrap_or("0").parse()?,
            f.next().unwrap_or("0").parse()?,
        );
        measured.push((
            n,
            kib / 1024.0,
            bytes / 1048576.0,
            t.elapsed().as_secs_f64(),
        ));
    }
    let base = measured[0].1;
    for (n, mib, file_mib, secs) in measured {
        rows.push(Row {
            group: "memory",
            name: format!("peak RSS dispatching a {n} backlog"),
            ours: mib,
            raw: None,
            unit: "MiB",
            ratio: Some(mib / base),
            note: format!("file {file_mib:.1} MiB; {:.0} ev/s", n as f64 / secs),
        });
    }
    Ok(())
}

/// CPU time (user + system) this process has used, from /proc/self/stat.
fn cpu_time() -> Res<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Ok(Duration::from_millis(ticks * 10))
}

/// What an idle dispatcher costs: CPU time while nothing is due.
fn idle_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let secs = if cfg.quick { 2 } else { 10 };
    let store = our_db(&dir.join("idle.db"), Durability::Full)?;
    let dispatcher = Dispatcher::builder(store)
        .handle("bench.event", |_: &Event| Ok(()))
        .start()?;
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_time()?;
    std::thread::sleep(Duration::from_secs(secs));
    let used = cpu_time()? - before;
    dispatcher.shutdown(Duration::from_secs(5));
    rows.push(Row {
        group: "idle",
        name: "CPU used by an idle dispatcher (default 500 ms poll)".into(),
        ours: used.as_secs_f64() * 1000.0 / secs as f64,
        raw: None,
        unit: "ms CPU/s",
        ratio: None,
        note: format!("over {secs} s; 10 ms resolution"),
    });
    Ok(())
}
