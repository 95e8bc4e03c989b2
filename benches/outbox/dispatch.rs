//! Dispatch rates with a no-op handler, ours beside the raw claim and complete loop.

use super::*;

/// The columns a dispatcher hands its handler: every column of the row, as
/// the crate's claim returns them.
pub(crate) const RAW_COLUMNS: &str =
    "seq, id, event_type, payload, status, attempts, max_attempts, \
    next_attempt_at, locked_at, locked_until, lease_token, completed_at, delivered_at, \
    last_error, correlation_id, org_id, user_id, ordering_key, idempotency_key, created_at";

/// A table with only what a queue needs, for the baseline on a minimal schema.
const MINIMAL_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS q (
    seq INTEGER PRIMARY KEY, payload TEXT NOT NULL, status TEXT NOT NULL,
    next_attempt_at INTEGER NOT NULL, lease_token INTEGER, locked_until INTEGER,
    completed_at INTEGER);
  CREATE INDEX IF NOT EXISTS q_due ON q (next_attempt_at, seq) WHERE status = 'pending';";

/// The plain loops the dispatcher is measured against.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum RawLoop {
    /// Our schema: claim a batch (`UPDATE … RETURNING` every column) in one
    /// transaction, complete each event (a fenced `UPDATE`) in the next.
    OurSchema,
    /// The same on a one-index table holding only what a queue needs.
    Minimal,
    /// Our schema, the fastest form: one transaction completes the last
    /// batch and claims the next.
    OurSchemaFused,
}

impl RawLoop {
    fn label(self) -> &'static str {
        match self {
            RawLoop::OurSchema => "raw loop, our schema",
            RawLoop::Minimal => "raw loop, minimal schema",
            RawLoop::OurSchemaFused => "raw loop, our schema, complete+claim in one tx",
        }
    }
}

/// Our dispatcher at the crate's defaults (claim batch 64) with a no-op
/// handler over `n` pending events, until the last outcome is written.
pub(crate) fn dispatch_ours(
    path: &Path,
    n: usize,
    workers: usize,
    durability: Durability,
) -> Res<f64> {
    let store = our_db(path, durability)?;
    for chunk in 0..n / 1000 {
        store.enqueue_batch((0..1000).map(|i| event(chunk * 1000 + i)).collect())?;
    }
    let (secs, report) = run_no_op(&store, n, workers)?;
    if store.stats()?.done != n as u64 || !report.is_clean() {
        return Err(format!("dispatch incomplete: {report:?}").into());
    }
    Ok(secs)
}

/// Starts a dispatcher at the crate's defaults with a no-op handler and
/// stops it once `n` events are done; returns its seconds and report.
fn run_no_op(
    store: &SqliteStore,
    n: usize,
    workers: usize,
) -> Res<(f64, sqlite_outbox::ShutdownReport)> {
    let t = Instant::now();
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(workers)
        .handle("bench.event", |_: &Event| Ok(()))
        .start()?;
    while dispatcher.metrics().done < n as u64 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = t.elapsed().as_secs_f64();
    Ok((secs, dispatcher.shutdown(Duration::from_secs(10))))
}

/// Fills a file with `n` due events and dispatches them at the crate's
/// defaults (`child-dispatch PATH N WORKERS`: a target for profilers).
pub(crate) fn child_dispatch(path: &str, n: usize, workers: usize) -> Res<()> {
    let store = fill(Path::new(path), n, 0)?;
    let (secs, report) = run_no_op(&store, n, workers)?;
    let m = report.metrics;
    println!(
        "{n} events in {secs:.3} s: {:.0} ev/s; {} claim and {} settle transactions",
        n as f64 / secs,
        m.claim_batches,
        m.settle_batches
    );
    Ok(())
}

/// A plain rusqlite loop over `n` pending events, claiming `batch` at a
/// time; returns its seconds.
pub(crate) fn dispatch_raw(
    path: &Path,
    n: usize,
    sync: &str,
    kind: RawLoop,
    batch: usize,
) -> Res<f64> {
    let mut conn = raw_db(path, sync)?;
    conn.execute_batch(MINIMAL_SCHEMA)?;
    {
        let tx = conn.transaction()?;
        for i in 0..n {
            if kind == RawLoop::Minimal {
                tx.prepare_cached(
                    "INSERT INTO q (payload, status, next_attempt_at) VALUES (?1, 'pending', ?2)",
                )?
                .execute(params![
                    json!({"i": i, "pad": "abcdefghijklmnopqrstuvwxyz"}).to_string(),
                    chrono::Utc::now().timestamp_millis()
                ])?;
            } else {
                raw_insert(&tx, i)?;
            }
        }
        tx.commit()?;
    }
    raw_loop(&mut conn, n, kind, batch, |_| {})
}

