//! What `--db` names: an outbox file, or a PostgreSQL server (a
//! `postgres://` URL or libpq's `host=… dbname=…`), and how to open it.
//! A server's password never appears in anything printed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sqlite_outbox::{Operator, PostgresStore, PostgresTarget, RetryPolicy, SqliteStore};

use crate::{describe, Failure};

/// What opening may do to an outbox on a server.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    /// Nothing: read-only transactions, no DDL.
    Read,
    /// Migrate an outbox that is there.
    Existing,
    /// Create one when it is missing.
    Create,
}

pub(crate) enum Db {
    File(PathBuf),
    Server {
        url: String,
        schema: String,
        /// The URL without its password, for messages.
        shown: String,
    },
}

impl Db {
    pub(crate) fn new(db: &Path, schema: &str) -> Db {
        match db.to_str() {
            Some(url) if is_server(url) => Db::Server {
                url: url.to_owned(),
                schema: schema.to_owned(),
                shown: without_password(url),
            },
            _ => Db::File(db.to_owned()),
        }
    }

    /// Opens an existing outbox to read: a file is never created, nor
    /// written to.
    pub(crate) fn open_read(&self) -> Result<Arc<dyn Operator>, Failure> {
        match self {
            Db::File(path) => {
                if !path.exists() {
                    return Err(Failure(format!("{self}: no such file"), 1));
                }
                let store = SqliteStore::builder(path)
                    .read_only(true)
                    .build()
                    .map_err(|e| self.fail(&e))?;
                Ok(Arc::new(store))
            }
            Db::Server { .. } => self.open_server(RetryPolicy::default(), Open::Read),
        }
    }

    /// Opens an existing outbox to change it: a file, or an outbox in a
    /// file or schema, is never created.
    pub(crate) fn open_write(&self) -> Result<Arc<dyn Operator>, Failure> {
        self.open_write_with(RetryPolicy::default(), false)
    }

    /// As `open_write`, with the retry policy of the store; `create`: the
    /// outbox may be created in an existing file, or in the server's
    /// schema (for the relay, which waits for events).
    pub(crate) fn open_write_with(
        &self,
        policy: RetryPolicy,
        create: bool,
    ) -> Result<Arc<dyn Operator>, Failure> {
        match self {
            Db::File(path) => {
                if !path.exists() {
                    return Err(Failure(format!("{self}: no such file"), 1));
                }
                let store = SqliteStore::builder(path)
                    .retry_policy(policy)
                    .create(create)
                    .build()
                    .map_err(|e| self.fail(&e))?;
                Ok(Arc::new(store))
            }
            Db::Server { .. } => {
                self.open_server(policy, if create { Open::Create } else { Open::Existing })
            }
        }
    }

    /// Opens the outbox, creating it if missing (a file, or the objects in
    /// the server's schema).
    pub(crate) fn open_or_create(&self) -> Result<Arc<dyn Operator>, Failure> {
        match self {
            Db::File(path) => Ok(Arc::new(
                SqliteStore::open(path).map_err(|e| self.fail(&e))?,
            )),
            Db::Server { .. } => self.open_server(RetryPolicy::default(), Open::Create),
        }
    }

    /// The outbox file, for the commands that work on one.
    pub(crate) fn file(&self, command: &str) -> Result<&Path, Failure> {
        match self {
            Db::File(path) => Ok(path),
            Db::Server { .. } => Err(Failure::usage(format!(
                "{command} works on an outbox file; on PostgreSQL use the server's own tools \
                 (pg_dump for a copy, amcheck for damage)"
            ))),
        }
    }

    fn open_server(&self, policy: RetryPolicy, open: Open) -> Result<Arc<dyn Operator>, Failure> {
        let Db::Server { url, schema, .. } = self else {
            return Err(Failure("not a server".into(), 1));
        };
        let store = PostgresStore::builder(url)
            .schema(schema)
            .retry_policy(policy)
            .read_only(open == Open::Read)
            .create(open == Open::Create)
            .build()
            .map_err(|e| self.fail(&e))?;
        Ok(Arc::new(store))
    }

    /// A library error about this outbox: exit 2 for input the user can
    /// fix, 1 otherwise.
    pub(crate) fn fail(&self, err: &sqlite_outbox::Error) -> Failure {
        let code = if err.is_invalid_input() { 2 } else { 1 };
        Failure(format!("{self}: {}", describe(err)), code)
    }
}

impl fmt::Display for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Db::File(path) => write!(f, "{}", path.display()),
            Db::Server { shown, schema, .. } => write!(f, "{shown} (schema {schema})"),
        }
    }
}

fn is_server(db: &str) -> bool {
    PostgresTarget::looks_like(db)
}

/// The connection string as it may be shown: rebuilt from what was read
/// (host, port, user, database, TLS mode), never from the text given, so
/// no form of a password can reach a message.
fn without_password(url: &str) -> String {
    match PostgresTarget::parse(url) {
        Ok(target) => target.to_string(),
        Err(_) => "a PostgreSQL connection string that cannot be read".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_never_shown() {
        for (url, shown) in [
            (
                "postgres://app:s3cret@db/app",
                "host=db user=app dbname=app sslmode=verify-full",
            ),
            (
                "postgresql://app@db/app?password=s3cret&sslmode=disable",
                "host=db user=app dbname=app sslmode=disable",
            ),
            (
                "host=/tmp port=5 password=s3cret user=x",
                "host=/tmp port=5 user=x sslmode=prefer",
            ),
            (
                "host = /tmp password = 's3 cr et' user=x",
                "host=/tmp user=x sslmode=prefer",
            ),
            (
                "postgres://app:s3cret@[bad",
                "a PostgreSQL connection string that cannot be read",
            ),
        ] {
            assert_eq!(without_password(url), shown);
        }
    }

    #[test]
    fn servers_and_files_are_told_apart() {
        assert!(is_server("postgres://x/y"));
        assert!(is_server("host=/tmp dbname=app"));
        assert!(is_server("host = /tmp dbname = app"));
        assert!(!is_server("app.db"));
        assert!(!is_server("./host=1.db"));
    }
}
