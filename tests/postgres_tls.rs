//! PostgreSQL over TLS, against a real server with TLS on and a
//! certificate to verify (scripts/postgres.sh), and a second server that
//! speaks plain text only: each `sslmode` does what libpq says it does.
#![cfg(feature = "postgres")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use sqlite_outbox::{NewEvent, Operator, PostgresStore, SslMode, Store};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The servers' connection strings, or `None` (skipped, or failed in CI,
/// as `common::pg::url` does).
struct Servers {
    /// TCP to 127.0.0.1 with `sslrootcert` naming the server's CA.
    tls: String,
    other_ca: String,
    plain: String,
}

fn servers() -> Option<Servers> {
    common::pg::url()?;
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (
        var("OUTBOX_TEST_POSTGRES_TLS"),
        var("OUTBOX_TEST_POSTGRES_OTHER_CA"),
        var("OUTBOX_TEST_POSTGRES_PLAIN"),
    ) {
        (Some(tls), Some(other_ca), Some(plain)) => Some(Servers {
            tls,
            other_ca,
            plain,
        }),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but the TLS servers of scripts/postgres.sh are not set"
            );
            println!("SKIPPED: scripts/postgres.sh start sets the TLS servers");
            None
        }
    }
}

fn schema() -> String {
    format!(
        "tls_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// Opens a store at `url` in a fresh schema, and drops the schema after.
fn open(url: &str) -> sqlite_outbox::Result<(PostgresStore, Dropper)> {
    let name = schema();
    let store = PostgresStore::builder(url).schema(&name).build()?;
    let dropper = Dropper(store.clone(), name);
    Ok((store, dropper))
}

struct Dropper(PostgresStore, String);

impl Drop for Dropper {
    fn drop(&mut self) {
        if let Ok(mut c) = self.0.connect() {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.1));
        }
    }
}

/// Whether the store's own connections use TLS, as the server sees them.
fn server_sees_tls(store: &PostgresStore) -> Result<bool> {
    let mut c = store.connect()?;
    Ok(c.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )?
    .get(0))
}

fn error_text(e: &sqlite_outbox::Error) -> String {
    let mut text = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(s) = next {
        text.push_str(": ");
        text.push_str(&s.to_string());
        next = s.source();
    }
    text
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn verify_full_talks_only_to_the_server_its_certificate_names() -> Result {
    let Some(s) = servers() else { return Ok(()) };
    let (store, _drop) = open(&format!("{} sslmode=verify-full", s.tls))?;
    assert_eq!(store.target().ssl_mode(), SslMode::VerifyFull);
    assert!(server_sees_tls(&store)?);
    // The outbox works over it: enqueue, claim, settle.
    let e = store.enqueue(NewEvent::new("t", json!({"over": "tls"})))?;
    let claimed = store.claim(10, std::time::Duration::from_secs(30), None)?;
    assert_eq!(claimed.iter().map(|c| c.id).collect::<Vec<_>>(), [e.id]);
    store.complete(&claimed[0].lease().ok_or("no lease")?)?;
    assert_eq!(store.stats()?.done, 1);

    // A CA that did not sign the server's certificate: refused.
    let wrong = s.tls.replace(
        &s.tls[s.tls.find("sslrootcert=").ok_or("no sslrootcert")?..],
        &format!("sslrootcert={}", s.other_ca),
    );
    let err = open(&format!("{wrong} sslmode=verify-full"))
        .err()
        .ok_or("a server signed by another CA was trusted")?;
    assert!(
        error_text(&err).contains("certificate"),
        "{}",
        error_text(&err)
    );
    // The same server under a name its certificate does not carry
    // (127.0.0.2): verify-full refuses, verify-ca (which checks the chain,
    // not the name) accepts.
    let other_name = s.tls.replace("host=127.0.0.1", "host=127.0.0.2");
    let err = open(&format!("{other_name} sslmode=verify-full"))
        .err()
        .ok_or("a certificate for another name was accepted")?;
    assert!(
        error_text(&err).contains("certificate"),
        "{}",
        error_text(&err)
    );
    let (ca_only, _drop2) = open(&format!("{other_name} sslmode=verify-ca"))?;
    assert!(server_sees_tls(&ca_only)?);
    Ok(())
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn require_refuses_a_server_without_tls_and_prefer_falls_back() -> Result {
    let Some(s) = servers() else { return Ok(()) };
    let err = open(&format!("{} sslmode=require", s.plain))
        .err()
        .ok_or("require connected in plain text")?;
    assert!(error_text(&err).contains("TLS"), "{}", error_text(&err));
    for mode in ["verify-ca", "verify-full"] {
        assert!(
            open(&format!("{} sslmode={mode}", s.plain)).is_err(),
            "{mode}"
        );
    }
    let (prefer, _drop) = open(&format!("{} sslmode=prefer", s.plain))?;
    assert!(!server_sees_tls(&prefer)?);
    // On the TLS server, require and the local default (prefer) encrypt.
    let no_root = s
        .tls
        .split(" sslrootcert=")
        .next()
        .unwrap_or_default()
        .to_owned();
    let (require, _drop2) = open(&format!("{no_root} sslmode=require"))?;
    assert!(server_sees_tls(&require)?);
    // libpq's rule: require with a root certificate checks the chain.
    let err = open(&format!(
        "{no_root} sslmode=require sslrootcert={}",
        s.other_ca
    ))
    .err()
    .ok_or("require with sslrootcert trusted another CA's server")?;
    assert!(
        error_text(&err).contains("certificate"),
        "{}",
        error_text(&err)
    );
    let (default, _drop3) = open(&no_root)?;
    assert_eq!(default.target().ssl_mode(), SslMode::Prefer);
    assert!(server_sees_tls(&default)?);
    Ok(())
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn the_listener_wakes_dispatchers_over_tls() -> Result {
    use sqlite_outbox::Dispatcher;
    use std::time::{Duration, Instant};
    let Some(s) = servers() else { return Ok(()) };
    let url = format!("{} sslmode=verify-full", s.tls);
    let (store, _drop) = open(&url)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let dispatcher = Dispatcher::builder(store.clone())
        .poll_interval(Duration::from_secs(30))
        .handle("t", move |_| {
            let _ = tx.send(());
            Ok(())
        })
        .start()?;
    // Another process's insert, through its own connection: only the
    // listener (over TLS) can wake the dispatcher before its 30 s poll.
    std::thread::sleep(Duration::from_millis(300));
    let other = PostgresStore::builder(&url)
        .schema(store.schema())
        .build()?;
    let started = Instant::now();
    other.enqueue(NewEvent::new("t", json!({})))?;
    rx.recv_timeout(Duration::from_secs(20))?;
    assert!(started.elapsed() < Duration::from_secs(20));
    dispatcher.shutdown(Duration::from_secs(5));
    Ok(())
}
