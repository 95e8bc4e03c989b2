//! Sinks: a backlog delivered by a dispatcher with each sink (what `outbox
//! relay` runs), beside a raw publish loop with the same client, the same
//! acks and the same messages; and HTTP in batches of 100 beside one event
//! per request on the same local server.
//!
//! Needs `--features cli` (the sinks) and `nats-server`, `mosquitto` on
//! the PATH: the group starts its own, on loopback, with their data in the
//! benchmark's directory.

use sqlite_outbox::sink::{Format, HttpSink, MqttSink, NatsJetStream};
use sqlite_outbox::{Handler, MemoryStore};

use super::*;

#[path = "../../tests/common/brokers.rs"]
#[allow(dead_code, unreachable_pub)]
mod brokers;

/// The pipelining window of the raw loops: the sinks' default.
const WINDOW: usize = 256;

pub(crate) fn sink_benches(cfg: &Config, dir: &Path, rows: &mut Vec<Row>) -> Res<()> {
    let n = if cfg.quick { 3_000 } else { 100_000 };
    let rounds = if cfg.quick { 1 } else { 3 };
    jetstream(dir, n, rounds, rows)?;
    mqtt(dir, n, rounds, rows)?;
    http(dir, if cfg.quick { 1_000 } else { 20_000 }, rounds, rows)?;
    Ok(())
}

/// `n` events of the benchmark's shape, enqueued in a fresh store of each
/// kind: the file for the dispatcher, memory for the raw loop's messages.
fn backlog(path: &Path, n: usize) -> Res<(SqliteStore, Vec<Event>)> {
    let store = our_db(path, Durability::Full)?;
    let scratch = MemoryStore::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        store.enqueue_batch(chunk.iter().map(|&i| event(i)).collect())?;
        scratch.enqueue_batch(chunk.iter().map(|&i| event(i)).collect())?;
    }
    let events = scratch.list(&sqlite_outbox::ListFilter {
        limit: usize::MAX,
        ..Default::default()
    })?;
    Ok((store, events))
}

/// Seconds for a dispatcher with `sink` to deliver everything in `store`.
fn drain(store: &SqliteStore, sink: impl Handler) -> Res<f64> {
    let t = Instant::now();
    let report = Dispatcher::builder(store.clone())
        .fallback_with(sink)
        .start()?
        .drain(Duration::from_secs(1_800));
    let secs = t.elapsed().as_secs_f64();
    if !report.idle || report.metrics.retried + report.metrics.failed > 0 {
        return Err(format!("the backlog did not drain cleanly: {report:?}").into());
    }
    Ok(secs)
}

/// One claimed row, as a raw loop hands it to its publisher: id, type,
/// the envelope's body.
type RawEvent = (String, String, String);

/// The fastest plain loop doing the dispatcher's whole work on the crate's
/// own table (at `synchronous=FULL`, as `our_db`): claim up to `window`
/// due rows under a lease, `publish` them (which returns once all are
/// acknowledged), then mark them done in the transaction that claims the
/// next ones. Seconds for `n` events, filled beforehand.
fn raw_outbox_loop(
    path: &Path,
    n: usize,
    window: usize,
    mut publish: impl FnMut(&[RawEvent]) -> Res<()>,
) -> Res<f64> {
    let mut conn = raw_db(path, "FULL")?;
    {
        let tx = conn.transaction()?;
        for i in 0..n {
            raw_insert(&tx, i)?;
        }
        tx.commit()?;
    }
    let claim = "UPDATE outbox_events SET status = 'processing', attempts = attempts + 1,
           locked_at = ?1, locked_until = ?1 + 60000, lease_token = random()
         WHERE seq IN (SELECT seq FROM outbox_events
                       WHERE status = 'pending' AND next_attempt_at <= ?1
                       ORDER BY next_attempt_at, seq LIMIT ?2 + 0)
         RETURNING seq, lease_token, id, event_type, payload, attempts, created_at";
    let done_sql = "UPDATE outbox_events SET status = 'done', completed_at = ?3, locked_at = NULL,
           locked_until = NULL, lease_token = NULL
         WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'";
    let t = Instant::now();
    let (mut done, mut held): (usize, Vec<(i64, i64)>) = (0, Vec::new());
    loop {
        let now = chrono::Utc::now().timestamp_millis();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (seq, token) in &held {
            tx.prepare_cached(done_sql)?
                .execute(params![seq, token, now])?;
        }
        done += held.len();
        let rows: Vec<(i64, i64, RawEvent)> = tx
            .prepare_cached(claim)?
            .query_map(params![now, window as i64], |r| {
                let (id, ty, payload): (String, String, String) = (r.get(2)?, r.get(3)?, r.get(4)?);
                let created = chrono::DateTime::from_timestamp_millis(r.get(6)?).unwrap_or_default();
                let body = json!({
                    "id": id,
                    "type": ty,
                    "payload": serde_json::from_str::<serde_json::Value>(&payload).unwrap_or_default(),
                    "attempt": r.get::<_, i64>(5)?,
                    "correlation_id": null,
                    "created_at": created,
                })
                .to_string();
                Ok((r.get(0)?, r.get(1)?, (id, ty, body)))
            })?
            .collect::<Result<_, _>>()?;
        tx.commit()?;
        if rows.is_empty() {
            break;
        }
        let events: Vec<RawEvent> = rows.iter().map(|(_, _, e)| e.clone()).collect();
        publish(&events)?;
        held = rows
            .into_iter()
            .map(|(seq, token, _)| (seq, token))
            .collect();
    }
    if done != n {
        return Err(format!("the raw loop completed {done} of {n}").into());
    }
    Ok(t.elapsed().as_secs_f64())
}

