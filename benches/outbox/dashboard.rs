//! What the dashboard costs on a large outbox: a page of the events list
//! (`Operator::list_page`) for the filters the page offers, against the
//! raw query that returns the same rows; and, when the benchmark is built
//! with `--features cli`, whole pages over HTTP from `outbox ui`.
//!
//! ```text
//! cargo bench --features cli --bench outbox -- --only dashboard
//! ```

use std::io::{BufRead, BufReader};

use rusqlite::types::Value as SqlValue;
use sqlite_outbox::{ListFilter, Status};

use super::dispatch::median;
use super::*;

/// The dashboard's own bound on how far a page scans.
const SCAN: u64 = 200_000;
const PAGE: usize = 50;

/// `n` events over the last `n` × 10 ms: 1 in 1,000 failed with an error
/// naming its number, the newest 1 % pending, 20 processing, 1 in 100 with
/// an organisation, seven types.
fn fill(path: &Path, n: usize) -> Res<()> {
    let conn = raw_db(path, "OFF")?;
    let now = chrono::Utc::now().timestamp_millis();
    let n = i64::try_from(n)?;
    conn.execute(
        "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?1)
         INSERT INTO outbox_events (event_type, payload, status, attempts, next_attempt_at,
                                    completed_at, last_error, created_at, org_id, locked_at, locked_until)
         SELECT 'type.' || (i % 7),
                json_object('i', i, 'pad', 'abcdefghijklmnopqrstuvwxyz'),
                CASE WHEN i % 1000 = 0 THEN 'failed' WHEN i > ?1 - 20 THEN 'processing'
                     WHEN i > ?1 * 99 / 100 THEN 'pending' ELSE 'done' END,
                1,
                ?2 - (?1 - i) * 10,
                CASE WHEN i > ?1 * 99 / 100 AND i % 1000 <> 0 THEN NULL ELSE ?2 - (?1 - i) * 10 + 5 END,
                CASE WHEN i % 1000 = 0 THEN 'HTTP 503 from endpoint ' || i END,
                ?2 - (?1 - i) * 10,
                CASE WHEN i % 100 = 0 THEN '0191a2b3-0000-4000-8000-00000000000' || (i % 10) END,
                CASE WHEN i > ?1 - 20 THEN ?2 END,
                CASE WHEN i > ?1 - 20 THEN ?2 + 3600000 END
         FROM k",
        params![n, now],
    )?;
    Ok(())
}

/// The raw query for `filter`: the same rows, the same order, the same
/// window of sequence numbers, every column read.
fn raw_page(conn: &Connection, filter: &ListFilter, lo: i64, hi: i64) -> Res<usize> {
    let mut sql = String::from("SELECT * FROM outbox_events WHERE seq BETWEEN ?1 AND ?2");
    let mut args = vec![SqlValue::Integer(lo), SqlValue::Integer(hi)];
    let mut add = |clause: &str, v: SqlValue| {
        args.push(v);
        sql.push_str(&format!(" AND {clause}?{}", args.len()));
    };
    if let Some(s) = filter.status {
        add("status = ", SqlValue::Text(s.as_str().into()));
    }
    if let Some(t) = &filter.event_type {
        add("event_type = ", SqlValue::Text(t.clone()));
    }
    if let Some(o) = filter.org_id {
        add("org_id = ", SqlValue::Text(o.to_string()));
    }
    if let Some(e) = &filter.error_contains {
        add("0 < instr(last_error, ", SqlValue::Text(e.clone()));
        sql.push(')');
    }
    let order = if filter.newest_first { "DESC" } else { "ASC" };
    sql.push_str(&format!(" ORDER BY seq {order} LIMIT {}", filter.limit));
    let mut stmt = conn.prepare_cached(&sql)?;
    let cols = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
    let mut n = 0;
    while let Some(row) = rows.next()? {
        for c in 0..cols {
            let _ = row.get_ref(c)?;
        }
        n += 1;
    }
    Ok(n)
}

