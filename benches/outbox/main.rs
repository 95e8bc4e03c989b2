//! How close sqlite-outbox comes to raw SQLite, measured side by side.
//!
//! ```text
//! cargo bench --bench outbox                 # full run, a few minutes
//! cargo bench --bench outbox -- --quick      # smoke run
//! cargo bench --bench outbox -- --json F     # also write the rows as JSON
//! cargo bench --bench outbox -- --only G     # one group: enqueue, dispatch,
//!                                            # contention, latency, scaling, memory, idle,
//!                                            # offline, schema, dashboard, priority,
//!                                            # postgres (with
//!                                            # --features postgres and a server
//!                                            # in OUTBOX_TEST_POSTGRES), sinks (with
//!                                            # --features cli, nats-server and
//!                                            # mosquitto)
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
use sqlite_outbox::{
    Ack, Dispatcher, Durability, Event, NewEvent, Operator, SqliteStore, Store, SCHEMA_SQL,
};

mod app;
mod contention;
mod dashboard;
mod dispatch;
mod enqueue;
mod idle;
mod latency;
mod memory;
mod offline;
#[cfg(feature = "postgres")]
mod postgres;
mod priority;
mod scaling;
mod schema;
#[cfg(all(feature = "http", feature = "nats", feature = "mqtt"))]
mod sinks;

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
        return latency::child_enqueue(&args[2], args[3].parse()?, args[4].parse()?);
    }
    if args.get(1).map(String::as_str) == Some("child-dispatch") {
        // For profilers: fill, then dispatch with the crate's defaults.
        return dispatch::child_dispatch(&args[2], args[3].parse()?, args[4].parse()?);
    }
    if args.get(1).map(String::as_str) == Some("child-app") {
        // For profilers: `child-app PATH N TYPES WORKERS`.
        return app::child_app(
            &args[2],
            args[3].parse()?,
            args[4].parse()?,
            args[5].parse()?,
        );
    }
    if args.get(1).map(String::as_str) == Some("child-enqueue-batches") {
        return enqueue::child_batches(&args[2], args[3] == "ours", args[4].parse()?, &args[5]);
    }
    if args.get(1).map(String::as_str) == Some("child-raw") {
        // For profilers: the raw claim/complete loop.
        let secs = dispatch::dispatch_raw(
            Path::new(&args[2]),
            args[3].parse()?,
            "NORMAL",
            dispatch::RawLoop::OurSchema,
            sqlite_outbox::DEFAULT_BATCH_SIZE,
        )?;
        println!("raw: {:.0} ev/s", args[3].parse::<f64>()? / secs);
        return Ok(());
    }
    if args.get(1).map(String::as_str) == Some("child-rss") {
        return memory::child_rss(&args[2], args[3].parse()?);
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
    #[cfg_attr(not(any(feature = "postgres", feature = "http")), allow(unused_mut))]
    let mut groups: Vec<(&str, Group)> = vec![
        ("enqueue", enqueue::enqueue_benches),
        ("dispatch", dispatch::dispatch_benches),
        ("app", app::app_benches),
        ("contention", contention::contention_benches),
        ("latency", latency::latency_benches),
        ("scaling", scaling::scaling_benches),
        ("memory", memory::memory_benches),
        ("idle", idle::idle_benches),
        ("offline", offline::offline_benches),
        ("schema", schema::schema_benches),
        ("dashboard", dashboard::dashboard_benches),
        ("priority", priority::priority_benches),
    ];
    #[cfg(feature = "postgres")]
    groups.push(("postgres", postgres::postgres_benches));
    #[cfg(all(feature = "http", feature = "nats", feature = "mqtt"))]
    groups.push(("sinks", sinks::sink_benches));
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
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
