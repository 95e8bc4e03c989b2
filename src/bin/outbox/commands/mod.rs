//! One file per group of commands; `main.rs` dispatches to them.

pub(crate) mod change;
pub(crate) mod file;
pub(crate) mod inspect;
