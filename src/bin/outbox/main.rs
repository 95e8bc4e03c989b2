//! `outbox`: operate an outbox file, and relay its events to an HTTP
//! endpoint or a command.
//!
//! Exit codes: 0 success, 1 the operation failed, 2 usage error, 3 `relay
//! --drain` stopped with events failed or retries still scheduled.

// Input from outside (rows, payloads, responses, arguments) must never
// be able to panic the library or the tool.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

mod relay;
mod text;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use sqlite_outbox::admin::{event_json, format_duration, parse_duration, stats_json};
use sqlite_outbox::{
    EventId, ListFilter, NewEvent, Requeue, SqliteStore, Status, Store, SCHEMA_SQL,
};
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "outbox",
    version,
    about = "Operate a sqlite-outbox file and relay its events"
)]
struct Cli {
    /// The outbox database file (or set OUTBOX_DB).
    #[arg(long, env = "OUTBOX_DB", global = true)]
    db: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the outbox schema in the file (or check an existing one).
    Init,
    /// Print the schema (the table contract for other languages).
    Schema,
    /// Counts per status and per event type.
    Stats,
    /// List events.
    List(ListArgs),
    /// Show one event in full.
    Show {
        /// The event id.
        id: String,
    },
    /// Enqueue one event.
    Enqueue(EnqueueArgs),
    /// Move failed events back to pending.
    Retry {
        /// One failed event.
        id: Option<String>,
        /// Every failed event (optionally of one --type).
        #[arg(long)]
        failed: bool,
        /// With --failed: only this event type.
        #[arg(long = "type", requires = "failed")]
        event_type: Option<String>,
    },
    /// Give up on a pending event.
    Fail {
        /// The event id.
        id: String,
        /// Why (kept as its last error).
        #[arg(long)]
        reason: String,
    },
    /// Delete done and failed events older than a duration.
    Purge {
        /// e.g. 30d, 12h.
        #[arg(long, value_parser = duration_arg)]
        older_than: Duration,
    },
    /// Delete every event of an organisation or a user.
    Erase {
        /// The organisation's UUID.
        #[arg(long, conflicts_with = "user", required_unless_present = "user")]
        org: Option<Uuid>,
        /// The user's UUID.
        #[arg(long)]
        user: Option<Uuid>,
    },
    /// Check the file for damage (`PRAGMA quick_check`).
    Verify,
    /// Write a consistent copy of the outbox (including the WAL) to PATH.
    Backup {
        /// Where to write the copy; must not exist.
        path: PathBuf,
    },
    /// Deliver events over HTTP or to a command until interrupted.
    Relay(relay::RelayArgs),
}

#[derive(Args)]
struct ListArgs {
    /// pending, processing, done or failed.
    #[arg(long, value_parser = status_arg)]
    status: Option<Status>,
    /// Only this event type.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Only this organisation.
    #[arg(long)]
    org: Option<Uuid>,
    /// Only this user.
    #[arg(long)]
    user: Option<Uuid>,
    /// Only this correlation id.
    #[arg(long)]
    correlation_id: Option<String>,
    /// At most this many events.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Newest first.
    #[arg(long)]
    newest: bool,
}

#[derive(Args)]
struct EnqueueArgs {
    /// The event type, e.g. email.invite.
    event_type: String,
    /// JSON text, @FILE to read a file, or - to read standard input.
    payload: String,
    /// Events with one ordering key run one at a time, in order.
    #[arg(long)]
    ordering_key: Option<String>,
    /// A second enqueue with the same key returns the first event.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Not before this long from now, e.g. 10m.
    #[arg(long, value_parser = duration_arg)]
    delay: Option<Duration>,
    /// The organisation's UUID.
    #[arg(long)]
    org: Option<Uuid>,
    /// The user's UUID.
    #[arg(long)]
    user: Option<Uuid>,
    /// A correlation id.
    #[arg(long)]
    correlation_id: Option<String>,
    /// Attempts before the event fails.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: Option<u32>,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn status_arg(s: &str) -> Result<Status, String> {
    s.parse().map_err(|e: sqlite_outbox::Error| e.to_string())
}

/// A failure: the message to print and the exit code.
struct Failure(String, u8);

impl Failure {
    fn usage(msg: impl Into<String>) -> Failure {
        Failure(msg.into(), 2)
    }
}

/// An error as one line: the library's `Display` already names the cause.
fn describe(err: &sqlite_outbox::Error) -> String {
    err.to_string()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg, code)) => {
            eprintln!("outbox: {}", text::terminal_safe(&msg));
            ExitCode::from(code)
        }
    }
}

