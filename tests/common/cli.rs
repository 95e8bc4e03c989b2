//! Running the `outbox` binary as an operator would.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_outbox");

/// `outbox --db DB ARGS...`, with no input and none of the environment
/// variables that would change what it does.
pub fn outbox(db: &Path, args: &[&str]) -> std::io::Result<Output> {
    Command::new(BIN)
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("OUTBOX_DB")
        .env_remove("OUTBOX_HEADERS")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
}

/// Its stdout if it succeeded, else the exit code and stderr.
pub fn ok(out: &Output) -> Result<String, String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

pub fn json_of(out: &Output) -> Result<Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&ok(out)?)?)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Checks `text` with `promtool check metrics`, the Prometheus project's
/// own parser and linter. Returns false (with a line saying so) when
/// promtool is missing outside CI; in CI (`CI=true`) that fails instead.
pub fn promtool_accepts(text: &str) -> Result<bool, Box<dyn std::error::Error>> {
    use std::io::Write as _;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is required in CI (apt-get install prometheus)"
        );
        eprintln!("SKIPPED: promtool not installed");
        return Ok(false);
    };
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(true)
}