pub(crate) fn dashboard_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let n = if cfg.quick { 20_000 } else { 1_000_000 };
    let reps = if cfg.quick { 3 } else { 21 };
    let path = dir.join("dashboard.db");
    let t = Instant::now();
    fill(&path, n)?;
    println!(
        "dashboard: {n} events written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let store = SqliteStore::builder(&path).read_only(true).build()?;
    let raw = raw_conn(&path, "NORMAL")?;
    let (min, max): (i64, i64) =
        raw.query_row("SELECT min(seq), max(seq) FROM outbox_events", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let page = |f: ListFilter| ListFilter {
        limit: PAGE,
        newest_first: true,
        scan_limit: Some(SCAN),
        ..f
    };
    let deep = max - i64::try_from(n / 2)?;
    let cases: Vec<(&str, ListFilter)> = vec![
        ("newest page", page(ListFilter::default())),
        (
            "a page half way down (cursor)",
            page(ListFilter {
                after_seq: Some(deep),
                ..ListFilter::default()
            }),
        ),
        (
            "status failed (1 in 1,000)",
            page(ListFilter {
                status: Some(Status::Failed),
                ..ListFilter::default()
            }),
        ),
        (
            "status processing (20 events)",
            page(ListFilter {
                status: Some(Status::Processing),
                ..ListFilter::default()
            }),
        ),
        (
            "type and status pending",
            page(ListFilter {
                event_type: Some("type.3".into()),
                status: Some(Status::Pending),
                ..ListFilter::default()
            }),
        ),
        (
            "organisation (1 in 100)",
            page(ListFilter {
                org_id: Some("0191a2b3-0000-4000-8000-000000000000".parse()?),
                ..ListFilter::default()
            }),
        ),
        (
            "error text, no match (scan bound)",
            page(ListFilter {
                error_contains: Some("no such text".into()),
                ..ListFilter::default()
            }),
        ),
    ];
    for (name, filter) in &cases {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let mut shown = 0;
        for _ in 0..reps {
            let t = Instant::now();
            let got = store.list_page(filter)?;
            ours.push(t.elapsed().as_secs_f64() * 1e3);
            shown = got.events.len();
            // The raw query over the same window of sequence numbers.
            let hi = filter.after_seq.map_or(max, |a| a - 1);
            let lo = (hi - i64::try_from(SCAN)? + 1).max(min);
            let t = Instant::now();
            let n_raw = raw_page(&raw, filter, lo, hi)?;
            theirs.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(n_raw, shown, "{name}: the raw query found other rows");
        }
        let (o, r) = (median(ours), median(theirs));
        rows.push(Row {
            group: "dashboard",
            name: format!("list page, {n} events: {name}"),
            ours: o,
            raw: Some(r),
            unit: "ms",
            ratio: Some(r / o),
            note: format!("{shown} events; median of {reps}; ratio = raw / ours"),
        });
    }
    http_pages(cfg, &path, reps, n, &raw, rows)
}

/// Whole pages from `outbox ui`, over loopback HTTP, against the raw query
/// behind each.
fn http_pages(
    cfg: &Config,
    path: &Path,
    reps: usize,
    n: usize,
    raw: &Connection,
    rows: &mut Vec<Row>,
) -> Res<()> {
    let _ = cfg;
    // Cargo names the binary even when its feature is off; it is built
    // only with `--features cli`.
    let Some(bin) = option_env!("CARGO_BIN_EXE_outbox").filter(|p| Path::new(p).exists()) else {
        println!("dashboard: HTTP pages need `--features cli` (the outbox binary)");
        return Ok(());
    };
    let mut child = Command::new(bin)
        .arg("--db")
        .arg(path)
        .args(["ui", "--read-only", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .ok_or("no URL")?
        .trim_end_matches('/')
        .to_owned();
    let failed_id: String = raw.query_row(
        "SELECT id FROM outbox_events WHERE status = 'failed' ORDER BY seq DESC LIMIT 1",
        [],
        |r| r.get(0),
    )?;
    let result = (|| -> Res<()> {
        let agent = ureq::AgentBuilder::new().build();
        // The overview counts the whole outbox; it is cached for ten times
        // what the count cost, so this is the first (uncached) load.
        let t = Instant::now();
        agent.get(&format!("{base}/")).call()?.into_string()?;
        let first = t.elapsed().as_secs_f64() * 1e3;
        rows.push(Row {
            group: "dashboard",
            name: format!("overview over HTTP, {n} events, counted afresh"),
            ours: first,
            raw: None,
            unit: "ms",
            ratio: None,
            note: "one load: the counts read every row, then stay cached".into(),
        });
        for (name, url) in [
            ("events page, newest", "/events".to_owned()),
            (
                "events page, status failed",
                "/events?status=failed".to_owned(),
            ),
            (
                "events page, error text",
                "/events?error=503+from+endpoint+999".to_owned(),
            ),
            ("event page", format!("/events/{failed_id}")),
        ] {
            let mut times = Vec::new();
            for _ in 0..reps {
                let t = Instant::now();
                let body = agent.get(&format!("{base}{url}")).call()?.into_string()?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(body.contains("</html>"));
            }
            rows.push(Row {
                group: "dashboard",
                name: format!("{name} over HTTP, {n} events"),
                ours: median(times),
                raw: None,
                unit: "ms",
                ratio: None,
                note: format!("whole response; median of {reps}"),
            });
        }
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
