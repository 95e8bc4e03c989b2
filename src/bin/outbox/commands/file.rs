//! Commands about the file: `init`, `verify`, `backup`.

use std::path::Path;

use serde_json::json;
use sqlite_outbox::SqliteStore;

use crate::db::Db;
use crate::output::output;
use crate::Failure;

pub(crate) fn init(db: &Db, json_mode: bool) -> Result<(), Failure> {
    db.open_or_create()?;
    let value = match db {
        Db::File(path) => json!({"path": path, "initialised": true}),
        Db::Server { schema, .. } => json!({"schema": schema, "initialised": true}),
    };
    output(json_mode, value, || format!("{db}: outbox ready"))
}

/// The file, opened read-only, for the commands that work on files only.
fn open_file(db: &Db, command: &str) -> Result<SqliteStore, Failure> {
    let path = db.file(command)?;
    if !path.exists() {
        return Err(Failure(format!("{db}: no such file"), 1));
    }
    SqliteStore::builder(path)
        .read_only(true)
        .build()
        .map_err(|e| db.fail(&e))
}

pub(crate) fn verify(db: &Db, json_mode: bool, quick: bool) -> Result<(), Failure> {
    let fail = |e: sqlite_outbox::Error| db.fail(&e);
    match db {
        Db::File(_) => {
            let store = open_file(db, "verify")?;
            if quick {
                store.verify_quick()
            } else {
                store.verify()
            }
            .map_err(&fail)?;
        }
        // Opening checks the schema's tables, columns and types, and
        // changes nothing.
        Db::Server { .. } => {
            db.open_read()?;
        }
    }
    output(json_mode, json!({"ok": true}), || format!("{}: ok", db))
}

pub(crate) fn backup(db: &Db, json_mode: bool, path: &Path) -> Result<(), Failure> {
    let fail = |e: sqlite_outbox::Error| db.fail(&e);
    open_file(db, "backup")?.backup(path).map_err(&fail)?;
    output(json_mode, json!({"backup": path}), || {
        format!("wrote {}", path.display())
    })
}
