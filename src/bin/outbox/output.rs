//! Printing results, and the helpers every command shares.

use std::fmt::Write as _;
use std::io::{Read, Write};

use serde_json::Value;
use sqlite_outbox::EventId;

use crate::Failure;

pub(crate) fn output(
    json_mode: bool,
    value: Value,
    text: impl FnOnce() -> String,
) -> Result<(), Failure> {
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

pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
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

pub(crate) fn parse_id(text: &str) -> Result<EventId, Failure> {
    text.parse()
        .map_err(|e: sqlite_outbox::ParseEventIdError| Failure::usage(e.to_string()))
}

pub(crate) fn read_payload(arg: &str) -> Result<String, Failure> {
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
