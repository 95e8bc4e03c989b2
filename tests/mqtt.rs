//! Publishing to a real MQTT broker (Mosquitto, from the distribution's
//! package), started by each test on a free port with persistence in a
//! temporary directory, and read back by a subscriber with a persistent
//! session at QoS 1.
//!
//! What the broker promises: a PUBACK at QoS 1 means Mosquitto took the
//! message and queued it for every matching subscription, including
//! persistent sessions that are offline; with `persistence true` it writes
//! its state to disk when it stops (SIGTERM) and every `autosave_interval`,
//! so a SIGKILL of the broker could lose what it acknowledged. These tests
//! stop it with SIGTERM: a message missing afterwards is the outbox's.
#![cfg(feature = "mqtt")]

mod common;

use common::brokers::Mosquitto;
use common::wait_until;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlite_outbox::sink::MqttSink;
use sqlite_outbox::{Dispatcher, NewEvent, Operator, SqliteStore, Status};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// What a subscriber received: (topic, user properties, body).
type Received = Arc<Mutex<Vec<(String, HashMap<String, String>, serde_json::Value)>>>;

/// `mosquitto_sub` on `outbox/#` at QoS 1 with MQTT 5 and a persistent
/// session, which keeps receiving across broker restarts; ready once it
/// has seen a message published after it started.
fn subscribe(port: u16) -> Result<(Received, Child)> {
    let got: Received = Arc::default();
    let mut child = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "outbox/#",
            "-q",
            "1",
        ])
        .args(["-V", "mqttv5", "-c", "-i", "test-subscriber", "-x", "3600"])
        .args(["-F", "%t|%P|%p"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let sink = Arc::clone(&got);
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            let mut parts = line.splitn(3, '|');
            let (Some(topic), Some(props), Some(body)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let props = props
                .split(' ')
                .filter_map(|kv| kv.split_once(':'))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            let body = serde_json::from_str(body).unwrap_or_default();
            if let Ok(mut g) = sink.lock() {
                g.push((topic.to_owned(), props, body));
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                "outbox/_ready",
                "-q",
                "1",
                "-m",
                "{}",
            ])
            .status()?;
        std::thread::sleep(Duration::from_millis(100));
        let mut g = got.lock().map_err(|_| "poisoned")?;
        if g.iter().any(|(t, _, _)| t == "outbox/_ready") {
            g.clear();
            break;
        }
        if Instant::now() > deadline {
            return Err("mosquitto_sub never subscribed".into());
        }
    }
    Ok((got, child))
}

/// Ends a subscriber.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_event_arrives_with_its_properties_in_key_order() -> Result {
    let dir = tempfile::tempdir()?;
    let Some(broker) = Mosquitto::start(dir.path())? else {
        return Ok(());
    };
    let (got, sub) = subscribe(broker.port)?;
    let _sub = Reap(sub);
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    for i in 0..200 {
        store.enqueue(
            NewEvent::new("order.placed", json!({ "n": i }))
                .with_ordering_key(format!("customer-{}", i % 5))
                .with_correlation_id(format!("req-{i}")),
        )?;
    }
    let sink = MqttSink::builder(&broker.url())?.connect()?;
    let report = Dispatcher::builder(store.clone())
        .workers(4)
        .handle_with("order.placed", sink)
        .start()?
        .drain(Duration::from_secs(60));
    assert_eq!(report.metrics.done, 200, "{report:?}");
    wait_until(20, "every message at the subscriber", || {
        Ok(got.lock().map_err(|_| "poisoned")?.len() >= 200)
    })?;
    let got = got.lock().map_err(|_| "poisoned")?.clone();
    let mut first: HashMap<i64, usize> = HashMap::new();
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for (topic, props, body) in &got {
        assert_eq!(topic, "outbox/order.placed");
        let n = body["payload"]["n"].as_i64().ok_or("no n")?;
        assert_eq!(
            props.get("outbox-correlation-id"),
            Some(&format!("req-{n}"))
        );
        assert_eq!(
            props.get("outbox-event-id").map(String::as_str),
            body["id"].as_str()
        );
        if first.insert(n, 0).is_none() {
            let key = props.get("outbox-ordering-key").ok_or("no key")?;
            per_key.entry(key.clone()).or_default().push(n);
        }
    }
    assert_eq!(first.len(), 200);
    for (key, ns) in per_key {
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, sorted, "{key}: first arrivals out of order");
    }
    Ok(())
}

#[test]
fn a_broker_that_is_down_costs_no_attempts_and_is_waited_for() -> Result {
    let dir = tempfile::tempdir()?;
    let Some(mut broker) = Mosquitto::start(dir.path())? else {
        return Ok(());
    };
    let (got, sub) = subscribe(broker.port)?;
    let _sub = Reap(sub);
    let sink = MqttSink::builder(&broker.url())?.connect()?;
    broker.down()?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    let e = store.enqueue(NewEvent::new("t", json!({})))?;
    let dispatcher = Dispatcher::builder(store.clone())
        .handle_with("t", sink)
        .start()?;
    wait_until(20, "the destination held back", || {
        Ok(!dispatcher.destinations().is_empty())
    })?;
    wait_until(20, "the event given back", || {
        Ok(store.find(e.id)?.map(|e| e.status) == Some(Status::Pending))
    })?;
    assert_eq!(store.find(e.id)?.map(|e| e.attempts), Some(0));
    broker.up()?;
    wait_until(60, "delivery after the restart", || {
        Ok(store.find(e.id)?.map(|e| e.status) == Some(Status::Done))
    })?;
    dispatcher.shutdown(Duration::from_secs(5));
    wait_until(20, "the subscriber", || {
        Ok(!got.lock().map_err(|_| "poisoned")?.is_empty())
    })?;
    Ok(())
}

