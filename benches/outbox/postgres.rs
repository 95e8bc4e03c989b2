//! `PostgresStore` beside raw `postgres` loops running the same SQL on the
//! same server, interleaved: enqueue (one per transaction with an app row,
//! and batched) and dispatch with a no-op handler. Runs when
//! `OUTBOX_TEST_POSTGRES` names a server (`scripts/postgres.sh start`).

use sqlite_outbox::postgres::{Client, NoTls};
use sqlite_outbox::PostgresStore;

use super::dispatch::median;
use super::*;

/// A fresh schema for one measurement, dropped when this is.
struct Fresh {
    url: String,
    name: String,
}

impl Fresh {
    fn new(url: &str, tag: &str) -> Fresh {
        Fresh {
            url: url.to_owned(),
            name: format!("bench_{tag}_{}", std::process::id()),
        }
    }

    fn store(&self) -> Res<PostgresStore> {
        self.drop_all()?;
        Ok(PostgresStore::builder(&self.url)
            .schema(&self.name)
            .build()?)
    }

    fn client(&self) -> Res<Client> {
        Ok(Client::connect(&self.url, NoTls)?)
    }

    fn drop_all(&self) -> Res<()> {
        self.client()?.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {0} CASCADE; DROP TABLE IF EXISTS {0}_app",
            self.name
        ))?;
        Ok(())
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let _ = self.drop_all();
    }
}

fn event(i: usize) -> NewEvent {
    NewEvent::new(
        "bench.event",
        json!({"i": i, "pad": "abcdefghijklmnopqrstuvwxyz0123456789"}),
    )
}

/// The parameters of the store's insert, for `event(i)` at `now`.
fn insert_params(i: usize, now: i64) -> (uuid::Uuid, String, i64) {
    let e = event(i);
    (e.id().as_uuid(), e.payload().to_string(), now)
}

/// How an event reaches the app's transaction.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    /// The store's insert, prepared on the app's connection by hand.
    Raw,
    /// `PostgresStore::enqueue_tx`.
    Store,
    /// `PreparedEnqueue::enqueue_tx`.
    Prepared,
}

