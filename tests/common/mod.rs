//! Fixtures shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

#[cfg(any(feature = "nats", feature = "mqtt"))]
pub mod brokers;
#[cfg(feature = "cli")]
pub mod browser;
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cli")]
pub mod endpoint;
pub mod journal;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use sqlite_outbox::legacy::UnfencedStore;
use sqlite_outbox::{ManualClock, MemoryStore, RetryPolicy, SqliteStore, Store};
use tempfile::TempDir;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A store on a manual clock, and what the test needs to drive it.
pub struct Fixture {
    /// All three tiers of the API.
    pub store: Arc<dyn UnfencedStore>,
    pub clock: ManualClock,
    pub sqlite: Option<SqliteStore>,
    pub dir: Option<TempDir>,
    /// The throwaway schema of a PostgreSQL fixture, dropped with it.
    #[cfg(feature = "postgres")]
    pub pg_schema: Option<pg::Schema>,
}

impl Fixture {
    pub fn memory() -> Self {
        Self::memory_with(RetryPolicy::default())
    }

    pub fn memory_with(policy: RetryPolicy) -> Self {
        let clock = ManualClock::new();
        let store = MemoryStore::builder()
            .clock(Arc::new(clock.clone()))
            .retry_policy(policy)
            .build();
        Fixture {
            store: Arc::new(store),
            clock,
            sqlite: None,
            dir: None,
            #[cfg(feature = "postgres")]
            pg_schema: None,
        }
    }

    pub fn sqlite() -> Self {
        Self::sqlite_with(RetryPolicy::default())
    }

    pub fn sqlite_with(policy: RetryPolicy) -> Self {
        let clock = ManualClock::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::builder(dir.path().join("outbox.db"))
            .clock(Arc::new(clock.clone()))
            .retry_policy(policy)
            .build()
            .expect("open store");
        Fixture {
            store: Arc::new(store.clone()),
            clock,
            sqlite: Some(store),
            dir: Some(dir),
            #[cfg(feature = "postgres")]
            pg_schema: None,
        }
    }

    /// A store in a fresh schema of the PostgreSQL server named by
    /// `OUTBOX_TEST_POSTGRES`, or `None` (the test skips) when it is not
    /// set, outside CI.
    #[cfg(feature = "postgres")]
    pub fn postgres() -> Option<Self> {
        Self::postgres_with(RetryPolicy::default())
    }

    #[cfg(feature = "postgres")]
    pub fn postgres_with(policy: RetryPolicy) -> Option<Self> {
        let schema = pg::Schema::fresh()?;
        let clock = ManualClock::new();
        let store = sqlite_outbox::PostgresStore::builder(&schema.url)
            .schema(&schema.name)
            .clock(Arc::new(clock.clone()))
            .retry_policy(policy)
            .build()
            .expect("open the PostgreSQL store");
        Some(Fixture {
            store: Arc::new(store),
            clock,
            sqlite: None,
            dir: None,
            pg_schema: Some(schema),
        })
    }

    /// The store as the dispatcher takes it (the core tier).
    pub fn core(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
}

/// A throwaway schema on the test server.
#[cfg(feature = "postgres")]
pub mod pg {
    use std::sync::atomic::{AtomicUsize, Ordering};

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    /// The server's connection string, or `None` with one line saying how
    /// to run these tests; in CI (`CI=true`) a missing server fails the
    /// test instead.
    pub fn url() -> Option<String> {
        match std::env::var("OUTBOX_TEST_POSTGRES") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true but OUTBOX_TEST_POSTGRES is not set: the PostgreSQL tests \
                     must run in CI (.ci/run starts a server with scripts/postgres.sh)"
                );
                println!(
                    "SKIPPED: set OUTBOX_TEST_POSTGRES to a server's connection string \
                     (eval \"$(scripts/postgres.sh start)\" starts one) to run the PostgreSQL tests"
                );
                None
            }
        }
    }

    /// A schema name no other test uses; dropped (with everything in it)
    /// when this is.
    #[derive(Debug)]
    pub struct Schema {
        pub url: String,
        pub name: String,
    }

    impl Schema {
        pub fn fresh() -> Option<Schema> {
            let url = url()?;
            let name = format!(
                "t_{}_{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            );
            Some(Schema { url, name })
        }

        /// A plain client of the test server, as an app would have.
        pub fn client(&self) -> sqlite_outbox::postgres::Client {
            sqlite_outbox::postgres::Client::connect(&self.url, sqlite_outbox::postgres::NoTls)
                .expect("connect to the test server")
        }
    }

    impl Drop for Schema {
        fn drop(&mut self) {
            if let Ok(mut c) =
                sqlite_outbox::postgres::Client::connect(&self.url, sqlite_outbox::postgres::NoTls)
            {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
            }
        }
    }
}

/// Waits until `done` holds, or fails after `secs` seconds.
pub fn wait_until(
    secs: u64,
    what: &str,
    mut done: impl FnMut() -> Result<bool, Box<dyn std::error::Error>>,
) -> TestResult {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !done()? {
        if std::time::Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Compiles a fault shim from `tests/torture`, or says why it cannot.
pub fn shim(name: &str, dir: &Path) -> Option<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/torture")
        .join(format!("{name}.c"));
    let out = dir.join(format!("{name}.so"));
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .status();
    match built {
        Ok(s) if s.success() => Some(out),
        other => {
            println!("SKIPPED: cannot build {name}.so with cc ({other:?})");
            None
        }
    }
}

/// Child processes that are killed and waited for when this is dropped,
/// however the test ends: a failed assertion, an early `?`, a timeout. A
/// failing test never leaves a process behind.
#[derive(Debug, Default)]
pub struct Reaper(pub Vec<Child>);

impl Reaper {
    pub fn one(child: Child) -> Reaper {
        Reaper(vec![child])
    }

    /// The first child.
    pub fn child(&mut self) -> &mut Child {
        &mut self.0[0]
    }

    /// Waits until every child exited successfully, at most `limit` in
    /// all. On a timeout or a failed child, every child is killed.
    pub fn wait_all(mut self, limit: Duration) -> TestResult {
        let deadline = Instant::now() + limit;
        for child in &mut self.0 {
            loop {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        return Err(format!("child failed: {status}").into());
                    }
                    break;
                }
                if Instant::now() > deadline {
                    return Err("child did not finish in time".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}
