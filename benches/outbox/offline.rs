//! Offline-first delivery: what a week without network costs, how fast a
//! backlog flows when the network returns, and whether one destination that
//! is down slows the others.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sqlite_outbox::{Clock, HandlerError, ManualClock};

use super::idle::{cpu_time, idle_cpu};
use super::*;

/// A destination that can be taken down; counts calls and deliveries.
#[derive(Clone, Default)]
struct Remote {
    down: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    delivered: Arc<AtomicU64>,
    first_at: Arc<Mutex<Option<Instant>>>,
    last_at: Arc<Mutex<Option<Instant>>>,
}

impl Remote {
    fn handler(&self) -> impl Fn(&Event) -> Result<(), HandlerError> + Send + Sync + 'static {
        let me = self.clone();
        move |_: &Event| {
            me.calls.fetch_add(1, Ordering::Relaxed);
            if me.down.load(Ordering::SeqCst) {
                return Err(HandlerError::unavailable("connection refused"));
            }
            let now = Some(Instant::now());
            if let Ok(mut f) = me.first_at.lock() {
                f.get_or_insert(Instant::now());
            }
            if let Ok(mut l) = me.last_at.lock() {
                *l = now;
            }
            me.delivered.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> Res<bool>) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !done()? {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn three_destinations(store: &SqliteStore, n: usize) -> Res<()> {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        store.enqueue_batch(
            chunk
                .iter()
                .map(|i| {
                    NewEvent::new(
                        format!("dest{}", i % 3),
                        json!({"n": i, "pad": "x".repeat(150)}),
                    )
                    .with_ordering_key(format!("key{}", i % 100))
                })
                .collect(),
        )?;
    }
    Ok(())
}

pub(crate) fn offline_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let n = if cfg.quick { 2_000 } else { 10_000 };
    week_offline(n, dir, rows)?;
    cpu_while_offline(cfg, n, dir, rows)?;
    one_down_does_not_slow_the_other(cfg, dir, rows)?;
    Ok(())
}