fn rate_row(rows: &mut Vec<Row>, name: &str, n: usize, (ours, raw): (f64, f64), note: &str) {
    let (o, r) = (n as f64 / ours, n as f64 / raw);
    println!(
        "sinks | {name}: ours {o:.0} ev/s, raw {r:.0} ev/s, {:.2}",
        o / r
    );
    rows.push(Row {
        group: "sinks",
        name: name.to_owned(),
        ours: o,
        raw: Some(r),
        unit: "ev/s",
        ratio: Some(o / r),
        note: note.to_owned(),
    });
}

fn jetstream(dir: &Path, n: usize, rounds: usize, rows: &mut Vec<Row>) -> Res<()> {
    let Some(server) = brokers::Nats::start(dir)? else {
        return Ok(());
    };
    let url = server.url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let js = rt.block_on(async {
        let client = async_nats::connect(url.as_str()).await?;
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["outbox.>".into(), "raw.>".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
        Ok::<_, Box<dyn std::error::Error>>(js)
    })?;
    let sink = NatsJetStream::builder(url.as_str()).connect()?;
    let per = n / rounds;
    let mut times = (0.0, 0.0);
    for r in 0..rounds {
        let (store, events) = backlog(&dir.join(format!("nats-{r}.db")), per)?;
        times.0 += drain(&store, sink.clone())?;
        let t = Instant::now();
        rt.block_on(async {
            for window in events.chunks(WINDOW) {
                let mut acks = Vec::with_capacity(window.len());
                for e in window {
                    let message = Format::Envelope.message(e);
                    let mut h = async_nats::HeaderMap::new();
                    let id = e.id.to_string();
                    h.insert("Content-Type", message.content_type);
                    h.insert("Nats-Msg-Id", id.as_str());
                    h.insert("Outbox-Event-Id", id.as_str());
                    h.insert("Outbox-Event-Type", e.event_type.as_str());
                    h.insert("Outbox-Attempt", "1");
                    let subject = format!("raw.{}", e.event_type);
                    acks.push(
                        js.publish_with_headers(subject, h, message.body.into())
                            .await?,
                    );
                }
                for ack in acks {
                    if ack.await?.stream.is_empty() {
                        return Err("an ack without a stream".into());
                    }
                }
            }
            Ok::<_, Box<dyn std::error::Error>>(())
        })?;
        times.1 += t.elapsed().as_secs_f64();
    }
    let mut same_work = 0.0;
    for r in 0..rounds {
        same_work += raw_outbox_loop(
            &dir.join(format!("nats-raw-{r}.db")),
            per,
            WINDOW,
            |events| {
                rt.block_on(async {
                    let mut acks = Vec::with_capacity(events.len());
                    for (id, ty, body) in events {
                        let mut h = async_nats::HeaderMap::new();
                        h.insert("Content-Type", "application/json");
                        h.insert("Nats-Msg-Id", id.as_str());
                        h.insert("Outbox-Event-Id", id.as_str());
                        h.insert("Outbox-Event-Type", ty.as_str());
                        h.insert("Outbox-Attempt", "1");
                        let subject = format!("raw.{ty}");
                        acks.push(
                            js.publish_with_headers(subject, h, body.clone().into())
                                .await?,
                        );
                    }
                    for ack in acks {
                        ack.await?;
                    }
                    Ok::<_, Box<dyn std::error::Error>>(())
                })
            },
        )?;
    }
    rate_row(
        rows,
        &format!("JetStream, {n} events, vs a raw outbox loop"),
        n,
        (times.0, same_work),
        "dispatcher + NatsJetStream vs a plain rusqlite + async-nats loop doing the same work: claim 256 from the crate's table, publish them, await the acks, mark them done (FULL)",
    );
    rate_row(
        rows,
        &format!("JetStream, {n} events, file stream"),
        n,
        times,
        "dispatcher + NatsJetStream (256 publishes in flight) vs an async-nats loop publishing the same messages 256 at a time, awaiting each ack (no database)",
    );
    drop(server);
    Ok(())
}

fn mqtt(dir: &Path, n: usize, rounds: usize, rows: &mut Vec<Row>) -> Res<()> {
    let Some(broker) = brokers::Mosquitto::start(dir)? else {
        return Ok(());
    };
    let url = broker.url();
    let sink = MqttSink::builder(&url)?.connect()?;
    // The raw loop: the same client, its connection driven on a thread,
    // PUBACKs counted.
    let mut options = rumqttc::v5::MqttOptions::new("bench-raw", "127.0.0.1", broker.port);
    options.set_keep_alive(Duration::from_secs(30));
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    let (client, mut connection) = rumqttc::v5::Client::new(options, WINDOW);
    let (acked, acks) = crossbeam_channel::unbounded::<()>();
    std::thread::spawn(move || {
        for ev in connection.iter() {
            match ev {
                Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_))) => {
                    let _ = acked.send(());
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    let per = n / rounds;
    let mut times = (0.0, 0.0);
    for r in 0..rounds {
        let (store, events) = backlog(&dir.join(format!("mqtt-{r}.db")), per)?;
        times.0 += drain(&store, sink.clone())?;
        let t = Instant::now();
        for window in events.chunks(WINDOW) {
            for e in window {
                let message = Format::Envelope.message(e);
                let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    user_properties: vec![
                        ("outbox-event-id".to_owned(), e.id.to_string()),
                        ("outbox-event-type".to_owned(), e.event_type.clone()),
                        ("outbox-attempt".to_owned(), "1".to_owned()),
                    ],
                    content_type: Some(message.content_type.to_owned()),
                    payload_format_indicator: Some(1),
                    ..Default::default()
                };
                client.publish_with_properties(
                    format!("raw/{}", e.event_type),
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    message.body,
                    properties,
                )?;
            }
            for _ in window {
                acks.recv_timeout(Duration::from_secs(60))
                    .map_err(|_| "PUBACKs stopped coming")?;
            }
        }
        times.1 += t.elapsed().as_secs_f64();
    }
    let mut same_work = 0.0;
    for r in 0..rounds {
        same_work += raw_outbox_loop(
            &dir.join(format!("mqtt-raw-{r}.db")),
            per,
            WINDOW,
            |events| {
                for (id, ty, body) in events {
                    let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
                        user_properties: vec![
                            ("outbox-event-id".to_owned(), id.clone()),
                            ("outbox-event-type".to_owned(), ty.clone()),
                            ("outbox-attempt".to_owned(), "1".to_owned()),
                        ],
                        content_type: Some("application/json".to_owned()),
                        payload_format_indicator: Some(1),
                        ..Default::default()
                    };
                    client.publish_with_properties(
                        format!("raw/{ty}"),
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        false,
                        body.clone(),
                        properties,
                    )?;
                }
                for _ in events {
                    acks.recv_timeout(Duration::from_secs(60))
                        .map_err(|_| "PUBACKs stopped coming")?;
                }
                Ok(())
            },
        )?;
    }
    rate_row(
        rows,
        &format!("MQTT QoS 1, {n} events, vs a raw outbox loop"),
        n,
        (times.0, same_work),
        "dispatcher + MqttSink vs a plain rusqlite + rumqttc loop doing the same work: claim 256, publish, wait for the PUBACKs, mark them done (FULL)",
    );
    rate_row(
        rows,
        &format!("MQTT QoS 1, {n} events, Mosquitto"),
        n,
        times,
        "dispatcher + MqttSink (256 in flight) vs a rumqttc loop publishing the same messages 256 at a time, waiting for their PUBACKs (no database)",
    );
    drop(broker);
    Ok(())
}

/// A local endpoint on four threads that, like a receiver that keeps what
/// it accepts, appends each body to a file and syncs it before answering
/// 204.
fn endpoint(dir: &Path) -> Res<(String, Arc<tiny_http::Server>)> {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(|e| e.to_string())?);
    let port = server
        .server_addr()
        .to_ip()
        .map(|a| a.port())
        .ok_or("no port")?;
    for i in 0..4 {
        let s = Arc::clone(&server);
        let mut file = std::fs::File::create(dir.join(format!("received-{i}")))?;
        std::thread::spawn(move || {
            while let Ok(mut req) = s.recv() {
                let mut body = Vec::new();
                let _ = std::io::Read::read_to_end(req.as_reader(), &mut body);
                let kept =
                    std::io::Write::write_all(&mut file, &body).and_then(|()| file.sync_data());
                let code = if kept.is_ok() { 204 } else { 503 };
                let _ = req.respond(tiny_http::Response::empty(code));
            }
        });
    }
    Ok((format!("http://127.0.0.1:{port}/events"), server))
}

