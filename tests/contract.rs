//! The schema as a contract for other languages, run by clients nobody here
//! wrote: the system's `sqlite3` shell, Python's `sqlite3` module, and
//! Python on SQLite 3.26.0 (the oldest the README promises), each inserting
//! with the README's exact SQL in one transaction with an app row, then
//! `outbox relay` delivering the event. The same clients must meet every
//! limit the Rust side enforces, as a named CHECK constraint.
//!
//! Outside CI a missing client is skipped with a line saying so; with
//! `CI=true` it is a failure.
#![cfg(feature = "cli")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rusqlite::Connection;
use serde_json::{json, Value};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const BIN: &str = env!("CARGO_BIN_EXE_outbox");

/// The oldest SQLite the README names, and the `libsqlite3-sys` release
/// that ships its amalgamation.
const OLDEST: (&str, &str) = ("3.26.0", "0.12.0");

/// Python: run the SQL on stdin as one script; print the SQLite version.
const PYTHON: &str = r#"
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=5, isolation_level=None)
print(sqlite3.sqlite_version)
try:
    conn.executescript(sys.stdin.read())
except sqlite3.Error as e:
    print(e, file=sys.stderr)
    sys.exit(1)
"#;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips (outside CI) or fails (in CI) for a missing client.
fn missing(what: &str) -> TestResult {
    if in_ci() {
        Err(format!("{what} is missing, and CI must run this test").into())
    } else {
        println!("SKIPPED: {what} is missing (CI installs it and runs this test)");
        Ok(())
    }
}

/// A program that writes to an outbox file with plain SQL.
struct Client {
    name: &'static str,
    program: &'static str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// What it prints of its SQLite version first, if anything.
    version: Option<&'static str>,
}

impl Client {
    fn shell() -> Client {
        Client {
            name: "the sqlite3 shell",
            program: "sqlite3",
            args: vec!["-bail".into()],
            env: Vec::new(),
            version: None,
        }
    }

    fn python(env: Vec<(String, String)>, version: Option<&'static str>) -> Client {
        Client {
            name: "python3's sqlite3 module",
            program: "python3",
            args: vec!["-c".into(), PYTHON.into()],
            env,
            version,
        }
    }

    fn available(&self) -> bool {
        Command::new(self.program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs `sql` on `db` the way a program in another language would: WAL,
    /// a busy timeout, then the statements.
    fn run(&self, db: &Path, sql: &str) -> std::io::Result<Output> {
        let mut cmd = Command::new(self.program);
        cmd.args(&self.args).arg(db);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let script = format!("PRAGMA busy_timeout = 5000;\nPRAGMA journal_mode = WAL;\n{sql}\n");
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes())?;
        }
        child.wait_with_output()
    }
}

