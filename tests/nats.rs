//! Publishing to a real NATS server with JetStream (`nats-server -js`,
//! from the distribution's package), started by each test on a free port
//! with its store in a temporary directory: from an app's own dispatcher
//! and from `outbox relay --nats`, with the server stopped and started
//! again, and the relay killed, in the middle of a run.
//!
//! What the server promises: JetStream acknowledges a publish once the
//! stream has stored it; it writes to its files at once but syncs them to
//! disk every two minutes by default, so a SIGKILL of the server (or a
//! power cut) may lose acknowledged messages. These tests stop the server
//! with SIGTERM, which flushes, so a message missing afterwards can only
//! be the outbox's fault.
#![cfg(feature = "nats")]

mod common;

use common::brokers::Nats;
use common::wait_until;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sqlite_outbox::sink::NatsJetStream;
use sqlite_outbox::{Dispatcher, NewEvent, Operator, SqliteStore, Status};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Creates stream `OUTBOX` on `outbox.>`, stored in files, with a
/// duplicate window of ten minutes.
fn create_stream(url: &str) -> Result {
    runtime()?.block_on(async {
        let client = async_nats::connect(url).await?;
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "OUTBOX".into(),
            subjects: vec!["outbox.>".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

/// Every message the stream holds, in stream order: (subject, headers,
/// body as JSON).
type Stored = (String, HashMap<String, String>, serde_json::Value);

fn stored(url: &str) -> Result<Vec<Stored>> {
    runtime()?.block_on(async {
        let client = async_nats::connect(url).await?;
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("OUTBOX").await?;
        let info = stream.info().await?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut out = Vec::new();
        if info.state.messages == 0 {
            return Ok(out);
        }
        for seq in first..=last {
            let m = stream.get_raw_message(seq).await?;
            let headers = m
                .headers
                .iter()
                .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                .collect();
            out.push((
                m.subject.to_string(),
                headers,
                serde_json::from_slice(&m.payload)?,
            ));
        }
        Ok::<_, Box<dyn std::error::Error>>(out)
    })
}

#[test]
fn every_event_reaches_the_stream_once_with_its_headers_in_key_order() -> Result {
    let dir = tempfile::tempdir()?;
    let Some(nats) = Nats::start(dir.path())? else {
        return Ok(());
    };
    create_stream(&nats.url())?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut ids = Vec::new();
    for i in 0..200 {
        let e = NewEvent::new("order.placed", json!({ "n": i }))
            .with_ordering_key(format!("customer-{}", i % 5))
            .with_correlation_id(format!("req-{i}"))
            .with_traceparent(tp);
        ids.push(store.enqueue(e)?.id);
    }
    let sink = NatsJetStream::builder(nats.url()).connect()?;
    let report = Dispatcher::builder(store.clone())
        .workers(4)
        .handle_with("order.placed", sink)
        .start()?
        .drain(Duration::from_secs(60));
    assert_eq!(report.metrics.done, 200, "{report:?}");
    let got = stored(&nats.url())?;
    assert_eq!(got.len(), 200);
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for (subject, headers, body) in &got {
        assert_eq!(subject, "outbox.order.placed");
        assert_eq!(headers.get("Nats-Msg-Id"), headers.get("Outbox-Event-Id"));
        assert_eq!(headers.get("traceparent").map(String::as_str), Some(tp));
        let n = body["payload"]["n"].as_i64().ok_or("no n")?;
        assert_eq!(
            headers.get("Outbox-Correlation-Id"),
            Some(&format!("req-{n}"))
        );
        let key = headers.get("Outbox-Ordering-Key").ok_or("no key")?;
        per_key.entry(key.clone()).or_default().push(n);
    }
    for (key, ns) in per_key {
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, sorted, "{key} out of order");
    }
    Ok(())
}

#[test]
fn no_stream_for_the_subject_is_a_retry_that_says_so() -> Result {
    let dir = tempfile::tempdir()?;
    let Some(nats) = Nats::start(dir.path())? else {
        return Ok(());
    };
    create_stream(&nats.url())?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    let e = store.enqueue(NewEvent::new("t", json!({})))?;
    let sink = NatsJetStream::builder(nats.url())
        .subject("elsewhere.{type}")
        .ack_timeout(Duration::from_secs(5))
        .connect()?;
    let report = Dispatcher::builder(store.clone())
        .handle_with("t", sink)
        .start()?
        .drain(Duration::from_secs(30));
    assert_eq!((report.metrics.done, report.metrics.retried), (0, 1));
    let e = store.find(e.id)?.ok_or("gone")?;
    assert_eq!(e.status, Status::Pending);
    let err = e.last_error.unwrap_or_default();
    assert!(
        err.contains("no JetStream stream") && err.contains("elsewhere.t"),
        "{err}"
    );
    assert!(stored(&nats.url())?.is_empty());
    Ok(())
}

#[test]
fn a_server_that_is_down_costs_no_attempts_and_is_waited_for() -> Result {
    let dir = tempfile::tempdir()?;
    let Some(mut nats) = Nats::start(dir.path())? else {
        return Ok(());
    };
    create_stream(&nats.url())?;
    let sink = NatsJetStream::builder(nats.url())
        .connect_timeout(Duration::from_secs(2))
        .connect()?;
    nats.down()?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    let e = store.enqueue(NewEvent::new("t", json!({})))?;
    let dispatcher = Dispatcher::builder(store.clone())
        .handle_with("t", sink)
        .start()?;
    wait_until(20, "the destination held back", || {
        Ok(!dispatcher.destinations().is_empty())
    })?;
    let held = store.find(e.id)?.ok_or("gone")?;
    assert_eq!(
        (held.status, held.attempts),
        (Status::Pending, 0),
        "{held:?}"
    );
    nats.up()?;
    wait_until(60, "delivery after the restart", || {
        Ok(store.find(e.id)?.map(|e| e.status) == Some(Status::Done))
    })?;
    dispatcher.shutdown(Duration::from_secs(5));
    assert_eq!(stored(&nats.url())?.len(), 1);
    Ok(())
}

#[cfg(feature = "cli")]
#[test]
fn the_relay_survives_a_kill_and_a_broker_restart_and_the_stream_keeps_one_of_each() -> Result {
    use common::cli::BIN;
    let dir = tempfile::tempdir()?;
    let Some(mut nats) = Nats::start(dir.path())? else {
        return Ok(());
    };
    create_stream(&nats.url())?;
    let db = dir.path().join("app.db");
    let store = SqliteStore::open(&db)?;
    let n = 2000;
    store.enqueue_batch(
        (0..n)
            .map(|i| NewEvent::new("t", json!({ "n": i })).with_ordering_key(format!("k{}", i % 7)))
            .collect(),
    )?;
    let url = nats.url();
    let relay = |drain: bool| -> std::io::Result<Child> {
        let mut cmd = Command::new(BIN);
        cmd.arg("--db")
            .arg(&db)
            .args(["relay", "--nats", &url, "--poll", "50ms", "--lease", "3s"]);
        if drain {
            cmd.arg("--drain");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    };
    // Killed in the middle of the run.
    let mut first = relay(false)?;
    wait_until(60, "a first part delivered", || {
        Ok(store.stats()?.done >= 300)
    })?;
    first.kill()?;
    first.wait()?;
    // The broker restarted under a running relay.
    let mut second = relay(false)?;
    wait_until(60, "more delivered", || Ok(store.stats()?.done >= 900))?;
    nats.down()?;
    std::thread::sleep(Duration::from_millis(500));
    nats.up()?;
    wait_until(120, "everything delivered", || Ok(store.stats()?.done == n))?;
    second.kill()?;
    second.wait()?;
    // Every event once in the stream: the redeliveries the kill caused were
    // dropped by the duplicate window.
    let got = stored(&nats.url())?;
    let mut seen = std::collections::HashSet::new();
    for (_, headers, _) in &got {
        assert!(seen.insert(headers.get("Nats-Msg-Id").cloned().ok_or("no id")?));
    }
    assert_eq!(
        got.len(),
        usize::try_from(n)?,
        "the stream holds {}",
        got.len()
    );
    // And a drain now has nothing to do.
    let status = relay(true)?.wait()?;
    assert!(status.success());
    Ok(())
}

#[test]
fn cloudevents_over_nats_read_back_with_the_reference_sdk() -> Result {
    use cloudevents::AttributesReader;
    let dir = tempfile::tempdir()?;
    let Some(nats) = Nats::start(dir.path())? else {
        return Ok(());
    };
    create_stream(&nats.url())?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    let structured = store.enqueue(NewEvent::new("s", json!({ "n": 1 })).with_ordering_key("k"))?;
    let binary = store.enqueue(NewEvent::new("b", json!({ "n": 2 })))?;
    let source = "/edge/7".to_owned();
    let report = Dispatcher::builder(store.clone())
        .handle_with(
            "s",
            NatsJetStream::builder(nats.url())
                .format(sqlite_outbox::sink::Format::CloudEvents {
                    source: source.clone(),
                })
                .connect()?,
        )
        .handle_with(
            "b",
            NatsJetStream::builder(nats.url())
                .format(sqlite_outbox::sink::Format::CloudEventsBinary {
                    source: source.clone(),
                })
                .connect()?,
        )
        .start()?
        .drain(Duration::from_secs(30));
    assert_eq!(report.metrics.done, 2);
    let got = stored(&nats.url())?;
    let (_, headers, body) = got
        .iter()
        .find(|(s, _, _)| s == "outbox.s")
        .ok_or("no structured event")?;
    assert_eq!(
        headers.get("Content-Type").map(String::as_str),
        Some("application/cloudevents+json")
    );
    let ce: cloudevents::Event = serde_json::from_value(body.clone())?;
    assert_eq!(ce.id(), structured.id.to_string());
    assert_eq!(ce.source().as_str(), source);
    assert_eq!(
        ce.extension("partitionkey")
            .map(ToString::to_string)
            .as_deref(),
        Some("k")
    );
    let (_, headers, body) = got
        .iter()
        .find(|(s, _, _)| s == "outbox.b")
        .ok_or("no binary event")?;
    // Binary mode: the payload as it is, the attributes as ce- headers.
    assert_eq!(body, &json!({ "n": 2 }));
    assert_eq!(headers.get("ce-id"), Some(&binary.id.to_string()));
    assert_eq!(
        headers.get("ce-specversion").map(String::as_str),
        Some("1.0")
    );
    assert_eq!(headers.get("ce-type").map(String::as_str), Some("b"));
    Ok(())
}

/// Over TLS: with the CA that signed the server's certificate, events are
/// published (by the library and by `relay --broker-ca`); with another CA
/// nothing is, no attempt is spent, and the reason says TLS.
#[test]
fn tls_with_the_right_ca_delivers_and_with_another_delivers_nothing() -> Result {
    let dir = tempfile::tempdir()?;
    let certs = common::brokers::Certificates::make(dir.path())?;
    let Some(nats) = Nats::start_tls(dir.path(), &certs)? else {
        return Ok(());
    };
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let count = || -> Result<u64> {
        let ca = certs.ca.clone();
        let url = url.clone();
        runtime()?.block_on(async move {
            let client = async_nats::ConnectOptions::new()
                .add_root_certificates(ca)
                .require_tls(true)
                .connect(url.as_str())
                .await?;
            let js = async_nats::jetstream::new(client);
            let stream = js
                .get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: "OUTBOX".into(),
                    subjects: vec!["outbox.>".into()],
                    ..Default::default()
                })
                .await?;
            Ok::<_, Box<dyn std::error::Error>>(stream.cached_info().state.messages)
        })
    };
    assert_eq!(count()?, 0);
    let db = dir.path().join("app.db");
    let store = SqliteStore::open(&db)?;
    for i in 0..20 {
        store.enqueue(NewEvent::new("t", json!({ "n": i })))?;
    }
    let sink = NatsJetStream::builder(url.clone())
        .ca_file(&certs.ca)
        .connect()?;
    let report = Dispatcher::builder(store.clone())
        .fallback_with(sink)
        .start()?
        .drain(Duration::from_secs(60));
    assert_eq!(report.metrics.done, 20, "{report:?}");
    assert_eq!(count()?, 20);

    for i in 0..10 {
        store.enqueue(NewEvent::new("t", json!({ "later": i })))?;
    }
    let relay = |ca: &std::path::Path| {
        std::process::Command::new(common::cli::BIN)
            .arg("--db")
            .arg(&db)
            .args(["relay", "--nats", &url, "--drain", "--broker-ca"])
            .arg(ca)
            .output()
    };
    let out = relay(&certs.other_ca)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("unreachable") && err.contains("tls"), "{err}");
    assert_eq!(
        count()?,
        20,
        "nothing went to a server that did not prove itself"
    );
    let waiting = store.stats()?.pending;
    assert_eq!(waiting, 10);
    let out = relay(&certs.ca)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count()?, 30);
    Ok(())
}