fn http(dir: &Path, n: usize, rounds: usize, rows: &mut Vec<Row>) -> Res<()> {
    let (url, server) = endpoint(dir)?;
    let single = HttpSink::builder(&url)?.build()?;
    let batched = HttpSink::builder(&url)?.batch(100).build()?;
    let agent = ureq::AgentBuilder::new().build();
    let per = n / rounds;
    let (mut one, mut hundred, mut raw, mut same_work) = (0.0, 0.0, 0.0, 0.0);
    for r in 0..rounds {
        let (store, _) = backlog(&dir.join(format!("http-1-{r}.db")), per)?;
        one += drain(&store, single.clone())?;
        let (store, events) = backlog(&dir.join(format!("http-100-{r}.db")), per)?;
        hundred += drain(&store, batched.clone())?;
        let t = Instant::now();
        for chunk in events.chunks(100) {
            let bodies: Vec<String> = chunk
                .iter()
                .map(|e| Format::Envelope.message(e).body)
                .collect();
            agent
                .post(&url)
                .set("Content-Type", "application/json")
                .send_string(&format!("[{}]", bodies.join(",")))?;
        }
        raw += t.elapsed().as_secs_f64();
        same_work += raw_outbox_loop(&dir.join(format!("http-raw-{r}.db")), per, 100, |events| {
            let bodies: Vec<&str> = events.iter().map(|(_, _, b)| b.as_str()).collect();
            agent
                .post(&url)
                .set("Content-Type", "application/json")
                .send_string(&format!("[{}]", bodies.join(",")))?;
            Ok(())
        })?;
    }
    rate_row(
        rows,
        &format!("HTTP --batch 100 vs one per request, {n} events"),
        n,
        (hundred, one),
        "dispatcher + HttpSink: batches of 100 vs one event per request (4 workers each), same local server (4 threads, each request written and synced to a file before its 204); the ratio is the gain",
    );
    rate_row(
        rows,
        &format!("HTTP --batch 100, {n} events"),
        n,
        (hundred, raw),
        "dispatcher + HttpSink, batches of 100 vs a ureq loop posting the same arrays of 100 one after another",
    );
    rate_row(
        rows,
        &format!("HTTP --batch 100, {n} events, vs a raw outbox loop"),
        n,
        (hundred, same_work),
        "dispatcher + HttpSink, batches of 100 vs a plain rusqlite + ureq loop doing the same work: claim 100, post them, mark them done (FULL)",
    );
    server.unblock();
    Ok(())
}