/// The raw claim and complete loop over the `n` pending events of the
/// file behind `conn`, claiming `batch` at a time and calling `work` with
/// each claimed payload before completing it; returns its seconds.
pub(crate) fn raw_loop(
    conn: &mut Connection,
    n: usize,
    kind: RawLoop,
    batch: usize,
    work: impl Fn(&str),
) -> Res<f64> {
    let (claim_sql, done_sql) = match kind {
        RawLoop::Minimal => (
            "UPDATE q SET status = 'processing', locked_until = ?1 + 60000, lease_token = random()
             WHERE seq IN (SELECT seq FROM q WHERE status = 'pending' AND next_attempt_at <= ?1
                           ORDER BY next_attempt_at, seq LIMIT ?2 + 0)
             RETURNING seq, payload, lease_token"
                .to_owned(),
            "UPDATE q SET status = 'done', completed_at = ?3, locked_until = NULL, lease_token = NULL
             WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'",
        ),
        _ => (
            format!(
                "UPDATE outbox_events SET status = 'processing', attempts = attempts + 1,
                   locked_at = ?1, locked_until = ?1 + 60000, lease_token = random()
                 WHERE seq IN (SELECT seq FROM outbox_events
                               WHERE status = 'pending' AND next_attempt_at <= ?1
                               ORDER BY next_attempt_at, seq LIMIT ?2 + 0)
                 RETURNING {RAW_COLUMNS}"
            ),
            "UPDATE outbox_events SET status = 'done', completed_at = ?3, locked_at = NULL,
               locked_until = NULL, lease_token = NULL
             WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'",
        ),
    };
    // What a handler would be given: the payload text, and the lease.
    let seq_token = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(i64, i64, String)> {
        if kind == RawLoop::Minimal {
            Ok((r.get(0)?, r.get(2)?, r.get(1)?))
        } else {
            Ok((r.get(0)?, r.get(10)?, r.get(3)?))
        }
    };
    let t = Instant::now();
    let mut done = 0;
    let mut held: Vec<(i64, i64, String)> = Vec::new();
    let batch = batch as i64;
    while done < n {
        let now = chrono::Utc::now().timestamp_millis();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if kind == RawLoop::OurSchemaFused {
            for (seq, token, _) in &held {
                tx.prepare_cached(done_sql)?
                    .execute(params![seq, token, now])?;
            }
            done += held.len();
        }
        held = tx
            .prepare_cached(&claim_sql)?
            .query_map(params![now, batch], seq_token)?
            .collect::<Result<_, _>>()?;
        tx.commit()?;
        for (_, _, payload) in &held {
            work(payload);
        }
        if kind != RawLoop::OurSchemaFused {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (seq, token, _) in &held {
                tx.prepare_cached(done_sql)?
                    .execute(params![seq, token, now])?;
            }
            tx.commit()?;
            done += held.len();
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) fn dispatch_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let n = cfg.dispatch_n;
    let rounds = if cfg.quick { 1 } else { 3 };
    let batch = sqlite_outbox::DEFAULT_BATCH_SIZE;
    let raws = [
        RawLoop::OurSchema,
        RawLoop::Minimal,
        RawLoop::OurSchemaFused,
    ];
    for (label, durability, sync) in [
        ("NORMAL", Durability::Normal, "NORMAL"),
        ("FULL", Durability::Full, "FULL"),
    ] {
        // Per round: each raw loop, then ours with 1 and 4 workers; the
        // ratio of each round is ours / the fastest raw loop of that round.
        let mut ours: HashMap<usize, Vec<f64>> = HashMap::new();
        let mut raw: HashMap<&str, Vec<f64>> = HashMap::new();
        let mut ratios: HashMap<usize, Vec<f64>> = HashMap::new();
        let file = |name: String| -> Res<PathBuf> {
            let p = dir.join(name);
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
            }
            Ok(p)
        };
        let mut to_minimal: HashMap<usize, Vec<f64>> = HashMap::new();
        for _ in 0..rounds {
            // The baseline: the faster of the two loops on our schema (the
            // same work: the same rows and indexes kept up to date).
            let (mut fastest, mut minimal) = (f64::INFINITY, f64::INFINITY);
            for kind in raws {
                let path = file(format!("disp-raw-{label}.db"))?;
                let secs = dispatch_raw(&path, n, sync, kind, batch)?;
                raw.entry(kind.label()).or_default().push(n as f64 / secs);
                if kind == RawLoop::Minimal {
                    minimal = secs;
                } else {
                    fastest = fastest.min(secs);
                }
            }
            for workers in [1, 4] {
                let path = file(format!("disp-{workers}-{label}.db"))?;
                let secs = dispatch_ours(&path, n, workers, durability)?;
                ours.entry(workers).or_default().push(n as f64 / secs);
                ratios.entry(workers).or_default().push(fastest / secs);
                to_minimal.entry(workers).or_default().push(minimal / secs);
            }
        }
        for kind in raws {
            let rate = median(raw.remove(kind.label()).unwrap_or_default());
            rows.push(Row {
                group: "dispatch",
                name: format!("{}, batch {batch}, {label}", kind.label()),
                ours: rate,
                raw: None,
                unit: "ev/s",
                ratio: None,
                note: format!("{:.1} µs/event; median of {rounds}", 1e6 / rate),
            });
        }
        for workers in [1, 4] {
            let rate = median(ours.remove(&workers).unwrap_or_default());
            let r = ratios.remove(&workers).unwrap_or_default();
            let spread = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
                - r.iter().cloned().fold(f64::INFINITY, f64::min);
            rows.push(Row {
                group: "dispatch",
                name: format!("no-op handler, {workers} worker(s), defaults, {label}"),
                ours: rate,
                raw: Some(rate / median(r.clone())),
                unit: "ev/s",
                ratio: Some(median(r)),
                note: format!(
                    "{n} events; {:.1} µs/event; raw = the faster raw loop on our schema in each \
                     round; ratio spread {spread:.2}; to the minimal schema {:.2}",
                    1e6 / rate,
                    median(to_minimal.remove(&workers).unwrap_or_default())
                ),
            });
        }
    }
    Ok(())
}
