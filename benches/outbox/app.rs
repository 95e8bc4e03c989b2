//! Dispatch in the shape of a real app: several event types, each with a
//! handler that deserialises its payload, beside the raw loop on our table
//! doing the same parse.

use std::hint::black_box;

use super::dispatch::{median, raw_loop, RawLoop};
use super::*;
use sqlite_outbox::DEFAULT_BATCH_SIZE;

/// What every handler (and the raw loop) reads out of a payload.
#[derive(serde::Deserialize)]
struct Order {
    i: u64,
    customer: String,
    note: String,
}

/// Parses a payload as an app would and reads its fields.
fn parse(payload: &str) -> Result<u64, serde_json::Error> {
    let order: Order = serde_json::from_str(payload)?;
    Ok(order.i + order.customer.len() as u64 + order.note.len() as u64)
}

/// The handlers a dispatcher registers.
#[derive(Clone, Copy)]
enum Handlers {
    /// One handler for each of this many types (the file holds them all,
    /// in turn).
    PerType(usize),
    /// One fallback handler for everything; the file holds 4 types.
    CatchAll,
}

impl Handlers {
    fn types_in_file(self) -> usize {
        match self {
            Handlers::PerType(n) => n,
            Handlers::CatchAll => 4,
        }
    }

    fn label(self) -> String {
        match self {
            Handlers::PerType(1) => "1 type".into(),
            Handlers::PerType(n) => format!("{n} types"),
            Handlers::CatchAll => "4 types, one catch-all handler".into(),
        }
    }
}

/// One of our runs: the handlers, workers and payload size.
#[derive(Clone, Copy)]
struct Shape {
    handlers: Handlers,
    workers: usize,
    payload: usize,
}

impl Shape {
    fn label(self, durability: &str) -> String {
        format!(
            "{}, {}-byte payloads parsed, {} worker(s), {durability}",
            self.handlers.label(),
            self.payload,
            self.workers
        )
    }
}

const SHAPES: [Shape; 7] = [
    Shape {
        handlers: Handlers::PerType(1),
        workers: 1,
        payload: 200,
    },
    Shape {
        handlers: Handlers::PerType(4),
        workers: 1,
        payload: 200,
    },
    Shape {
        handlers: Handlers::PerType(4),
        workers: 4,
        payload: 200,
    },
    Shape {
        handlers: Handlers::PerType(16),
        workers: 1,
        payload: 200,
    },
    Shape {
        handlers: Handlers::CatchAll,
        workers: 1,
        payload: 200,
    },
    Shape {
        handlers: Handlers::PerType(4),
        workers: 1,
        payload: 2048,
    },
    Shape {
        handlers: Handlers::PerType(4),
        workers: 4,
        payload: 2048,
    },
];

/// Writes `n` due events of `types` types in turn (`app.t0`, `app.t1`,
/// ...), each payload an `Order` of about `bytes` bytes, in one
/// transaction on `conn`.
fn fill_app(conn: &Connection, n: usize, types: usize, bytes: usize) -> Res<()> {
    // `{"i":N,"customer":"customer-N","note":"…"}` around the note.
    let note = bytes.saturating_sub(60).max(1);
    let now = chrono::Utc::now().timestamp_millis() - 1000;
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?1)
         INSERT INTO outbox_events (event_type, payload, status, next_attempt_at, created_at)
         SELECT 'app.t' || (i % ?2),
                json_object('i', i, 'customer', 'customer-' || i,
                            'note', substr(replace(hex(zeroblob(?3)), '0', 'ab'), 1, ?3)),
                'pending', ?4, ?4
         FROM n",
        params![n as i64, types as i64, note as i64, now],
    )?;
    Ok(())
}

fn fresh(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
    }
    p
}

