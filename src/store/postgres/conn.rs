//! The store's pooled connections, each with its prepared statements: a
//! statement is parsed and planned once per connection, then each use is
//! one round trip.

use std::collections::HashMap;

use postgres::types::ToSql;
use std::sync::Arc;

use postgres::{Row, Statement};

use crate::error::Result;

/// A connection and the statements prepared on it.
pub(super) struct Conn {
    pub(super) client: postgres::Client,
    cache: HashMap<String, Statement>,
}

/// Opens connections for the pool.
#[derive(Debug)]
pub(super) struct Manager {
    pub(super) target: Arc<super::PostgresTarget>,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Conn, postgres::Error> {
        Ok(Conn {
            client: self.target.connect()?,
            cache: HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), postgres::Error> {
        conn.client.simple_query("").map(|_| ())
    }

    /// A connection the server dropped reports itself closed after its
    /// first failed use, and is not given out again.
    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.client.is_closed()
    }
}

impl Conn {
    /// A transaction on this connection that uses its prepared statements.
    pub(super) fn transaction(&mut self) -> Result<Session<'_, postgres::Transaction<'_>>> {
        Ok(Session {
            client: self.client.transaction()?,
            cache: &mut self.cache,
        })
    }

    /// Statements outside a transaction, prepared once.
    pub(super) fn session(&mut self) -> Session<'_, &mut postgres::Client> {
        Session {
            client: &mut self.client,
            cache: &mut self.cache,
        }
    }
}

/// A client (or transaction) whose statements are prepared once per
/// connection.
pub(super) struct Session<'a, C> {
    pub(super) client: C,
    cache: &'a mut HashMap<String, Statement>,
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

/// A client or a transaction: what a session runs its statements on.
pub(super) trait Exec {
    fn prepare(&mut self, sql: &str) -> Result<Statement, postgres::Error>;
    fn execute(&mut self, s: &Statement, p: &Params<'_>) -> Result<u64, postgres::Error>;
    fn query(&mut self, s: &Statement, p: &Params<'_>) -> Result<Vec<Row>, postgres::Error>;
}

impl Exec for postgres::Client {
    fn prepare(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        postgres::Client::prepare(self, sql)
    }
    fn execute(&mut self, s: &Statement, p: &Params<'_>) -> Result<u64, postgres::Error> {
        postgres::Client::execute(self, s, p)
    }
    fn query(&mut self, s: &Statement, p: &Params<'_>) -> Result<Vec<Row>, postgres::Error> {
        postgres::Client::query(self, s, p)
    }
}

impl Exec for postgres::Transaction<'_> {
    fn prepare(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        postgres::Transaction::prepare(self, sql)
    }
    fn execute(&mut self, s: &Statement, p: &Params<'_>) -> Result<u64, postgres::Error> {
        postgres::Transaction::execute(self, s, p)
    }
    fn query(&mut self, s: &Statement, p: &Params<'_>) -> Result<Vec<Row>, postgres::Error> {
        postgres::Transaction::query(self, s, p)
    }
}

impl<T: Exec + ?Sized> Exec for &mut T {
    fn prepare(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        (**self).prepare(sql)
    }
    fn execute(&mut self, s: &Statement, p: &Params<'_>) -> Result<u64, postgres::Error> {
        (**self).execute(s, p)
    }
    fn query(&mut self, s: &Statement, p: &Params<'_>) -> Result<Vec<Row>, postgres::Error> {
        (**self).query(s, p)
    }
}

impl<C: Exec> Session<'_, C> {
    fn statement(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.cache.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.cache.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    pub(super) fn execute(&mut self, sql: &str, params: &Params<'_>) -> Result<u64> {
        let s = self.statement(sql)?;
        Ok(self.client.execute(&s, params)?)
    }

    /// As `query`, with the server's error as it is.
    pub(super) fn query_pg(
        &mut self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, postgres::Error> {
        let s = self.statement(sql)?;
        self.client.query(&s, params)
    }

    pub(super) fn query(&mut self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>> {
        Ok(self.query_pg(sql, params)?)
    }

    pub(super) fn query_one(&mut self, sql: &str, params: &Params<'_>) -> Result<Row> {
        self.query_opt(sql, params)?
            .ok_or_else(|| crate::error::Error::invalid("the query returned no row"))
    }

    pub(super) fn query_opt(&mut self, sql: &str, params: &Params<'_>) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
}

impl Session<'_, postgres::Transaction<'_>> {
    pub(super) fn commit(self) -> Result<()> {
        Ok(self.client.commit()?)
    }
}
