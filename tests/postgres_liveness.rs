//! A `LISTEN` connection that goes deaf without an error (a half-open TCP
//! connection, a failover proxy, a pooler that stops forwarding) must not
//! stop the pickup of other processes' events: a real server behind a
//! real TCP proxy that, once the store's listener has subscribed, swallows
//! everything on that one connection in both directions.
#![cfg(feature = "postgres")]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlite_outbox::{Dispatcher, NewEvent, PostgresStore};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Forwards `127.0.0.1:port` to the server; the connection that sends
/// `LISTEN` gets its answer, then goes silent (`frozen` is set).
fn freezing_proxy(server: &str, frozen: Arc<AtomicBool>) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let server = server.to_owned();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(upstream) = TcpStream::connect(&server) else {
                continue;
            };
            let listening = Arc::new(AtomicBool::new(false));
            let deaf = Arc::new(AtomicBool::new(false));
            let (c2, u2) = (client.try_clone(), upstream.try_clone());
            let (Ok(c2), Ok(u2)) = (c2, u2) else { continue };
            // Client to server: watch for LISTEN.
            {
                let (listening, deaf) = (listening.clone(), deaf.clone());
                std::thread::spawn(move || {
                    pump(client, u2, |chunk| {
                        if chunk.windows(6).any(|w| w == b"LISTEN") {
                            listening.store(true, Ordering::SeqCst);
                        }
                        deaf.load(Ordering::SeqCst)
                    })
                });
            }
            // Server to client: after LISTEN's answer, nothing more.
            let frozen = frozen.clone();
            std::thread::spawn(move || {
                pump(upstream, c2, |_| {
                    if deaf.load(Ordering::SeqCst) {
                        return true;
                    }
                    if listening.load(Ordering::SeqCst) {
                        deaf.store(true, Ordering::SeqCst);
                        frozen.store(true, Ordering::SeqCst);
                    }
                    false
                })
            });
        }
    });
    Ok(port)
}

/// Copies `from` to `to`, chunk by chunk, dropping a chunk when `drop_it`
/// says so (the connection stays open: nothing is closed or reset).
fn pump(mut from: TcpStream, mut to: TcpStream, mut drop_it: impl FnMut(&[u8]) -> bool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !drop_it(&buf[..n]) && to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn a_deaf_listen_connection_delays_pickup_by_no_more_than_a_poll() -> Result {
    let Some(schema) = common::pg::Schema::fresh() else {
        return Ok(());
    };
    let Ok(tcp) = std::env::var("OUTBOX_TEST_POSTGRES_TLS") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but scripts/postgres.sh's TCP server is not set"
        );
        return Ok(());
    };
    let port = tcp
        .split_whitespace()
        .find_map(|w| w.strip_prefix("port="))
        .ok_or("no port")?;
    let frozen = Arc::new(AtomicBool::new(false));
    let proxy = freezing_proxy(&format!("127.0.0.1:{port}"), frozen.clone())?;
    // Plain text through the proxy, so that it can see the LISTEN.
    let through =
        format!("host=127.0.0.1 port={proxy} user=postgres dbname=postgres sslmode=disable");
    let store = PostgresStore::builder(&through)
        .schema(&schema.name)
        .build()?;
    let poll = Duration::from_millis(500);
    let (tx, rx) = crossbeam_channel::unbounded();
    let dispatcher = Dispatcher::builder(store.clone())
        .poll_interval(poll)
        .handle("t", move |_| {
            let _ = tx.send(Instant::now());
            Ok(())
        })
        .start()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !frozen.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the listener never subscribed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Another process writes, straight to the server: its notice goes to
    // the deaf connection.
    let other = PostgresStore::builder(&schema.url)
        .schema(&schema.name)
        .build()?;
    let mut took = Vec::new();
    for _ in 0..3 {
        let sent = Instant::now();
        other.enqueue(NewEvent::new("t", json!({})))?;
        let handled = rx.recv_timeout(Duration::from_secs(30))?;
        took.push(handled.saturating_duration_since(sent));
    }
    eprintln!("picked up after {took:?} with the listener deaf (poll {poll:?})");
    for t in &took {
        // Two poll intervals, with room for a busy machine; the fault this
        // guards against waited for TCP keepalive (two hours).
        // (The bound leaves a busy machine room: the fault waited hours,
        // and the recv above gives up at 30 s.)
        assert!(*t < Duration::from_secs(15), "{took:?}");
    }
    dispatcher.shutdown(Duration::from_secs(5));
    Ok(())
}

/// Forwards every connection to `listener` to the server, as it is.
fn forward(listener: TcpListener, server: String) {
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(upstream) = TcpStream::connect(&server) else {
                continue;
            };
            let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || pump(client, u2, |_| false));
            std::thread::spawn(move || pump(upstream, c2, |_| false));
        }
    });
}