#[cfg(feature = "cli")]
#[test]
fn the_relay_survives_a_kill_and_a_broker_restart_and_every_event_arrives() -> Result {
    use common::cli::BIN;
    let dir = tempfile::tempdir()?;
    let Some(mut broker) = Mosquitto::start(dir.path())? else {
        return Ok(());
    };
    let (got, sub) = subscribe(broker.port)?;
    let _sub = Reap(sub);
    let db = dir.path().join("app.db");
    let store = SqliteStore::open(&db)?;
    let n: u64 = 2000;
    store.enqueue_batch(
        (0..n)
            .map(|i| NewEvent::new("t", json!({ "n": i })).with_ordering_key(format!("k{}", i % 7)))
            .collect(),
    )?;
    let url = broker.url();
    let relay = || -> std::io::Result<Child> {
        Command::new(BIN)
            .arg("--db")
            .arg(&db)
            .args(["relay", "--mqtt", &url, "--mqtt-client-id", "relay-1"])
            .args(["--poll", "50ms", "--lease", "3s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    };
    let mut first = relay()?;
    wait_until(60, "a first part delivered", || {
        Ok(store.stats()?.done >= 300)
    })?;
    first.kill()?;
    first.wait()?;
    let mut second = relay()?;
    wait_until(60, "more delivered", || Ok(store.stats()?.done >= 900))?;
    broker.down()?;
    std::thread::sleep(Duration::from_millis(500));
    broker.up()?;
    wait_until(120, "everything delivered", || Ok(store.stats()?.done == n))?;
    second.kill()?;
    second.wait()?;
    // Every event arrived at least once; the kill may have sent some twice.
    let distinct = || -> Result<usize> {
        let g = got.lock().map_err(|_| "poisoned")?;
        let ids: std::collections::HashSet<_> = g
            .iter()
            .filter_map(|(_, p, _)| p.get("outbox-event-id").cloned())
            .collect();
        Ok(ids.len())
    };
    if wait_until(30, "every event at the subscriber", || {
        Ok(distinct()? as u64 == n)
    })
    .is_err()
    {
        return Err(format!("{} of {n} events reached the subscriber", distinct()?).into());
    }
    let total = got.lock().map_err(|_| "poisoned")?.len();
    eprintln!(
        "{n} events, {total} arrivals ({} duplicates)",
        total as u64 - n
    );
    Ok(())
}

/// Over TLS (`mqtts://`): with the CA that signed the broker's certificate
/// events are published and acknowledged; with another CA nothing is, no
/// attempt is spent, and the reason names the certificate.
#[test]
fn tls_with_the_right_ca_delivers_and_with_another_delivers_nothing() -> Result {
    let dir = tempfile::tempdir()?;
    let certs = common::brokers::Certificates::make(dir.path())?;
    let Some(broker) = Mosquitto::start_tls(dir.path(), &certs)? else {
        return Ok(());
    };
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    for i in 0..20 {
        store.enqueue(NewEvent::new("t", json!({ "n": i })))?;
    }
    let refused = MqttSink::builder(&url)?
        .ca_file(&certs.other_ca)
        .connect()?;
    let dispatcher = Dispatcher::builder(store.clone())
        .fallback_with(refused)
        .start()?;
    wait_until(20, "the destination held back", || {
        Ok(!dispatcher.destinations().is_empty())
    })?;
    let held = dispatcher.destinations();
    dispatcher.shutdown(Duration::from_secs(5));
    let why = held[0].last_error.clone().unwrap_or_default();
    assert!(
        why.contains("not connected") && why.contains("ertificate"),
        "{why}"
    );
    let stats = store.stats()?;
    assert_eq!((stats.pending, stats.done), (20, 0));
    assert!(store
        .list(&sqlite_outbox::ListFilter::default())?
        .iter()
        .all(|e| e.attempts == 0));

    let sink = MqttSink::builder(&url)?.ca_file(&certs.ca).connect()?;
    let report = Dispatcher::builder(store.clone())
        .fallback_with(sink)
        .start()?
        .drain(Duration::from_secs(60));
    assert_eq!(report.metrics.done, 20, "{report:?}");
    Ok(())
}

/// A broker that wants a password: the relay's, from a file and the
/// environment, gets events through; a wrong one holds them back without
/// spending attempts, and no password shows in what the relay prints.
#[cfg(feature = "cli")]
#[test]
fn a_password_from_a_file_gets_in_and_a_wrong_one_never_shows() -> Result {
    use common::cli::BIN;
    let dir = tempfile::tempdir()?;
    let Some(broker) = Mosquitto::start_auth(dir.path(), "relay", "pa55-w0rd-right")? else {
        return Ok(());
    };
    let db = dir.path().join("app.db");
    let store = SqliteStore::open(&db)?;
    for i in 0..5 {
        store.enqueue(NewEvent::new("t", json!({ "n": i })))?;
    }
    let relay = |password: &str| -> Result<std::process::Output> {
        let file = dir.path().join("password");
        std::fs::write(&file, format!("{password}\n"))?;
        Ok(Command::new(BIN)
            .arg("--db")
            .arg(&db)
            .args([
                "relay",
                "--mqtt",
                &broker.url(),
                "--drain",
                "--mqtt-password-file",
            ])
            .arg(&file)
            .env("OUTBOX_MQTT_USER", "relay")
            .output()?)
    };
    let out = relay("pa55-w0rd-wrong")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(!text.contains("pa55-w0rd"), "{text}");
    assert!(text.contains("unreachable"), "{text}");
    let stats = store.stats()?;
    assert_eq!((stats.pending, stats.done), (5, 0));
    let out = relay("pa55-w0rd-right")?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(store.stats()?.done, 5);
    Ok(())
}
