//! Every example runs, and does what it says.

use std::time::Duration;

#[allow(dead_code, unreachable_pub)]
#[path = "../src/bin/outbox-demo/main.rs"]
mod quickstart;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/offline_sync.rs"]
mod offline_sync;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/dashboard.rs"]
mod dashboard;

#[cfg(feature = "postgres")]
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/grow_out.rs"]
mod grow_out;

#[cfg(all(feature = "http", feature = "nats"))]
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/sinks.rs"]
mod sinks;

#[cfg(any(feature = "postgres", feature = "nats"))]
mod common;

/// Notes in batches to a local sync server, orders to a real JetStream.
#[cfg(all(feature = "http", feature = "nats"))]
#[test]
fn sinks_deliver_in_batches_and_to_jetstream() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let server = sinks::SyncServer::start()?;
    let Some(nats) = common::brokers::Nats::start(dir.path())? else {
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let url = nats.url();
    let stream = rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await?);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await?;
        Ok::<_, Box<dyn std::error::Error>>(js)
    })?;
    let summary = sinks::run(&dir.path().join("app.db"), &server.url, Some(&url), 400)?;
    assert_eq!(summary.delivered, 440, "{summary:?}");
    assert_eq!(summary.orders, 40);
    let requests = server.requests();
    assert_eq!(requests.iter().sum::<usize>(), 400);
    assert!(
        requests.len() < 400 && requests.iter().all(|&n| n <= 50),
        "{requests:?}"
    );
    let held = rt.block_on(async {
        let mut s = stream.get_stream("ORDERS").await?;
        Ok::<_, Box<dyn std::error::Error>>(s.info().await?.state.messages)
    })?;
    assert_eq!(held, 40, "the stream holds each order once");
    Ok(())
}

/// The same program on a SQLite file and on a PostgreSQL server.
#[cfg(feature = "postgres")]
#[test]
fn grow_out_runs_unchanged_on_both_databases() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("orders.db");
    assert_eq!(grow_out::run(path.to_str().ok_or("path")?, 200)?, 200);
    if let Some(schema) = common::pg::Schema::fresh() {
        let done = grow_out::run_in(&schema.url, &schema.name, 200);
        schema
            .client()
            .batch_execute(&format!("DROP TABLE IF EXISTS {}_orders", schema.name))?;
        assert_eq!(done?, 200);
    }
    Ok(())
}

#[test]
fn quickstart_delivers_everything() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("demo.db");
    let summary = quickstart::run(path.to_str().ok_or("path")?, 600)?;
    // 600 orders, two events each; one order in 500 has a dead mailbox.
    assert_eq!(summary.done + summary.failed, 1_200);
    assert_eq!(summary.failed, 1);
    assert!(summary.retried > 0, "{summary:?}");
    Ok(())
}

#[test]
fn offline_sync_drains_each_document_in_order() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let pushed = offline_sync::run(&dir.path().join("notes.db"), 4, 15)?;
    assert_eq!(pushed.len(), 4);
    for (doc, revisions) in pushed {
        assert_eq!(
            revisions,
            (1..=15).collect::<Vec<u64>>(),
            "{doc} out of order"
        );
    }
    Ok(())
}

#[test]
fn dashboard_demo_leaves_something_to_look_at() -> Result<(), Box<dyn std::error::Error>> {
    use sqlite_outbox::{Operator, SqliteStore};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("demo.db");
    let made = dashboard::run(&path)?;
    let stats = SqliteStore::open(&path)?.stats()?;
    assert_eq!(stats.total(), made);
    assert!(stats.failed > 0 && stats.done > stats.failed, "{stats:?}");
    assert!(stats.processing == 3 && stats.due >= 40, "{stats:?}");
    assert!(
        stats.oldest_due_age >= Some(Duration::from_secs(50)),
        "{stats:?}"
    );
    Ok(())
}