/// The SQL block of the README's "Using it from other languages".
fn readme_insert() -> Result<String, Box<dyn std::error::Error>> {
    let readme = include_str!("../README.md");
    let section = readme
        .split("## Using it from other languages")
        .nth(1)
        .ok_or("no such README section")?;
    let block = section
        .split("```sql\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .ok_or("no SQL block in the section")?;
    Ok(block.to_owned())
}

/// A fresh outbox with the README's app table, made by the crate.
fn app_file(dir: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let db = dir.join("app.db");
    sqlite_outbox::SqliteStore::open(&db)?;
    Connection::open(&db)?.execute_batch("CREATE TABLE signups (email TEXT NOT NULL)")?;
    Ok(db)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The whole contract for one client.
fn contract(client: &Client) -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = app_file(dir.path())?;

    // The README's insert, unchanged, with its app row.
    let before = now_ms();
    let out = client.run(&db, &readme_insert()?)?;
    let after = now_ms();
    assert!(
        out.status.success(),
        "{}: {}",
        client.name,
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(version) = client.version {
        let printed = String::from_utf8_lossy(&out.stdout);
        assert_eq!(printed.lines().next(), Some(version), "{}", client.name);
    }
    let conn = Connection::open(&db)?;
    let (id, due, created, signups): (String, i64, i64, i64) = conn.query_row(
        "SELECT id, next_attempt_at, created_at, (SELECT count(*) FROM signups) FROM outbox_events",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    assert_eq!(signups, 1);
    // The defaults: a lowercase v4 id, and now in milliseconds.
    let parsed = uuid::Uuid::parse_str(&id)?;
    assert_eq!(
        (parsed.get_version_num(), parsed.to_string()),
        (4, id.clone())
    );
    for t in [due, created] {
        assert!(
            (before - 1000..=after + 1000).contains(&t),
            "{}: {t} is not now ({before}..{after}) in milliseconds",
            client.name
        );
    }

    // `outbox relay` delivers it.
    let sink = dir.path().join("delivered.json");
    let relay = Command::new(BIN)
        .arg("--db")
        .arg(&db)
        .args(["relay", "--drain", "--exec"])
        .arg(format!(
            "cat > {}; printf %s \"$TRACEPARENT\" > {}",
            sink.display(),
            dir.path().join("traceparent").display()
        ))
        .env_remove("OUTBOX_DB")
        .stdin(Stdio::null())
        .output()?;
    assert!(
        relay.status.success(),
        "{}",
        String::from_utf8_lossy(&relay.stderr)
    );
    let body: Value = serde_json::from_str(&std::fs::read_to_string(&sink)?)?;
    assert_eq!(body["id"], json!(id));
    assert_eq!(body["type"], json!("user.signed_up"));
    assert_eq!(body["payload"], json!({"email": "ada@example.com"}));
    assert_eq!(body["correlation_id"], json!("req-42"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("traceparent"))?,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "{}: the trace context did not travel",
        client.name
    );
    let (status, priority): (String, i64) =
        conn.query_row("SELECT status, priority FROM outbox_events", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    assert_eq!((status.as_str(), priority), ("done", 0), "{}", client.name);
    // A raised priority is written like any other column.
    let out = client.run(
        &db,
        "INSERT INTO outbox_events (event_type, payload, priority) VALUES ('urgent', '{}', 7);",
    )?;
    assert!(
        out.status.success(),
        "{}: {}",
        client.name,
        String::from_utf8_lossy(&out.stderr)
    );

    // What the Rust side refuses, the table refuses too, by name.
    let big = "'\"' || replace(hex(zeroblob(524288)), '0', 'a') || '\"'";
    let key256 = "replace(hex(zeroblob(128)), '0', 'k')";
    for (values, constraint) in [
        (
            "(event_type, payload, next_attempt_at) VALUES ('t', '{}', 1700000000)",
            "next_attempt_at_is_milliseconds",
        ),
        (
            "(event_type, payload, next_attempt_at) VALUES ('t', '{}', 1700000000000000)",
            "next_attempt_at_is_milliseconds",
        ),
        (
            "(event_type, payload, next_attempt_at) VALUES ('t', '{}', 1700000000000.5)",
            "next_attempt_at_is_milliseconds",
        ),
        (
            "(event_type, payload, created_at) VALUES ('t', '{}', 'yesterday')",
            "created_at_is_milliseconds",
        ),
        (
            "(event_type, payload) VALUES ('t', '{not json')",
            "payload_is_json_of_at_most_1_mib",
        ),
        (
            &format!("(event_type, payload) VALUES ('t', {big})"),
            "payload_is_json_of_at_most_1_mib",
        ),
        (
            "(event_type, payload) VALUES ('', '{}')",
            "event_type_is_1_to_200_characters",
        ),
        (
            "(id, event_type, payload) VALUES ('0190F0E0-AAAA-7BBB-8CCC-DDDDEEEEFFFF', 't', '{}')",
            "id_is_a_lowercase_uuid",
        ),
        (
            "(event_type, payload, org_id) VALUES ('t', '{}', 'not-a-uuid')",
            "org_id_is_a_lowercase_uuid",
        ),
        (
            &format!("(event_type, payload, ordering_key) VALUES ('t', '{{}}', {key256})"),
            "ordering_key_is_at_most_255_bytes",
        ),
        (
            &format!("(event_type, payload, idempotency_key) VALUES ('t', '{{}}', {key256})"),
            "idempotency_key_is_at_most_255_bytes",
        ),
        (
            &format!("(event_type, payload, correlation_id) VALUES ('t', '{{}}', {key256})"),
            "correlation_id_is_at_most_255_bytes",
        ),
        (
            "(event_type, payload, max_attempts) VALUES ('t', '{}', 0)",
            "max_attempts_is_1_to_4294967295",
        ),
        (
            "(event_type, payload, status) VALUES ('t', '{}', 'processing')",
            "processing_has_a_lease",
        ),
        (
            "(event_type, payload, traceparent) VALUES ('t', '{}', '00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01')",
            "traceparent_is_w3c",
        ),
        (
            "(event_type, payload, traceparent) VALUES ('t', '{}', 'trace-me')",
            "traceparent_is_w3c",
        ),
        (
            "(event_type, payload, priority) VALUES ('t', '{}', 256)",
            "priority_is_0_to_255",
        ),
        (
            "(event_type, payload, priority) VALUES ('t', '{}', -1)",
            "priority_is_0_to_255",
        ),
        (
            "(event_type, payload, priority) VALUES ('t', '{}', 'high')",
            "priority_is_0_to_255",
        ),
        (
            "(event_type, payload, priority) VALUES ('t', '{}', NULL)",
            "priority",
        ),
    ] {
        let out = client.run(&db, &format!("INSERT INTO outbox_events {values};"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(constraint),
            "{}: {values} gave {:?}: {err}",
            client.name,
            out.status.code()
        );
    }
    let count: i64 = conn.query_row("SELECT count(*) FROM outbox_events", [], |r| r.get(0))?;
    assert_eq!(count, 2, "{}: a refused row was stored", client.name);
    Ok(())
}

#[test]
fn the_system_sqlite3_shell_keeps_the_contract() -> TestResult {
    let client = Client::shell();
    if !client.available() {
        return missing("the sqlite3 shell");
    }
    contract(&client)
}

#[test]
fn pythons_sqlite3_module_keeps_the_contract() -> TestResult {
    let client = Client::python(Vec::new(), None);
    if !client.available() {
        return missing("python3");
    }
    contract(&client)
}

#[test]
fn the_oldest_promised_sqlite_keeps_the_contract() -> TestResult {
    let probe = Client::python(Vec::new(), None);
    if !probe.available() {
        return missing("python3");
    }
    let lib = match oldest_sqlite_library() {
        Ok(lib) => lib,
        Err(why) => return missing(&format!("SQLite {} ({why})", OLDEST.0)),
    };
    let client = Client::python(
        vec![("LD_LIBRARY_PATH".into(), lib.display().to_string())],
        Some(OLDEST.0),
    );
    contract(&client)
}

/// Builds the amalgamation of the oldest promised SQLite, as shipped in an
/// old `libsqlite3-sys` crate (fetched by cargo), into a shared library
/// that Python's `sqlite3` module loads instead of the system's. Returns
/// the directory holding `libsqlite3.so.0`.
fn oldest_sqlite_library() -> Result<PathBuf, String> {
    let (version, crate_version) = OLDEST;
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sqlite-{version}"));
    let lib = out.join("libsqlite3.so.0");
    if lib.exists() {
        return Ok(out);
    }
    let source = amalgamation(crate_version)?;
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let partial = out.join("libsqlite3.so.0.partial");
    let built = Command::new("cc")
        .args([
            "-O1",
            "-shared",
            "-fPIC",
            "-DSQLITE_ENABLE_JSON1",
            "-DSQLITE_ENABLE_DESERIALIZE",
        ])
        .arg("-o")
        .arg(&partial)
        .arg(&source)
        .args(["-lpthread", "-ldl", "-lm"])
        .output()
        .map_err(|e| format!("cc: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "cc failed: {}",
            String::from_utf8_lossy(&built.stderr)
        ));
    }
    // Renamed into place, so a parallel run never loads half a library.
    std::fs::rename(&partial, &lib).map_err(|e| e.to_string())?;
    Ok(out)
}

/// `sqlite3/sqlite3.c` of `libsqlite3-sys` at `crate_version`, fetched into
/// cargo's registry by a throwaway manifest when it is not there yet.
fn amalgamation(crate_version: &str) -> Result<PathBuf, String> {
    let find = || -> Option<PathBuf> {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
        let registry = std::fs::read_dir(home.join("registry/src")).ok()?;
        registry
            .filter_map(|e| e.ok())
            .map(|e| {
                e.path()
                    .join(format!("libsqlite3-sys-{crate_version}/sqlite3/sqlite3.c"))
            })
            .find(|p| p.exists())
    };
    if let Some(found) = find() {
        return Ok(found);
    }
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::create_dir(scratch.path().join("src")).map_err(|e| e.to_string())?;
    std::fs::write(scratch.path().join("src/lib.rs"), "").map_err(|e| e.to_string())?;
    std::fs::write(
        scratch.path().join("Cargo.toml"),
        format!(
            "[package]\nname = \"fetch-old-sqlite\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             [dependencies]\nlibsqlite3-sys = {{ version = \"={crate_version}\", features = [\"bundled\"] }}\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let fetched = Command::new(cargo)
        .arg("fetch")
        .current_dir(scratch.path())
        .output()
        .map_err(|e| format!("cargo fetch: {e}"))?;
    if !fetched.status.success() {
        return Err(format!(
            "cargo fetch of libsqlite3-sys {crate_version} failed: {}",
            String::from_utf8_lossy(&fetched.stderr)
        ));
    }
    find().ok_or_else(|| format!("libsqlite3-sys {crate_version} is not in cargo's registry"))
}