fn run(cli: &Cli) -> Result<(), Failure> {
    if let Command::Schema = cli.command {
        print!("{SCHEMA_SQL}");
        return Ok(());
    }
    let db = cli
        .db
        .as_deref()
        .ok_or_else(|| Failure::usage("no database: give --db PATH or set OUTBOX_DB"))?;
    let fail = |e: sqlite_outbox::Error| {
        let code = if e.is_invalid_input() { 2 } else { 1 };
        Failure(format!("{}: {}", db.display(), describe(&e)), code)
    };
    match &cli.command {
        Command::Schema => Ok(()),
        Command::Init => {
            let store = SqliteStore::open(db).map_err(fail)?;
            output(
                cli.json,
                json!({"path": store.path(), "initialised": true}),
                || format!("{}: outbox ready", db.display()),
            )
        }
        Command::Stats => {
            let stats = open_read(db)?.stats().map_err(fail)?;
            output(cli.json, stats_json(&stats), || {
                let mut t = String::new();
                let _ = writeln!(
                    t,
                    "pending {}  (due {})  processing {}  done {}  failed {}",
                    stats.pending, stats.due, stats.processing, stats.done, stats.failed
                );
                let _ = writeln!(
                    t,
                    "oldest due event waiting: {}",
                    stats
                        .oldest_due_age
                        .map(format_duration)
                        .unwrap_or_else(|| "-".into())
                );
                if !stats.by_type.is_empty() {
                    let rows = stats
                        .by_type
                        .iter()
                        .map(|s| {
                            vec![
                                text::terminal_safe(&s.event_type).into_owned(),
                                s.pending.to_string(),
                                s.processing.to_string(),
                                s.done.to_string(),
                                s.failed.to_string(),
                            ]
                        })
                        .collect();
                    t.push_str(&table(
                        &["TYPE", "PENDING", "PROCESSING", "DONE", "FAILED"],
                        rows,
                    ));
                }
                t.trim_end().to_owned()
            })
        }
        Command::List(a) => {
            let filter = ListFilter {
                status: a.status,
                event_type: a.event_type.clone(),
                org_id: a.org,
                user_id: a.user,
                correlation_id: a.correlation_id.clone(),
                limit: a.limit,
                newest_first: a.newest,
            };
            let events = open_read(db)?.list(&filter).map_err(fail)?;
            output(
                cli.json,
                Value::from(events.iter().map(event_json).collect::<Vec<_>>()),
                || {
                    let rows = events
                        .iter()
                        .map(|e| {
                            vec![
                                e.id.to_string(),
                                text::terminal_safe(&e.event_type).into_owned(),
                                e.status.to_string(),
                                format!("{}/{}", e.attempts, e.max_attempts),
                                e.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                                text::excerpt(e.last_error.as_deref().unwrap_or_default(), 60),
                            ]
                        })
                        .collect();
                    table(
                        &[
                            "ID",
                            "TYPE",
                            "STATUS",
                            "ATTEMPTS",
                            "CREATED (UTC)",
                            "LAST ERROR",
                        ],
                        rows,
                    )
                    .trim_end()
                    .to_owned()
                },
            )
        }
        Command::Show { id } => {
            let id = parse_id(id)?;
            let event = open_read(db)?
                .find_by_id(id)
                .map_err(fail)?
                .ok_or_else(|| Failure(format!("{}: no event with id {id}", db.display()), 1))?;
            let value = event_json(&event);
            output(cli.json, value.clone(), || {
                let mut t = String::new();
                if let Value::Object(map) = &value {
                    for (k, v) in map {
                        let shown = match v {
                            Value::Null => "-".to_owned(),
                            Value::String(s) => text::terminal_safe(s).into_owned(),
                            other => text::terminal_safe(&other.to_string()).into_owned(),
                        };
                        let _ = writeln!(t, "{k:>16}  {shown}");
                    }
                }
                t.trim_end().to_owned()
            })
        }
        Command::Enqueue(a) => {
            let text = read_payload(&a.payload)?;
            let mut event = NewEvent::from_json(a.event_type.clone(), &text)
                .map_err(|e| Failure::usage(describe(&e)))?;
            if let Some(k) = &a.ordering_key {
                event = event.with_ordering_key(k);
            }
            if let Some(k) = &a.idempotency_key {
                event = event.with_idempotency_key(k);
            }
            if let Some(d) = a.delay {
                event = event.with_delay(d);
            }
            if let Some(o) = a.org {
                event = event.with_org_id(o);
            }
            if let Some(u) = a.user {
                event = event.with_user_id(u);
            }
            if let Some(c) = &a.correlation_id {
                event = event.with_correlation_id(c);
            }
            if let Some(n) = a.max_attempts {
                event = event.with_max_attempts(n);
            }
            let store = SqliteStore::open(db).map_err(fail)?;
            let stored = store.create(event).map_err(fail)?;
            output(cli.json, event_json(&stored), || stored.id.to_string())
        }
        Command::Retry {
            id,
            failed,
            event_type,
        } => {
            let which = match (id, failed) {
                (Some(id), false) => Requeue::One(parse_id(id)?),
                (None, true) => match event_type {
                    Some(t) => Requeue::Type(t.clone()),
                    None => Requeue::All,
                },
                _ => return Err(Failure::usage("give either an event ID or --failed")),
            };
            let n = open_write(db)?.requeue_failed(which).map_err(fail)?;
            output(cli.json, json!({"requeued": n}), || {
                format!("requeued {n} event(s)")
            })
        }
        Command::Fail { id, reason } => {
            let id = parse_id(id)?;
            open_write(db)?
                .fail_unfinished(id, reason)
                .map_err(|e| Failure(format!("{}: {}", db.display(), describe(&e)), 1))?;
            output(cli.json, json!({"failed": id}), || {
                format!("event {id} marked failed")
            })
        }
        Command::Purge { older_than } => {
            let store = open_write(db)?;
            let cutoff = chrono::Duration::from_std(*older_than)
                .ok()
                .and_then(|d| {
                    sqlite_outbox::Clock::now(&sqlite_outbox::SystemClock).checked_sub_signed(d)
                })
                .ok_or_else(|| Failure::usage("--older-than is too large"))?;
            let n = store.cleanup_old(cutoff).map_err(fail)?;
            output(cli.json, json!({"deleted": n}), || {
                format!(
                    "deleted {n} done or failed event(s) created before {}",
                    cutoff.format("%Y-%m-%d %H:%M:%S UTC")
                )
            })
        }
        Command::Erase { org, user } => {
            let store = open_write(db)?;
            let (n, whose) = match (org, user) {
                (Some(o), _) => (
                    store.delete_by_org(*o).map_err(fail)?,
                    format!("organisation {o}"),
                ),
                (None, Some(u)) => (store.delete_by_user(*u).map_err(fail)?, format!("user {u}")),
                (None, None) => return Err(Failure::usage("give --org or --user")),
            };
            output(cli.json, json!({"deleted": n}), || {
                format!("deleted {n} event(s) of {whose}")
            })
        }
        Command::Verify => {
            open_read(db)?.verify().map_err(fail)?;
            output(cli.json, json!({"ok": true}), || {
                format!("{}: ok", db.display())
            })
        }
        Command::Backup { path } => {
            open_read(db)?.backup(path).map_err(fail)?;
            output(cli.json, json!({"backup": path}), || {
                format!("wrote {}", path.display())
            })
        }
        Command::Relay(a) => relay::run(db, cli.json, a),
    }
}