/// One app row and one event per transaction, `n` times, `via` one of
/// the ways in.
fn enqueue_one(f: &Fresh, n: usize, via: Via) -> Res<f64> {
    let store = f.store()?;
    let mut app = f.client()?;
    app.batch_execute(&format!("CREATE TABLE {}_app (n bigint NOT NULL)", f.name))?;
    let app_insert = app.prepare(&format!("INSERT INTO {}_app VALUES ($1)", f.name))?;
    let insert = app.prepare(store.statement_text("insert").ok_or("no insert")?)?;
    let outbox = store.prepared();
    let t = Instant::now();
    for i in 0..n {
        let mut tx = app.transaction()?;
        tx.execute(&app_insert, &[&(i as i64)])?;
        if via == Via::Store {
            store.enqueue_tx(&mut tx, event(i))?;
        } else if via == Via::Prepared {
            outbox.enqueue_tx(&mut tx, event(i))?;
        } else {
            let (id, payload, now) = insert_params(i, chrono::Utc::now().timestamp_millis());
            tx.query(
                &insert,
                &[
                    &id,
                    &"bench.event",
                    &payload,
                    &10i64,
                    &now,
                    &None::<String>,
                    &None::<uuid::Uuid>,
                    &None::<uuid::Uuid>,
                    &None::<String>,
                    &None::<String>,
                    &now,
                    &None::<String>,
                ],
            )?;
        }
        tx.commit()?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// 100 events per transaction: ours through `enqueue_batch`, or the same
/// statement (all 100 in one insert) prepared.
fn enqueue_batched(f: &Fresh, n: usize, ours: bool) -> Res<f64> {
    let store = f.store()?;
    let mut raw = f.client()?;
    let insert = raw.prepare(store.statement_text("insert_all").ok_or("no insert")?)?;
    let t = Instant::now();
    for chunk in 0..n / 100 {
        if ours {
            store.enqueue_batch((0..100).map(|i| event(chunk * 100 + i)).collect())?;
        } else {
            let now = chrono::Utc::now().timestamp_millis();
            let (mut ids, mut payloads) = (Vec::new(), Vec::new());
            for i in 0..100 {
                let (id, payload, _) = insert_params(chunk * 100 + i, now);
                ids.push(id);
                payloads.push(payload);
            }
            let none_text: Vec<Option<String>> = vec![None; 100];
            let none_uuid: Vec<Option<uuid::Uuid>> = vec![None; 100];
            raw.query(
                &insert,
                &[
                    &ids,
                    &vec!["bench.event"; 100],
                    &payloads,
                    &vec![10i64; 100],
                    &vec![now; 100],
                    &none_text,
                    &none_uuid,
                    &none_uuid,
                    &none_text,
                    &none_text,
                    &now,
                    &none_text,
                ],
            )?;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

fn fill(store: &PostgresStore, n: usize) -> Res<()> {
    for chunk in 0..n.div_ceil(1000) {
        let k = 1000.min(n - chunk * 1000);
        store.enqueue_batch((0..k).map(|i| event(chunk * 1000 + i)).collect())?;
    }
    Ok(())
}

/// Our dispatcher at its defaults with a no-op handler over `n` events.
fn dispatch_ours(f: &Fresh, n: usize, workers: usize) -> Res<f64> {
    let store = f.store()?;
    fill(&store, n)?;
    let t = Instant::now();
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(workers)
        .handle("bench.event", |_: &Event| Ok(()))
        .start()?;
    while dispatcher.metrics().done < n as u64 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = t.elapsed().as_secs_f64();
    let report = dispatcher.shutdown(Duration::from_secs(10));
    if std::env::var("BENCH_VERBOSE").is_ok() {
        eprintln!("{workers} workers: {secs:.2} s, {:?}", report.metrics);
    }
    if store.stats()?.done != n as u64 || !report.is_clean() {
        return Err(format!("postgres dispatch incomplete: {report:?}").into());
    }
    Ok(secs)
}

/// The fastest plain loop doing the same work: one transaction completes
/// the last batch (the store's fenced `UPDATE` of many, prepared) and
/// claims the next (the store's claim, prepared), single-threaded.
fn dispatch_raw(f: &Fresh, n: usize) -> Res<f64> {
    let store = f.store()?;
    fill(&store, n)?;
    let mut c = f.client()?;
    let claim = c.prepare(store.statement_text("claim_due").ok_or("no claim")?)?;
    let done = c.prepare(store.statement_text("ack_done_all").ok_or("no ack")?)?;
    let batch = sqlite_outbox::DEFAULT_BATCH_SIZE as i64;
    let t = Instant::now();
    let (mut finished, mut held): (usize, Vec<(i64, i64)>) = (0, Vec::new());
    loop {
        let now = chrono::Utc::now().timestamp_millis();
        let mut tx = c.transaction()?;
        if !held.is_empty() {
            let seqs: Vec<i64> = held.iter().map(|h| h.0).collect();
            let tokens: Vec<i64> = held.iter().map(|h| h.1).collect();
            tx.execute(&done, &[&seqs, &tokens, &now])?;
        }
        finished += held.len();
        if finished >= n {
            tx.commit()?;
            break;
        }
        let rows = tx.query(
            &claim,
            &[
                &now,
                &(now + 60_000),
                &batch,
                &None::<Vec<&str>>,
                &None::<Vec<&str>>,
            ],
        )?;
        // What a handler would be given: the payload, and the lease.
        held = rows
            .iter()
            .map(|r| {
                let _payload: String = r.get(3);
                (r.get(0), r.get(10))
            })
            .collect();
        tx.commit()?;
    }
    Ok(t.elapsed().as_secs_f64())
}

pub(crate) fn postgres_benches(cfg: &Config, _dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let Ok(url) = std::env::var("OUTBOX_TEST_POSTGRES") else {
        println!("postgres: skipped (set OUTBOX_TEST_POSTGRES; scripts/postgres.sh start)");
        return Ok(());
    };
    let f = Fresh::new(&url, "b");
    let rounds = if cfg.quick { 1 } else { 3 };
    let (one_n, batch_n, disp_n) = if cfg.quick {
        (300, 2_000, 2_000)
    } else {
        (2_000, 20_000, 20_000)
    };
    // Per round, raw then ours, each measurement on a fresh schema.
    let mut pair = |name: String, n: usize, run: &dyn Fn(bool) -> Res<f64>| -> Res<()> {
        let (mut ours, mut raw, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let r = run(false)?;
            let o = run(true)?;
            raw.push(n as f64 / r);
            ours.push(n as f64 / o);
            ratios.push(r / o);
        }
        let spread = ratios.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
            - ratios.iter().cloned().fold(f64::INFINITY, f64::min);
        rows.push(Row {
            group: "postgres",
            name,
            ours: median(ours),
            raw: Some(median(raw)),
            unit: "ev/s",
            ratio: Some(median(ratios)),
            note: format!(
                "{n} events; median of {rounds} interleaved rounds; ratio spread {spread:.2}"
            ),
        });
        Ok(())
    };
    pair(
        "enqueue 1 event + 1 app row per tx, in the app's transaction".into(),
        one_n,
        &|ours| enqueue_one(&f, one_n, if ours { Via::Store } else { Via::Raw }),
    )?;
    pair(
        "enqueue 1 event + 1 app row per tx, in the app's transaction, through a PreparedEnqueue"
            .into(),
        one_n,
        &|ours| enqueue_one(&f, one_n, if ours { Via::Prepared } else { Via::Raw }),
    )?;
    pair("enqueue 100 events per tx".into(), batch_n, &|ours| {
        enqueue_batched(&f, batch_n, ours)
    })?;
    for workers in [1, 4] {
        pair(
            format!("dispatch, no-op handler, {workers} worker(s), defaults (raw: complete+claim in one tx)"),
            disp_n,
            &|ours| {
                if ours {
                    dispatch_ours(&f, disp_n, workers)
                } else {
                    dispatch_raw(&f, disp_n)
                }
            },
        )?;
    }
    Ok(())
}
