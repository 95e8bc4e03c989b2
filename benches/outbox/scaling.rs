//! How the cost of a claim and a completion grows with the rows in the file.

use super::*;

/// Microseconds per event of claim(100) + complete(100), over `rounds`.
pub(crate) fn claim_complete_cost(store: &SqliteStore, rounds: usize) -> Res<f64> {
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

pub(crate) fn scaling_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
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