/// A week on a manual clock, step by step as the dispatcher plans its
/// probes, then `set_online(true)` and the backlog flows.
fn week_offline(n: usize, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let clock = ManualClock::new();
    let store = SqliteStore::builder(dir.join("week.db"))
        .durability(Durability::Normal)
        .clock(Arc::new(clock.clone()))
        .build()?;
    three_destinations(&store, n)?;
    let remotes: Vec<Remote> = (0..3).map(|_| Remote::default()).collect();
    for r in &remotes {
        r.down.store(true, Ordering::SeqCst);
    }
    let mut builder = Dispatcher::builder(store.clone()).workers(4);
    for (i, r) in remotes.iter().enumerate() {
        builder = builder.handle(format!("dest{i}"), r.handler());
    }
    let dispatcher = builder.start()?;
    let calls = || {
        remotes
            .iter()
            .map(|r| r.calls.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let settled = || -> Res<bool> {
        Ok(store.stats()?.processing == 0
            && dispatcher.destinations().len() == 3
            && dispatcher
                .destinations()
                .iter()
                .all(|d| d.next_probe_at.is_some()))
    };
    wait_for("all three held back", settled)?;
    let size = |p: &Path| -> u64 {
        let wal = p.with_extension("db-wal");
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
            + std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
    };
    let db_path = dir.join("week.db");
    let size_before = size(&db_path);
    let before_week = calls();
    let start = clock.now();
    let end = start + chrono::Duration::days(7);
    let mut steps = 0u64;
    // Jump to each next planned probe, as a sleeping laptop's clock would.
    while clock.now() < end {
        let next = dispatcher
            .destinations()
            .iter()
            .filter_map(|d| d.next_probe_at)
            .min()
            .ok_or("no probe planned")?;
        clock.set(next.max(clock.now()) + chrono::Duration::milliseconds(1));
        let before = calls();
        dispatcher.wake();
        wait_for("a probe", || Ok(calls() > before))?;
        wait_for("the probe answered", settled)?;
        steps += 1;
    }
    let probes = calls() - before_week;
    let size_after = size(&db_path);
    let stats = store.stats()?;
    let (spent, failed) = (stats_attempts(&store)?, stats.failed);
    for r in &remotes {
        r.down.store(false, Ordering::SeqCst);
    }
    let resumed = Instant::now();
    dispatcher.set_online(true);
    let report = dispatcher.drain(Duration::from_secs(600));
    let first = remotes
        .iter()
        .filter_map(|r| r.first_at.lock().ok().and_then(|f| *f))
        .min()
        .ok_or("nothing delivered")?;
    let last = remotes
        .iter()
        .filter_map(|r| r.last_at.lock().ok().and_then(|f| *f))
        .max()
        .ok_or("nothing delivered")?;
    let delivered: u64 = remotes
        .iter()
        .map(|r| r.delivered.load(Ordering::Relaxed))
        .sum();
    if delivered != n as u64 || report.metrics.failed != 0 {
        return Err(format!("after the week: {delivered} of {n} delivered, {report:?}").into());
    }
    let to_last = last - resumed;
    rows.push(Row {
        group: "offline",
        name: format!("a week offline, {n} events, 3 destinations: handler calls (probes)"),
        ours: probes as f64,
        raw: None,
        unit: "calls",
        ratio: None,
        note: format!(
            "{steps} probe steps (1 s doubling to 5 min, ±10 %), {} per destination per day at \
             the cap; {spent} attempts spent, {failed} failed; file and WAL {:.1} MiB before \
             the week, {:.1} MiB after",
            24 * 60 / 5,
            size_before as f64 / 1048576.0,
            size_after as f64 / 1048576.0
        ),
    });
    rows.push(Row {
        group: "offline",
        name: "back online: first delivery after set_online(true)".into(),
        ours: (first - resumed).as_secs_f64() * 1000.0,
        raw: None,
        unit: "ms",
        ratio: None,
        note: String::new(),
    });
    rows.push(Row {
        group: "offline",
        name: format!("back online: last of {n} delivered"),
        ours: to_last.as_secs_f64() * 1000.0,
        raw: None,
        unit: "ms",
        ratio: None,
        note: format!(
            "{:.0} events/s, in per-key order (100 keys), NORMAL",
            n as f64 / to_last.as_secs_f64()
        ),
    });
    // The plain dispatch rate of the same backlog, for comparison.
    let plain = SqliteStore::builder(dir.join("plain.db"))
        .durability(Durability::Normal)
        .build()?;
    three_destinations(&plain, n)?;
    let remote = Remote::default();
    let mut builder = Dispatcher::builder(plain.clone()).workers(4);
    for i in 0..3 {
        builder = builder.handle(format!("dest{i}"), remote.handler());
    }
    let started = Instant::now();
    let report = builder.start()?.drain(Duration::from_secs(600));
    let plain_rate = report.metrics.done as f64 / started.elapsed().as_secs_f64();
    let ours = n as f64 / to_last.as_secs_f64();
    rows.push(Row {
        group: "offline",
        name: "backlog after a week offline vs the same backlog never offline".into(),
        ours,
        raw: Some(plain_rate),
        unit: "events/s",
        ratio: Some(ours / plain_rate),
        note: "raw column: the plain dispatch rate of a fresh backlog".into(),
    });
    Ok(())
}

fn stats_attempts(store: &SqliteStore) -> Res<u64> {
    Ok(store
        .list(&sqlite_outbox::ListFilter {
            limit: usize::MAX,
            ..sqlite_outbox::ListFilter::default()
        })?
        .iter()
        .map(|e| u64::from(e.attempts))
        .sum())
}

/// CPU time while three destinations are unreachable and `n` events wait,
/// on the real clock, beside an idle dispatcher over the same time.
fn cpu_while_offline(cfg: &Config, n: usize, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let secs = if cfg.quick { 2 } else { 10 };
    let store = our_db(&dir.join("down.db"), Durability::Full)?;
    three_destinations(&store, n)?;
    let remote = Remote::default();
    remote.down.store(true, Ordering::SeqCst);
    let mut builder = Dispatcher::builder(store.clone());
    for i in 0..3 {
        builder = builder.handle(format!("dest{i}"), remote.handler());
    }
    let dispatcher = builder.start()?;
    wait_for("held back", || {
        Ok(dispatcher.destinations().len() == 3 && store.stats()?.processing == 0)
    })?;
    let before = cpu_time()?;
    let calls_before = remote.calls.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(secs));
    let used = cpu_time()? - before;
    let probes = remote.calls.load(Ordering::Relaxed) - calls_before;
    dispatcher.shutdown(Duration::from_secs(5));

    let idle = idle_cpu(&dir.join("idle2.db"), secs)?;
    rows.push(Row {
        group: "offline",
        name: format!("CPU while 3 destinations are down and {n} events wait"),
        ours: used.as_secs_f64() * 1000.0 / secs as f64,
        raw: Some(idle),
        unit: "ms CPU/s",
        ratio: None,
        note: format!(
            "raw column: an idle dispatcher over the same {secs} s; {probes} probes in the \
             window; 10 ms resolution"
        ),
    });
    Ok(())
}

/// Two destinations: B's throughput alone, and while A (with as many
/// events) refuses every connection.
fn one_down_does_not_slow_the_other(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let n = if cfg.quick { 2_000 } else { 20_000 };
    let rounds = if cfg.quick { 1 } else { 3 };
    let mut solo_rates = Vec::new();
    let mut with_down_rates = Vec::new();
    for round in 0..rounds {
        for with_a_down in [false, true] {
            let store = SqliteStore::builder(dir.join(format!("ab-{round}-{with_a_down}.db")))
                .durability(Durability::Normal)
                .build()?;
            let kinds: &[&str] = if with_a_down { &["a", "b"] } else { &["b"] };
            for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
                store.enqueue_batch(
                    chunk
                        .iter()
                        .flat_map(|i| {
                            kinds
                                .iter()
                                .map(move |k| NewEvent::new(*k, json!({"n": i})))
                        })
                        .collect(),
                )?;
            }
            let (a, b) = (Remote::default(), Remote::default());
            a.down.store(true, Ordering::SeqCst);
            let started = Instant::now();
            let dispatcher = Dispatcher::builder(store.clone())
                .workers(4)
                .handle("a", a.handler())
                .handle("b", b.handler())
                .start()?;
            wait_for("b delivered", || {
                Ok(b.delivered.load(Ordering::Relaxed) == n as u64)
            })?;
            let rate = n as f64 / started.elapsed().as_secs_f64();
            dispatcher.shutdown(Duration::from_secs(5));
            if with_a_down {
                with_down_rates.push(rate);
            } else {
                solo_rates.push(rate);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (solo, with_down) = (median(&mut solo_rates), median(&mut with_down_rates));
    let spread = solo_rates.last().copied().unwrap_or(solo) / solo_rates[0] - 1.0;
    rows.push(Row {
        group: "offline",
        name: format!("destination B, {n} events, while A is down (vs B alone)"),
        ours: with_down,
        raw: Some(solo),
        unit: "events/s",
        ratio: Some(with_down / solo),
        note: format!(
            "raw column: B alone; medians of {rounds} interleaved rounds, B-alone spread {:.0} %",
            spread * 100.0
        ),
    });
    Ok(())
}
