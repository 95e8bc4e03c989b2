//! Priorities and limits: what they cost while unused (or never binding),
//! and how soon an urgent event is claimed behind a backlog of priority 0.

use super::dispatch::{dispatch_raw, median, RawLoop, RAW_COLUMNS};
use super::*;

pub(crate) fn priority_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    unused_cost(cfg, dir, rows)?;
    limit_cost(cfg, dir, rows)?;
    urgent_claim(cfg, dir, rows)?;
    urgent_latency(cfg, dir, rows)?;
    Ok(())
}

/// A fresh path in `dir` (the file and its WAL removed).
fn fresh(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
    }
    p
}

/// How one dispatch run is set up: every `raised_every`-th event at
/// priority 5 (none when 0), and a limit on the events, if any.
struct Shape {
    label: &'static str,
    raised_every: usize,
    limit: Option<sqlite_outbox::Limit>,
}

/// Dispatch at the defaults (4 workers, FULL), no-op handler, of `n`
/// events set up as `shape`; returns seconds.
fn dispatch_shaped(path: &Path, n: usize, shape: &Shape) -> Res<f64> {
    let store = our_db(path, Durability::Full)?;
    for chunk in 0..n / 1000 {
        store.enqueue_batch(
            (0..1000)
                .map(|i| {
                    let k = chunk * 1000 + i;
                    match shape.raised_every {
                        0 => event(k),
                        every if k % every == 0 => event(k).with_priority(5),
                        _ => event(k),
                    }
                })
                .collect(),
        )?;
    }
    let t = Instant::now();
    let mut builder = Dispatcher::builder(store.clone()).handle("bench.event", |_: &Event| Ok(()));
    if let Some(limit) = &shape.limit {
        builder = builder.limit(limit.clone());
    }
    let dispatcher = builder.start()?;
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

/// Each of `shapes` against the raw loop on our schema, in `rounds`
/// rounds: a row each, the median ratio and its spread.
fn against_raw(
    cfg: &Config,
    dir: &Path,
    rows: &mut Vec<Row>,
    rounds: usize,
    shapes: &[Shape],
) -> Res<()> {
    let n = cfg.dispatch_n;
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); shapes.len()];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); shapes.len()];
    for _ in 0..rounds {
        let raw = dispatch_raw(
            &fresh(dir, "prio-raw.db"),
            n,
            "FULL",
            RawLoop::OurSchema,
            sqlite_outbox::DEFAULT_BATCH_SIZE,
        )?;
        for (i, shape) in shapes.iter().enumerate() {
            let secs = dispatch_shaped(&fresh(dir, &format!("prio-{i}.db")), n, shape)?;
            ratios[i].push(raw / secs);
            rates[i].push(n as f64 / secs);
        }
    }
    for (i, shape) in shapes.iter().enumerate() {
        let r = std::mem::take(&mut ratios[i]);
        let spread = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
            - r.iter().cloned().fold(f64::INFINITY, f64::min);
        let rate = median(std::mem::take(&mut rates[i]));
        let ratio = median(r);
        rows.push(Row {
            group: "priority",
            name: format!("dispatch, {}, 4 workers, FULL", shape.label),
            ours: rate,
            raw: Some(rate / ratio),
            unit: "ev/s",
            ratio: Some(ratio),
            note: format!(
                "{n} events; raw = the raw loop on our schema in each round; median of \
                 {rounds}, ratio spread {spread:.2}"
            ),
        });
    }
    Ok(())
}

/// Dispatch at the defaults with priorities unused (every event at 0) and
/// with 1 event in 100 raised.
fn unused_cost(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let shapes = [
        Shape {
            label: "priorities unused (all 0)",
            raised_every: 0,
            limit: None,
        },
        Shape {
            label: "1 event in 100 at priority 5",
            raised_every: 100,
            limit: None,
        },
    ];
    against_raw(cfg, dir, rows, if cfg.quick { 1 } else { 5 }, &shapes)
}