fn output(json_mode: bool, value: Value, text: impl FnOnce() -> String) -> Result<(), Failure> {
    let rendered = if json_mode {
        serde_json::to_string_pretty(&value).map_err(|e| Failure(e.to_string(), 1))?
    } else {
        text()
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (`outbox list | head`) is not an error worth a message.
    let _ = writeln!(out, "{rendered}");
    Ok(())
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut t = String::new();
    let line = |t: &mut String, cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(t, "{}", parts.join("  ").trim_end());
    };
    line(&mut t, headers.to_vec());
    for row in &rows {
        line(&mut t, row.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        t.push_str("(none)\n");
    }
    t
}

fn parse_id(text: &str) -> Result<EventId, Failure> {
    text.parse()
        .map_err(|e: sqlite_outbox::Error| Failure::usage(e.to_string()))
}

fn read_payload(arg: &str) -> Result<String, Failure> {
    if arg == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Failure::usage(format!("cannot read the payload from stdin: {e}")))?;
        Ok(text)
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read_to_string(path)
            .map_err(|e| Failure::usage(format!("cannot read the payload from {path}: {e}")))
    } else {
        Ok(arg.to_owned())
    }
}

/// Read commands never create a file.
fn open_read(db: &Path) -> Result<SqliteStore, Failure> {
    if !db.exists() {
        return Err(Failure(format!("{}: no such file", db.display()), 1));
    }
    SqliteStore::builder(db)
        .read_only(true)
        .build()
        .map_err(|e| Failure(format!("{}: {}", db.display(), describe(&e)), 1))
}

/// Commands that change an existing outbox never create one either.
fn open_write(db: &Path) -> Result<SqliteStore, Failure> {
    if !db.exists() {
        return Err(Failure(format!("{}: no such file", db.display()), 1));
    }
    SqliteStore::open(db).map_err(|e| Failure(format!("{}: {}", db.display(), describe(&e)), 1))
}
