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

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod commands;
mod db;
mod http;
mod output;
mod prometheus;
mod relay;
mod text;
mod ui;

use clap::{Args, Parser, Subcommand};
use sqlite_outbox::text::parse_duration;
use sqlite_outbox::{Status, SCHEMA_SQL};
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "outbox",
    version,
    about = "Operate a sqlite-outbox file and relay its events"
)]
struct Cli {
    /// The outbox database file, or a PostgreSQL server's URL
    /// (postgres://user@host/db, or host=... dbname=...) (or set OUTBOX_DB).
    #[arg(long, env = "OUTBOX_DB", global = true)]
    db: Option<PathBuf>,
    /// On PostgreSQL, the schema that holds the outbox.
    #[arg(long, env = "OUTBOX_SCHEMA", global = true, default_value = "outbox")]
    schema: String,
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
    /// Print the schema (the table contract for other languages): the
    /// PostgreSQL one when --db names a server.
    Schema,
    /// Counts per status and per event type.
    Stats {
        /// In the Prometheus text format (for node-exporter's textfile
        /// collector: write to a temporary file, then rename it).
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
    },
    /// List events.
    List(ListArgs),
    /// Show one event in full.
    Show {
        /// The event id.
        id: String,
    },
    /// Enqueue one event.
    Enqueue(EnqueueArgs),
    /// Move failed events back to pending, due now, attempts reset.
    #[command(alias = "retry")]
    Requeue {
        /// One failed event.
        id: Option<String>,
        /// Every failed event (optionally of one --type).
        #[arg(long)]
        failed: bool,
        /// With --failed: only this event type.
        #[arg(long = "type", requires = "failed")]
        event_type: Option<String>,
    },
    /// Give up on a pending or processing event: it becomes failed.
    #[command(alias = "fail")]
    Cancel {
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
    /// Check the outbox for damage: on a file, `PRAGMA integrity_check`
    /// (indexes against their table too) and every event row; on a server,
    /// that its tables and columns are what this build expects.
    Verify {
        /// Only `PRAGMA quick_check` (the file's structure, not its
        /// indexes against the table): faster on a huge file.
        #[arg(long)]
        quick: bool,
    },
    /// Write a consistent copy of the outbox (including the WAL) to PATH.
    Backup {
        /// Where to write the copy; must not exist.
        path: PathBuf,
    },
    /// Deliver events over HTTP or to a command until interrupted.
    Relay(Box<relay::RelayArgs>),
    /// Serve a dashboard of the outbox (and /metrics) on 127.0.0.1.
    Ui(ui::UiArgs),
}

#[derive(Args)]
struct ListArgs {
    /// pending, processing, done or failed.
    #[arg(long, value_parser = status_arg)]
    status: Option<Status>,
    /// Only this event type (repeatable).
    #[arg(long = "type")]
    event_type: Vec<String>,
    /// Say why each event is where it is (a WHY column; `why` in JSON).
    #[arg(long)]
    why: bool,
    /// Only events waiting for this reason: due, scheduled, behind_key,
    /// held_back, leased, done or failed (of those the other filters and
    /// --limit select), with a count per reason at the end.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(sqlite_outbox::Why::KINDS))]
    reason: Option<String>,
    /// Only this organisation.
    #[arg(long)]
    org: Option<Uuid>,
    /// Only this user.
    #[arg(long)]
    user: Option<Uuid>,
    /// Only this correlation id.
    #[arg(long)]
    correlation_id: Option<String>,
    /// Only this ordering key.
    #[arg(long)]
    ordering_key: Option<String>,
    /// Only events whose last error contains this text.
    #[arg(long)]
    error: Option<String>,
    /// Only events after this seq in the list's order (below it with
    /// --newest): the last seq of the page before.
    #[arg(long)]
    after: Option<i64>,
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
    /// The W3C traceparent of the work that enqueues it (or set
    /// TRACEPARENT), e.g. 00-<32 hex>-<16 hex>-01.
    #[arg(long, env = "TRACEPARENT")]
    traceparent: Option<String>,
    /// Attempts before the event fails.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: Option<u32>,
    /// 0 (the default, lowest) to 255: among due events, higher goes first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = priority_arg)]
    priority: u8,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn priority_arg(s: &str) -> Result<u8, String> {
    s.parse().map_err(|_| {
        format!(
            "{} is not a priority: 0 (the default, lowest) to 255; \
             to put some events behind others, raise the others",
            sqlite_outbox::text::excerpt(s, 20)
        )
    })
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

/// An error as one line: the library's `Display` names the cause, and
/// what lies below it (a refused connection under a PostgreSQL error) is
/// added unless already said.
fn describe(err: &sqlite_outbox::Error) -> String {
    let mut text = err.to_string();
    let mut next = std::error::Error::source(err);
    while let Some(e) = next {
        let line = e.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        next = e.source();
    }
    // What to do about the TLS failures a first connection meets.
    if text.contains("invalid peer certificate") {
        text.push_str(
            " (the server's certificate did not verify: give sslrootcert=PATH with the CA that \
             signed it, or sslmode=require to encrypt without checking who the server is)",
        );
    } else if text.contains("server does not support TLS") {
        text.push_str(
            " (the server offers no TLS; sslmode=disable would send everything in clear)",
        );
    }
    text
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
        // The layout of the database --db names: a file's, or a server's.
        match cli.db.as_deref().map(|d| db::Db::new(d, &cli.schema)) {
            Some(db::Db::Server { .. }) => print!("{}", sqlite_outbox::PostgresStore::SCHEMA_SQL),
            _ => print!("{SCHEMA_SQL}"),
        }
        return Ok(());
    }
    let db = cli
        .db
        .as_deref()
        .ok_or_else(|| Failure::usage("no database: give --db PATH or set OUTBOX_DB"))?;
    let db = &db::Db::new(db, &cli.schema);
    let json = cli.json;
    match &cli.command {
        Command::Schema => Ok(()),
        Command::Init => commands::file::init(db, json),
        Command::Verify { quick } => commands::file::verify(db, json, *quick),
        Command::Backup { path } => commands::file::backup(db, json, path),
        Command::Stats { prometheus } => commands::inspect::stats(db, json, *prometheus),
        Command::List(a) => commands::inspect::list(db, json, a),
        Command::Show { id } => commands::inspect::show(db, json, id),
        Command::Enqueue(a) => commands::change::enqueue(db, json, a),
        Command::Requeue {
            id,
            failed,
            event_type,
        } => commands::change::requeue(db, json, id.as_deref(), *failed, event_type.as_deref()),
        Command::Cancel { id, reason } => commands::change::cancel(db, json, id, reason),
        Command::Purge { older_than } => commands::change::purge(db, json, *older_than),
        Command::Erase { org, user } => commands::change::erase(db, json, *org, *user),
        Command::Relay(a) => relay::run(db, json, a),
        Command::Ui(a) => ui::run(db, a),
    }
}