/// What a limit that never binds costs: dispatch under a concurrency
/// limit of 1,000 and a rate of a million a second.
fn limit_cost(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    use sqlite_outbox::{Limit, LimitScope};
    let limited = |label, limit| Shape {
        label,
        raised_every: 0,
        limit: Some(limit),
    };
    let per_second = Duration::from_secs(1);
    let shapes = [
        limited(
            "under a concurrency limit of 1000, per dispatcher (never binding)",
            Limit::concurrency(LimitScope::Type, "bench.event", 1000),
        ),
        limited(
            "under a concurrency limit of 1000, across dispatchers (never binding)",
            Limit::concurrency(LimitScope::Type, "bench.event", 1000).across_dispatchers(),
        ),
        limited(
            "under a rate limit of 1000000/s, across dispatchers (never binding)",
            Limit::rate(LimitScope::Type, "bench.event", 1_000_000, per_second)
                .across_dispatchers(),
        ),
    ];
    against_raw(cfg, dir, rows, if cfg.quick { 1 } else { 3 }, &shapes)
}

/// The claim of one new urgent event on an empty file and behind a
/// backlog of due events of priority 0: through the store (all types, and
/// one type named), and as the plain statement on the urgent index.
fn urgent_claim(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let backlog = cfg.scale_large;
    let tries = if cfg.quick { 50 } else { 500 };
    let lease = Duration::from_secs(60);
    let typed = ["bench.urgent".to_owned()];
    // (label, types): what the store is asked to claim.
    let shapes: [(&str, Option<&[String]>); 2] =
        [("any type", None), ("its type named", Some(&typed))];
    let empty = fill(&fresh(dir, "prio-empty.db"), 0, 0)?;
    let full = fill(&fresh(dir, "prio-backlog.db"), backlog, 0)?;
    // A claim does not wait for the disk (losing one only means the event
    // is claimed again): NORMAL, as the store's claims.
    let raw_full = raw_conn(&dir.join("prio-backlog.db"), "NORMAL")?;
    // Times one claim of a just-enqueued urgent event, `tries` times, and
    // completes each (untimed); returns the median µs.
    let time_ours = |store: &SqliteStore, types: Option<&[String]>| -> Res<f64> {
        let mut micros = Vec::with_capacity(tries);
        for i in 0..tries {
            let urgent =
                store.enqueue(NewEvent::new("bench.urgent", json!({ "i": i })).with_priority(9))?;
            let t = Instant::now();
            let claimed = store.claim(1, lease, types)?;
            micros.push(t.elapsed().as_secs_f64() * 1e6);
            let first = claimed.first().ok_or("nothing claimed")?;
            if first.id != urgent.id {
                return Err("the urgent event was not claimed first".into());
            }
            store.complete(&first.lease().ok_or("no lease")?)?;
        }
        Ok(median(micros))
    };
    let raw_claim = format!(
        "UPDATE outbox_events SET status = 'processing', attempts = attempts + 1,
           locked_at = ?1, locked_until = ?1 + 60000, lease_token = random()
         WHERE seq IN (SELECT seq FROM outbox_events
                       WHERE status = 'pending' AND priority > 0 AND next_attempt_at <= ?1
                       ORDER BY priority DESC, next_attempt_at, seq LIMIT 1)
         RETURNING {RAW_COLUMNS}"
    );
    // The plain statement on `store`'s file through `conn`.
    let time_raw = |store: &SqliteStore, conn: &Connection| -> Res<f64> {
        let mut micros = Vec::with_capacity(tries);
        for i in 0..tries {
            store.enqueue(NewEvent::new("bench.urgent", json!({ "i": i })).with_priority(9))?;
            let now = chrono::Utc::now().timestamp_millis();
            let t = Instant::now();
            let tx = conn.unchecked_transaction()?;
            let (seq, token): (i64, i64) = tx
                .prepare_cached(&raw_claim)?
                .query_row([now], |r| Ok((r.get(0)?, r.get(10)?)))?;
            tx.commit()?;
            micros.push(t.elapsed().as_secs_f64() * 1e6);
            conn.execute(
                "UPDATE outbox_events SET status = 'done', completed_at = ?3, locked_at = NULL,
                   locked_until = NULL, lease_token = NULL WHERE seq = ?1 AND lease_token = ?2",
                params![seq, token, now],
            )?;
        }
        Ok(median(micros))
    };
    for (label, types) in shapes {
        // A first round warms both files' caches and statements.
        time_ours(&empty, types)?;
        time_ours(&full, types)?;
        let on_empty = time_ours(&empty, types)?;
        let behind = time_ours(&full, types)?;
        rows.push(Row {
            group: "priority",
            name: format!("claim a new urgent event, {label}: empty file vs {backlog} due events of priority 0"),
            ours: behind,
            raw: None,
            unit: "µs",
            ratio: Some(on_empty / behind),
            note: format!(
                "median of {tries} claims; on an empty file {on_empty:.1} µs; ratio = empty / \
                 backlog (1.00: the backlog costs nothing)"
            ),
        });
    }
    let raw_empty = raw_conn(&dir.join("prio-empty.db"), "NORMAL")?;
    let behind = format!("behind {backlog} due events");
    for (label, store, conn) in [
        ("on an empty file", &empty, &raw_empty),
        (behind.as_str(), &full, &raw_full),
    ] {
        time_raw(store, conn)?;
        let ours = time_ours(store, None)?;
        let raw = time_raw(store, conn)?;
        rows.push(Row {
            group: "priority",
            name: format!("claim a new urgent event {label}: store vs plain statement"),
            ours,
            raw: Some(raw),
            unit: "µs",
            ratio: Some(raw / ours),
            note: format!(
                "median of {tries}; raw = one UPDATE … RETURNING on the urgent index, in its \
                 own transaction (it updates the same indexes, as deep as the file makes them)"
            ),
        });
    }
    // What the urgent index saves: the same order read from the due index.
    let scans = 3;
    let mut micros = Vec::with_capacity(scans);
    for _ in 0..scans {
        let now = chrono::Utc::now().timestamp_millis();
        let t = Instant::now();
        let _: Option<i64> = raw_full
            .query_row(
                "SELECT seq FROM outbox_events INDEXED BY outbox_events_due
                 WHERE status = 'pending' AND next_attempt_at <= ?1
                 ORDER BY priority DESC, next_attempt_at, seq LIMIT 1",
                [now],
                |r| r.get(0),
            )
            .ok();
        micros.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rows.push(Row {
        group: "priority",
        name: format!("without the urgent index: the first by priority among {backlog} due events"),
        ours: median(micros),
        raw: None,
        unit: "µs",
        ratio: None,
        note: format!("median of {scans}; a sort of the whole backlog on each claim"),
    });
    Ok(())
}

/// How long a new urgent event waits for its handler while a dispatcher
/// (the defaults) works through a backlog of priority 0, against an idle
/// dispatcher on an empty file.
fn urgent_latency(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let backlog = if cfg.quick { 100_000 } else { 200_000 };
    let samples = if cfg.quick { 10 } else { 40 };
    let mut results = Vec::new();
    for (label, pending) in [
        ("idle dispatcher, empty file", 0),
        ("busy dispatcher", backlog),
    ] {
        let store = fill(&fresh(dir, &format!("prio-lat-{pending}.db")), pending, 0)?;
        let waited: Arc<Mutex<Vec<f64>>> = Arc::default();
        let sink = Arc::clone(&waited);
        let dispatcher = Dispatcher::builder(store.clone())
            .handle("bench.event", |_: &Event| Ok(()))
            .handle("bench.urgent", move |e: &Event| {
                let waited = (chrono::Utc::now() - e.created_at).num_microseconds();
                if let (Some(us), Ok(mut v)) = (waited, sink.lock()) {
                    v.push(us as f64 / 1000.0);
                }
                Ok(())
            })
            .start()?;
        for i in 0..samples {
            std::thread::sleep(Duration::from_millis(20));
            store.enqueue(NewEvent::new("bench.urgent", json!({ "i": i })).with_priority(9))?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while waited.lock().map(|v| v.len()).unwrap_or(0) < samples && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let backlog_left = store.stats()?.pending;
        dispatcher.shutdown(Duration::from_secs(10));
        let mut v = waited.lock().map(|v| v.clone()).unwrap_or_default();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.len() < samples {
            return Err(format!("{label}: {} of {samples} urgent events handled", v.len()).into());
        }
        if pending > 0 && backlog_left == 0 {
            return Err("the backlog ran out before the last urgent event".into());
        }
        results.push((label, percentile(&v, 0.5), percentile(&v, 0.99)));
    }
    let idle_p50 = results[0].1;
    for (label, p50, p99) in results {
        rows.push(Row {
            group: "priority",
            name: format!("enqueue to handler of an urgent event, {label}"),
            ours: p50,
            raw: None,
            unit: "ms",
            ratio: None,
            note: format!(
                "p50 of {samples}; p99 {p99:.2} ms; {:.1}× the idle p50; busy = {backlog} \
                 due events of priority 0 being dispatched",
                p50 / idle_p50
            ),
        });
    }
    Ok(())
}