/// Our dispatcher at the crate's defaults over `n` events of `shape`;
/// returns its seconds.
fn ours(path: &Path, n: usize, shape: Shape, durability: Durability) -> Res<f64> {
    let store = our_db(path, durability)?;
    fill_app(
        &raw_conn(path, "OFF")?,
        n,
        shape.handlers.types_in_file(),
        shape.payload,
    )?;
    let handler = |e: &Event| {
        let order: Order = e.payload_as()?;
        black_box(order.i + order.customer.len() as u64 + order.note.len() as u64);
        Ok(())
    };
    let mut builder = Dispatcher::builder(store.clone()).workers(shape.workers);
    builder = match shape.handlers {
        Handlers::PerType(types) => {
            (0..types).fold(builder, |b, t| b.handle(format!("app.t{t}"), handler))
        }
        Handlers::CatchAll => builder.fallback(handler),
    };
    let t = Instant::now();
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

/// The faster of the two raw loops on our table (claim and complete in
/// separate transactions, or fused), each parsing every payload as the
/// handlers do; returns its seconds.
fn raw(dir: &Path, n: usize, (types, payload): (usize, usize), sync: &str) -> Res<f64> {
    let mut fastest = f64::INFINITY;
    for kind in [RawLoop::OurSchema, RawLoop::OurSchemaFused] {
        let path = fresh(dir, &format!("app-raw-{sync}.db"));
        let mut conn = raw_db(&path, sync)?;
        fill_app(&conn, n, types, payload)?;
        let secs = raw_loop(&mut conn, n, kind, DEFAULT_BATCH_SIZE, |p| {
            black_box(parse(p).unwrap_or(0));
        })?;
        fastest = fastest.min(secs);
    }
    Ok(fastest)
}

/// Dispatches `n` events of `types` types with 200-byte payloads at the
/// crate's defaults, at NORMAL (a target for profilers).
pub(crate) fn child_app(path: &str, n: usize, types: usize, workers: usize) -> Res<()> {
    let shape = Shape {
        handlers: Handlers::PerType(types),
        workers,
        payload: 200,
    };
    let secs = ours(Path::new(path), n, shape, Durability::Normal)?;
    println!("{n} events in {secs:.3} s: {:.0} ev/s", n as f64 / secs);
    Ok(())
}

pub(crate) fn app_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let n = cfg.dispatch_n;
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(if cfg.quick { 1 } else { 5 });
    for (label, durability, sync) in [
        ("NORMAL", Durability::Normal, "NORMAL"),
        ("FULL", Durability::Full, "FULL"),
    ] {
        // Per round: the raw loop for each file (types and payload size),
        // then each shape; a ratio is ours / the raw loop on the same kind
        // of file in its round (with more types, each claim and outcome
        // writes more stretches of the by-type index, in either).
        let files: Vec<(usize, usize)> = SHAPES.iter().fold(Vec::new(), |mut f, s| {
            let key = (s.handlers.types_in_file(), s.payload);
            if !f.contains(&key) {
                f.push(key);
            }
            f
        });
        let mut raws: HashMap<(usize, usize), Vec<f64>> = HashMap::new();
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); SHAPES.len()];
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); SHAPES.len()];
        for _ in 0..rounds {
            let mut raw_secs = HashMap::new();
            for &file in &files {
                let secs = raw(dir, n, file, sync)?;
                raws.entry(file).or_default().push(n as f64 / secs);
                raw_secs.insert(file, secs);
            }
            for (k, shape) in SHAPES.iter().enumerate() {
                let secs = ours(
                    &fresh(dir, &format!("app-{label}.db")),
                    n,
                    *shape,
                    durability,
                )?;
                rates[k].push(n as f64 / secs);
                ratios[k].push(raw_secs[&(shape.handlers.types_in_file(), shape.payload)] / secs);
            }
        }
        for &(types, payload) in &files {
            let rate = median(raws.remove(&(types, payload)).unwrap_or_default());
            rows.push(Row {
                group: "app",
                name: format!(
                    "raw loop, our table, {types} type(s), {payload}-byte payloads parsed, batch {DEFAULT_BATCH_SIZE}, {label}"
                ),
                ours: rate,
                raw: None,
                unit: "ev/s",
                ratio: None,
                note: format!(
                    "{:.1} µs/event; the faster of the two loops in each round; median of {rounds}",
                    1e6 / rate
                ),
            });
        }
        for (k, shape) in SHAPES.iter().enumerate() {
            let rate = median(rates[k].clone());
            let r = &ratios[k];
            let (lo, hi) = r
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                    (lo.min(*x), hi.max(*x))
                });
            let ratio = median(r.clone());
            rows.push(Row {
                group: "app",
                name: shape.label(label),
                ours: rate,
                raw: Some(rate / ratio),
                unit: "ev/s",
                ratio: Some(ratio),
                note: format!(
                    "{n} events; {:.1} µs/event; ratio median of {rounds} rounds, range {lo:.2}–{hi:.2}",
                    1e6 / rate
                ),
            });
        }
    }
    Ok(())
}