#[cfg(feature = "cli")]
#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn a_relay_started_before_its_server_waits_for_it() -> Result {
    use std::process::{Command, Stdio};
    let Some(schema) = common::pg::Schema::fresh() else {
        return Ok(());
    };
    let Ok(tcp) = std::env::var("OUTBOX_TEST_POSTGRES_TLS") else {
        return Ok(());
    };
    let port = tcp
        .split_whitespace()
        .find_map(|w| w.strip_prefix("port="))
        .ok_or("no port")?
        .to_owned();
    let store = PostgresStore::builder(&schema.url)
        .schema(&schema.name)
        .build()?;
    let e = store.enqueue(NewEvent::new("t", json!({})))?;
    // A port where nothing listens yet: the server is "restarting".
    let later = TcpListener::bind("127.0.0.1:0")?;
    let at = later.local_addr()?.port();
    drop(later);
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("relay.log");
    let mut relay = Command::new(common::cli::BIN)
        .arg("--db")
        .arg(format!(
            "host=127.0.0.1 port={at} user=postgres dbname=postgres sslmode=disable connect_timeout=2"
        ))
        .args(["--schema", &schema.name, "relay", "--exec", "cat > /dev/null", "--drain"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        relay.try_wait()?.is_none(),
        "the relay gave up on a server that was not up yet"
    );
    // The server comes up.
    forward(
        TcpListener::bind(("127.0.0.1", at))?,
        format!("127.0.0.1:{port}"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = relay.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = relay.kill();
            return Err("the relay never delivered".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let said = std::fs::read_to_string(&log)?;
    assert!(status.success(), "{said}");
    assert_eq!(said.matches("waiting for it").count(), 1, "{said}");
    assert_eq!(
        store.find(e.id)?.map(|e| e.status),
        Some(sqlite_outbox::Status::Done)
    );
    Ok(())
}

#[cfg(feature = "cli")]
#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn a_relay_meeting_a_broken_table_stops_and_says_what_the_server_said() -> Result {
    use std::process::{Command, Stdio};
    let Some(schema) = common::pg::Schema::fresh() else {
        return Ok(());
    };
    let store = PostgresStore::builder(&schema.url)
        .schema(&schema.name)
        .build()?;
    let first = store.enqueue(NewEvent::new("t", json!({})))?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("relay.log");
    let mut relay = Command::new(common::cli::BIN)
        .arg("--db")
        .arg(&schema.url)
        .args([
            "--schema",
            &schema.name,
            "relay",
            "--exec",
            "cat > /dev/null",
            "--poll",
            "100ms",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.find(first.id)?.map(|e| e.status) != Some(sqlite_outbox::Status::Done) {
        assert!(Instant::now() < deadline, "the relay never delivered");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Someone drops a column the relay reads.
    schema.client().batch_execute(&format!(
        "ALTER TABLE {}.outbox_events DROP COLUMN traceparent CASCADE",
        schema.name
    ))?;
    let status = loop {
        if let Some(status) = relay.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = relay.kill();
            return Err("the relay went on retrying a broken table".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let said = std::fs::read_to_string(&log)?;
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains("traceparent") && said.contains("does not exist"),
        "{said}"
    );
    assert!(said.contains("SQLSTATE 42703"), "{said}");
    Ok(())
}

#[cfg(feature = "cli")]
#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn relay_drain_ends_when_the_store_refuses_outcomes_for_good() -> Result {
    use std::process::{Command, Stdio};
    let Some(schema) = common::pg::Schema::fresh() else {
        return Ok(());
    };
    let store = PostgresStore::builder(&schema.url)
        .schema(&schema.name)
        .build()?;
    let e = store.enqueue(NewEvent::new("t", json!({})))?;
    // The server refuses every "done" as a read-only transaction would:
    // an error no retry cures.
    schema.client().batch_execute(&format!(
        "CREATE FUNCTION {s}.refuse_done() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.status = 'done' THEN
             RAISE EXCEPTION 'refused' USING ERRCODE = '25006';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_done BEFORE UPDATE ON {s}.outbox_events
           FOR EACH ROW EXECUTE FUNCTION {s}.refuse_done();",
        s = schema.name
    ))?;
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("relay.log");
    let mut relay = Command::new(common::cli::BIN)
        .arg("--db")
        .arg(&schema.url)
        .args([
            "--schema",
            &schema.name,
            "relay",
            "--exec",
            "cat > /dev/null",
            "--drain",
        ])
        .args(["--lease", "60s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let status = loop {
        if let Some(status) = relay.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(45) {
            let _ = relay.kill();
            return Err("relay --drain waited on outcomes the store had refused".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let said = std::fs::read_to_string(&log)?;
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(said.contains("could not be written"), "{said}");
    // Well before the lease would have let the event be claimed again.
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        store.find(e.id)?.map(|e| e.status),
        Some(sqlite_outbox::Status::Processing)
    );
    Ok(())
}
