//! Commands about the file: `init`, `verify`, `backup`.

use std::path::Path;

use serde_json::json;
use sqlite_outbox::SqliteStore;

use crate::output::{open_read, output};
use crate::{failed, Failure};

pub(crate) fn init(db: &Path, json_mode: bool) -> Result<(), Failure> {
    let fail = failed(db);
    let store = SqliteStore::open(db).map_err(&fail)?;
    output(
        json_mode,
        json!({"path": store.path(), "initialised": true}),
        || format!("{}: outbox ready", db.display()),
    )
}

pub(crate) fn verify(db: &Path, json_mode: bool) -> Result<(), Failure> {
    let fail = failed(db);
    open_read(db)?.verify().map_err(&fail)?;
    output(json_mode, json!({"ok": true}), || {
        format!("{}: ok", db.display())
    })
}

pub(crate) fn backup(db: &Path, json_mode: bool, path: &Path) -> Result<(), Failure> {
    let fail = failed(db);
    open_read(db)?.backup(path).map_err(&fail)?;
    output(json_mode, json!({"backup": path}), || {
        format!("wrote {}", path.display())
    })
}
