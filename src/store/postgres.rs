//! The PostgreSQL store: jobs in one table, shared by every instance that uses the database.

use std::collections::HashSet;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use sqlx::postgres::{PgListener, PgPool, PgRow};
use sqlx::{AssertSqlSafe, Row, SqlSafeStr, SqlStr};

use super::codec::{decode_change, decode_response, encode_response, from_millis, to_millis};
use super::{Changes, Created, JobStore, StoreError, Transition, once_owner};
use crate::job::{JobId, JobKind, JobOutcome, JobRecord, JobState, StoredResponse};

/// How many expired rows one `sweep` statement deletes, so that a large backlog never holds
/// locks on, or writes WAL for, a huge number of rows at once.
const SWEEP_BATCH: i64 = 1000;

/// The longest table name: the index names add up to 10 bytes to it, and PostgreSQL silently
/// truncates identifiers longer than 63 bytes.
const MAX_TABLE_LEN: usize = 53;

/// The rows among which an owner's idempotency keys are unique: failed jobs do not count.
const ONCE_PREDICATE: &str = "idempotency_key IS NOT NULL AND state <> 'failed'";

// Column order of every `SELECT` that builds a record; `decode_row` reads them by position.
const COLUMNS: &str = "id, kind, state, owner, method, target, progress, instance, lease_until_ms, \
                       response, created_ms, finished_ms, expires_ms";

/// Jobs in a PostgreSQL table, shared by every instance of the layer that uses the database.
///
/// Bring your own [`PgPool`] (the [`sqlx`](crate::store::sqlx) version this crate is built on is
/// re-exported as `tower_fhir_async::store::sqlx`), call [`migrate`](Self::migrate) once at
/// start-up, and hand the store to the layer. Clones share the pool.
///
/// Every state change is a single compare-and-set statement, so a cancel and a completion racing
/// on two instances resolve to whichever commits first. All times come from the layer's clock and
/// are stored as Unix milliseconds (`bigint`); the database's own clock is never consulted.
/// Expired rows are never served; [`sweep`](JobStore::sweep) deletes them in batches.
///
/// A kick-off with an idempotency key ([`create_once`](JobStore::create_once)) keeps the key in
/// the job's row; a partial unique index on `(owner, idempotency_key)` over the rows that are not
/// failed makes the check and the insert one `INSERT … ON CONFLICT` statement.
///
/// Every cancel, end and progress change sends `NOTIFY` on
/// [`changes_channel`](Self::changes_channel), in the same transaction as the change;
/// [`changes`](JobStore::changes) listens on it, holding one connection of the pool for as long
/// as the stream lives.
///
/// ```no_run
/// use tower_fhir_async::store::sqlx::postgres::PgPoolOptions;
/// use tower_fhir_async::{AsyncLayer, PostgresStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = PgPoolOptions::new()
///     .max_connections(16)
///     .connect("postgres://fhir@db.internal/fhir")
///     .await?;
/// let store = PostgresStore::new(pool).with_table("fhir_async_jobs");
/// store.migrate().await?;
/// let layer = AsyncLayer::builder(store).build();
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Statements>,
}

impl PostgresStore {
    /// The table used unless [`with_table`](Self::with_table) names another.
    pub const DEFAULT_TABLE: &'static str = "tower_fhir_async_jobs";

    /// A store keeping jobs in the table [`DEFAULT_TABLE`](Self::DEFAULT_TABLE), through `pool`.
    ///
    /// Nothing is sent to the database until the store is used; call
    /// [`migrate`](Self::migrate) to create the table.
    ///
    /// ```no_run
    /// use tower_fhir_async::PostgresStore;
    /// use tower_fhir_async::store::sqlx::PgPool;
    ///
    /// let pool = PgPool::connect_lazy("postgres://fhir@db.internal/fhir").unwrap();
    /// let store = PostgresStore::new(pool);
    /// assert_eq!(store.table(), PostgresStore::DEFAULT_TABLE);
    /// ```
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            sql: Arc::new(Statements::new(Self::DEFAULT_TABLE)),
        }
    }

    /// Keeps jobs in the table `name` instead, in the connection's `search_path` schema; for
    /// instance to give separate deployments sharing a database separate tables.
    ///
    /// The name is used as written (quoted, so case matters), and names the
    /// [`changes_channel`](Self::changes_channel).
    ///
    /// # Panics
    ///
    /// If `name` is not 1 to 53 ASCII letters, digits and underscores, starting with a letter or
    /// an underscore. Table names are part of SQL text, so nothing else is accepted.
    ///
    /// ```no_run
    /// use tower_fhir_async::PostgresStore;
    /// use tower_fhir_async::store::sqlx::PgPool;
    ///
    /// let pool = PgPool::connect_lazy("postgres://fhir@db.internal/fhir").unwrap();
    /// let store = PostgresStore::new(pool).with_table("tenant_a_jobs");
    /// assert_eq!(store.table(), "tenant_a_jobs");
    /// ```
    #[must_use]
    pub fn with_table(mut self, name: &str) -> Self {
        if let Err(why) = check_table_name(name) {
            panic!("invalid PostgresStore table name {name:?}: {why}");
        }
        self.sql = Arc::new(Statements::new(name));
        self
    }

    /// The table the jobs are kept in.
    ///
    /// ```no_run
    /// # let pool = tower_fhir_async::store::sqlx::PgPool::connect_lazy("postgres://db").unwrap();
    /// let store = tower_fhir_async::PostgresStore::new(pool);
    /// println!("jobs are in {}", store.table());
    /// ```
    pub fn table(&self) -> &str {
        &self.sql.table
    }

    /// The pool the store uses.
    ///
    /// ```no_run
    /// # let pool = tower_fhir_async::store::sqlx::PgPool::connect_lazy("postgres://db").unwrap();
    /// let store = tower_fhir_async::PostgresStore::new(pool);
    /// println!("{} connections open", store.pool().size());
    /// ```
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the table and its indexes if they do not exist yet, and brings a table created by
    /// an earlier version of this crate up to date. Safe to call on every start, from several
    /// instances at once: the work is serialised by an advisory lock and every statement is
    /// `IF NOT EXISTS`.
    ///
    /// Upgrading a table from before idempotent kick-offs adds a column (a catalog change only)
    /// and builds a unique index, which holds writes to the table while it scans it, once.
    ///
    /// The role needs `CREATE` on the schema the first time; afterwards, `SELECT`, `INSERT`,
    /// `UPDATE` and `DELETE` on the table are all the store uses.
    ///
    /// ```no_run
    /// # async fn run(pool: tower_fhir_async::store::sqlx::PgPool)
    /// # -> Result<(), tower_fhir_async::StoreError> {
    /// let store = tower_fhir_async::PostgresStore::new(pool);
    /// store.migrate().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.error(e))?;
        // Concurrent `CREATE TABLE IF NOT EXISTS` can still fail on the catalog's unique index;
        // the lock, released at commit, makes instances starting together take turns.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("tower_fhir_async.migrate.{}", self.sql.table))
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        for statement in &self.sql.migrate {
            sqlx::query(statement.clone())
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        }
        tx.commit().await.map_err(|e| self.error(e))
    }

    /// A store error from a driver error, with what to do when the table is missing.
    fn error(&self, error: sqlx::Error) -> StoreError {
        match &error {
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(format!(
                "PostgreSQL table {:?} does not have the expected columns: {error}",
                self.sql.table
            )),
            sqlx::Error::Database(db) if db.code().as_deref() == Some(UNDEFINED_TABLE) => {
                StoreError::Unavailable(Box::new(NotMigrated {
                    table: self.sql.table.clone(),
                    missing: Missing::Table,
                    source: error,
                }))
            }
            sqlx::Error::Database(db)
                if matches!(
                    db.code().as_deref(),
                    Some(UNDEFINED_COLUMN | NO_ARBITER_INDEX)
                ) =>
            {
                StoreError::Unavailable(Box::new(NotMigrated {
                    table: self.sql.table.clone(),
                    missing: Missing::Upgrade,
                    source: error,
                }))
            }
            _ => StoreError::Unavailable(Box::new(error)),
        }
    }
}

/// SQLSTATE `undefined_table`.
const UNDEFINED_TABLE: &str = "42P01";

/// SQLSTATE `undefined_column`.
const UNDEFINED_COLUMN: &str = "42703";

/// SQLSTATE `invalid_column_reference`, raised when no unique index matches `ON CONFLICT`.
const NO_ARBITER_INDEX: &str = "42P10";

/// SQLSTATE `unique_violation`.
const UNIQUE_VIOLATION: &str = "23505";

/// `migrate` was not run against this database, or not since this version of the crate.
#[derive(Debug)]
struct NotMigrated {
    table: Arc<str>,
    missing: Missing,
    source: sqlx::Error,
}

#[derive(Debug)]
enum Missing {
    /// The table does not exist.
    Table,
    /// The table lacks a column or index that this version added.
    Upgrade,
}

impl fmt::Display for NotMigrated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.missing {
            Missing::Table => write!(
                f,
                "the PostgreSQL table {:?} does not exist; call PostgresStore::migrate() once at \
                 start-up to create it",
                self.table
            ),
            Missing::Upgrade => write!(
                f,
                "the PostgreSQL table {:?} was created by an earlier version of \
                 tower-fhir-async; call PostgresStore::migrate() once at start-up to upgrade it",
                self.table
            ),
        }
    }
}

impl StdError for NotMigrated {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.source)
    }
}

fn check_table_name(name: &str) -> Result<(), &'static str> {
    let mut bytes = name.bytes();
    match bytes.next() {
        None => return Err("it is empty"),
        Some(b) if !(b.is_ascii_alphabetic() || b == b'_') => {
            return Err("it must start with a letter or an underscore");
        }
        Some(_) => {}
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err("only ASCII letters, digits and underscores are allowed");
    }
    if name.len() > MAX_TABLE_LEN {
        return Err("it must be at most 53 bytes long");
    }
    Ok(())
}

/// Every statement, written once for the table's name. Only these strings contain the name,
/// which [`check_table_name`] restricted to letters, digits and underscores; every value is a
/// bind parameter.
#[derive(Debug)]
struct Statements {
    table: Arc<str>,
    migrate: Vec<SqlStr>,
    create: SqlStr,
    create_once: SqlStr,
    get: SqlStr,
    start: SqlStr,
    finish: SqlStr,
    cancel: SqlStr,
    set_progress: SqlStr,
    renew_leases: SqlStr,
    abandon: SqlStr,
    fail_lapsed: SqlStr,
    sweep: SqlStr,
}

impl Statements {
    fn new(table: &str) -> Self {
        let t = format!("\"{table}\"");
        let index = |suffix: &str| format!("\"{table}_{suffix}\"");
        // An `Arc<str>` statement is cloned for each query without copying the text.
        let sql = |text: String| AssertSqlSafe(Arc::<str>::from(text)).into_sql_str();
        Self {
            table: table.into(),
            migrate: vec![
                sql(format!(
                    "CREATE TABLE IF NOT EXISTS {t} (
                        id text COLLATE \"C\" PRIMARY KEY,
                        kind text NOT NULL,
                        state text NOT NULL,
                        owner text,
                        method text NOT NULL,
                        target text NOT NULL,
                        progress text,
                        instance text,
                        lease_until_ms bigint,
                        response bytea,
                        created_ms bigint NOT NULL,
                        finished_ms bigint,
                        expires_ms bigint,
                        idempotency_key text
                    )"
                )),
                // Tables created before idempotent kick-offs. Checked first, because `ALTER TABLE`
                // locks out every reader and writer even when the column exists already.
                sql(format!(
                    "DO $$ BEGIN
                        IF NOT EXISTS (SELECT 1 FROM pg_attribute
                            WHERE attrelid = '{t}'::regclass
                            AND attname = 'idempotency_key' AND NOT attisdropped) THEN
                            ALTER TABLE {t} ADD COLUMN idempotency_key text;
                        END IF;
                    END $$"
                )),
                // `create_once`: one job per owner and key among those that are not failed.
                sql(format!(
                    "CREATE UNIQUE INDEX IF NOT EXISTS {} ON {t} (owner, idempotency_key) \
                     WHERE {ONCE_PREDICATE}",
                    index("once")
                )),
                // `fail_lapsed`: running jobs by lease, unstarted jobs by creation time.
                sql(format!(
                    "CREATE INDEX IF NOT EXISTS {} ON {t} (lease_until_ms) WHERE state = 'running'",
                    index("lease")
                )),
                sql(format!(
                    "CREATE INDEX IF NOT EXISTS {} ON {t} (created_ms) WHERE state = 'accepted'",
                    index("unstarted")
                )),
                // `sweep`: only finished jobs expire.
                sql(format!(
                    "CREATE INDEX IF NOT EXISTS {} ON {t} (expires_ms) \
                     WHERE expires_ms IS NOT NULL",
                    index("expires")
                )),
            ],
            // `ON CONFLICT DO NOTHING` rather than catching the unique violation: the server logs
            // no error and the outcome is the same, one row or none.
            create: sql(format!(
                "INSERT INTO {t} ({COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                 ON CONFLICT (id) DO NOTHING"
            )),
            // The partial unique index makes concurrent kick-offs with the same owner and key
            // take turns. On a conflict, an expired job (absent to every read) is replaced by the
            // new one; a job that counts is left as it is (a no-op update, so that its id can be
            // returned); a cancelled job's row is gone, a failed one is outside the index.
            create_once: sql(format!(
                "INSERT INTO {t} AS j ({COLUMNS}, idempotency_key) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
                 ON CONFLICT (owner, idempotency_key) WHERE {ONCE_PREDICATE} \
                 DO UPDATE SET {} \
                 RETURNING id",
                COLUMNS
                    .split(", ")
                    .chain(["idempotency_key"])
                    .map(|c| format!(
                        "{c} = CASE WHEN j.expires_ms <= $15 THEN EXCLUDED.{c} ELSE j.{c} END"
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            get: sql(format!(
                "SELECT {COLUMNS} FROM {t} \
                 WHERE id = $1 AND (expires_ms IS NULL OR expires_ms > $2) \
                 AND state <> 'abandoned'"
            )),
            start: sql(format!(
                "UPDATE {t} SET state = 'running', instance = $2, lease_until_ms = $3 \
                 WHERE id = $1 AND state = 'accepted'"
            )),
            // Each change is announced on the changes channel in its own statement, so the
            // notice goes out only if the change commits.
            finish: sql(format!(
                "WITH done AS (UPDATE {t} SET state = $2, response = $3, progress = NULL, \
                 instance = NULL, lease_until_ms = NULL, finished_ms = $4, expires_ms = $5 \
                 WHERE id = $1 AND state IN ('accepted', 'running') RETURNING id) \
                 SELECT id, pg_notify($6, 'updated ' || id) FROM done"
            )),
            // One statement, so one transaction: the notification goes out only if the delete
            // commits. An expired row is deleted too, but reported as absent and not announced.
            cancel: sql(format!(
                "WITH gone AS (DELETE FROM {t} WHERE id = $1 \
                 RETURNING state, (expires_ms IS NULL OR expires_ms > $2) AS live) \
                 SELECT live, \
                 CASE WHEN live THEN pg_notify($3, 'cancelled ' || $1) END \
                 FROM gone"
            )),
            set_progress: sql(format!(
                "WITH done AS (UPDATE {t} SET progress = $2 \
                 WHERE id = $1 AND state IN ('accepted', 'running') \
                 AND progress IS DISTINCT FROM $2 RETURNING id) \
                 SELECT id, pg_notify($3, 'updated ' || id) FROM done"
            )),
            renew_leases: sql(format!(
                "UPDATE {t} SET lease_until_ms = $3 \
                 WHERE id = ANY($1) AND state = 'running' AND instance = $2 RETURNING id"
            )),
            // The row becomes a tombstone until `$3` (then swept): a late insert of the same id
            // conflicts on the primary key; reads skip it; without an owner and key it is
            // outside the idempotency index.
            abandon: sql(format!(
                "INSERT INTO {t} (id, kind, state, method, target, created_ms, expires_ms) \
                 VALUES ($1, $4, 'abandoned', '', '', $2, $3) \
                 ON CONFLICT (id) DO UPDATE SET state = 'abandoned', owner = NULL, target = '', \
                 progress = NULL, instance = NULL, lease_until_ms = NULL, response = NULL, \
                 finished_ms = NULL, expires_ms = $3, idempotency_key = NULL"
            )),
            fail_lapsed: sql(format!(
                "WITH done AS (UPDATE {t} SET state = $3, response = $4, progress = NULL, \
                 instance = NULL, lease_until_ms = NULL, finished_ms = $1, expires_ms = $5 \
                 WHERE (state = 'running' AND lease_until_ms <= $1) \
                 OR (state = 'accepted' AND created_ms <= $2) \
                 RETURNING id) \
                 SELECT id, pg_notify($6, 'updated ' || id) FROM done"
            )),
            // `ctid = ANY(ARRAY(..))` is a TID scan (`ctid IN (..)` would scan the whole table);
            // `SKIP LOCKED` lets instances sweep at the same time without waiting on each other;
            // the outer condition re-checks rows changed since the inner scan.
            sweep: sql(format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY(\
                 SELECT ctid FROM {t} WHERE expires_ms <= $1 LIMIT {SWEEP_BATCH} \
                 FOR UPDATE SKIP LOCKED)) AND expires_ms <= $1"
            )),
        }
    }
}

/// The columns a [`JobState`] is stored in.
struct StateColumns<'a> {
    state: &'static str,
    instance: Option<&'a str>,
    lease_until_ms: Option<i64>,
    response: Option<Vec<u8>>,
}

fn state_columns(state: &JobState) -> StateColumns<'_> {
    let (name, response) = match state {
        JobState::Running {
            instance,
            lease_until,
        } => {
            return StateColumns {
                state: "running",
                instance: Some(instance),
                lease_until_ms: Some(to_millis(*lease_until)),
                response: None,
            };
        }
        JobState::Accepted => ("accepted", None),
        JobState::Completed(response) => ("completed", Some(response)),
        JobState::Failed(response) => ("failed", Some(response)),
    };
    StateColumns {
        state: name,
        instance: None,
        lease_until_ms: None,
        response: response.map(encode_response),
    }
}

fn outcome_columns(outcome: &JobOutcome) -> (&'static str, Vec<u8>) {
    match outcome {
        JobOutcome::Completed(response) => ("completed", encode_response(response)),
        JobOutcome::Failed(response) => ("failed", encode_response(response)),
    }
}

/// A record from a row of [`COLUMNS`].
fn decode_row(row: &PgRow) -> Result<JobRecord, sqlx::Error> {
    let corrupt = |why: String| sqlx::Error::Decode(why.into());
    let id: String = row.try_get(0)?;
    let id = JobId::parse(&id).ok_or_else(|| corrupt(format!("invalid job id {id:?}")))?;
    let kind: String = row.try_get(1)?;
    let kind =
        JobKind::from_name(&kind).ok_or_else(|| corrupt(format!("unknown job kind {kind:?}")))?;
    let state: String = row.try_get(2)?;
    let response = || -> Result<StoredResponse, sqlx::Error> {
        let bytes: Option<Vec<u8>> = row.try_get(9)?;
        let bytes = bytes.ok_or_else(|| corrupt(format!("a {state} job without a response")))?;
        decode_response(&bytes).map_err(|e| corrupt(e.to_string()))
    };
    let state = match state.as_str() {
        "accepted" => JobState::Accepted,
        "running" => {
            let instance: Option<String> = row.try_get(7)?;
            let lease: Option<i64> = row.try_get(8)?;
            match (instance, lease) {
                (Some(instance), Some(lease)) => JobState::Running {
                    instance,
                    lease_until: from_millis(lease),
                },
                _ => return Err(corrupt("a running job without instance or lease".into())),
            }
        }
        "completed" => JobState::Completed(response()?),
        "failed" => JobState::Failed(response()?),
        other => return Err(corrupt(format!("unknown job state {other:?}"))),
    };
    Ok(JobRecord {
        id,
        kind,
        state,
        owner: row.try_get(3)?,
        method: row.try_get(4)?,
        target: row.try_get(5)?,
        progress: row.try_get(6)?,
        created_at: from_millis(row.try_get(10)?),
        finished_at: row.try_get::<Option<i64>, _>(11)?.map(from_millis),
        expires_at: row.try_get::<Option<i64>, _>(12)?.map(from_millis),
    })
}

fn parse_id(text: &str) -> Result<JobId, StoreError> {
    JobId::parse(text).ok_or_else(|| StoreError::Corrupt(format!("invalid job id {text:?}")))
}

impl JobStore for PostgresStore {
    async fn create(&self, record: JobRecord) -> Result<(), StoreError> {
        let columns = state_columns(&record.state);
        let done = sqlx::query(self.sql.create.clone())
            .bind(record.id.to_string())
            .bind(record.kind.as_str())
            .bind(columns.state)
            .bind(record.owner.as_deref())
            .bind(&record.method)
            .bind(&record.target)
            .bind(record.progress.as_deref())
            .bind(columns.instance)
            .bind(columns.lease_until_ms)
            .bind(columns.response)
            .bind(to_millis(record.created_at))
            .bind(record.finished_at.map(to_millis))
            .bind(record.expires_at.map(to_millis))
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(record.id));
        }
        Ok(())
    }

    async fn create_once(
        &self,
        record: JobRecord,
        key: &str,
        now: SystemTime,
    ) -> Result<Created, StoreError> {
        if once_owner(&record).is_none() {
            return self.create(record).await.map(|()| Created::New);
        }
        let columns = state_columns(&record.state);
        let id = record.id.to_string();
        let row = sqlx::query(self.sql.create_once.clone())
            .bind(&id)
            .bind(record.kind.as_str())
            .bind(columns.state)
            .bind(record.owner.as_deref())
            .bind(&record.method)
            .bind(&record.target)
            .bind(record.progress.as_deref())
            .bind(columns.instance)
            .bind(columns.lease_until_ms)
            .bind(columns.response)
            .bind(to_millis(record.created_at))
            .bind(record.finished_at.map(to_millis))
            .bind(record.expires_at.map(to_millis))
            .bind(key)
            .bind(to_millis(now))
            .fetch_one(&self.pool)
            .await
            .map_err(|error| match &error {
                // The id (the primary key) is taken; the index on owner and key is the arbiter.
                sqlx::Error::Database(db) if db.code().as_deref() == Some(UNIQUE_VIOLATION) => {
                    StoreError::Conflict(record.id)
                }
                _ => self.error(error),
            })?;
        let named: &str = row.try_get(0).map_err(|e| self.error(e))?;
        if named == id {
            Ok(Created::New)
        } else {
            parse_id(named).map(Created::Existing)
        }
    }

    async fn get(&self, id: &JobId, now: SystemTime) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(self.sql.get.clone())
            .bind(id.to_string())
            .bind(to_millis(now))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        row.map(|row| decode_row(&row))
            .transpose()
            .map_err(|e| self.error(e))
    }

    async fn transition(&self, id: &JobId, transition: Transition<'_>) -> Result<bool, StoreError> {
        match transition {
            Transition::Start {
                instance,
                lease_until,
            } => self.start(id, instance, lease_until).await,
            Transition::Finish {
                outcome,
                finished_at,
                expires_at,
            } => self.finish(id, outcome, finished_at, expires_at).await,
            Transition::Progress(progress) => self.set_progress(id, progress).await,
        }
    }

    async fn cancel(&self, id: &JobId, now: SystemTime) -> Result<bool, StoreError> {
        let row = sqlx::query(self.sql.cancel.clone())
            .bind(id.to_string())
            .bind(to_millis(now))
            .bind(self.changes_channel())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        match row {
            Some(row) => row.try_get::<bool, _>(0).map_err(|e| self.error(e)),
            None => Ok(false),
        }
    }

    async fn abandon(
        &self,
        id: &JobId,
        now: SystemTime,
        until: SystemTime,
    ) -> Result<(), StoreError> {
        sqlx::query(self.sql.abandon.clone())
            .bind(id.to_string())
            .bind(to_millis(now))
            .bind(to_millis(until))
            .bind(JobKind::Interaction.as_str())
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn renew_leases(
        &self,
        instance: &str,
        ids: &[JobId],
        lease_until: SystemTime,
    ) -> Result<Vec<JobId>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let texts: Vec<String> = ids.iter().map(JobId::to_string).collect();
        let rows = sqlx::query(self.sql.renew_leases.clone())
            .bind(&texts)
            .bind(instance)
            .bind(to_millis(lease_until))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        let renewed = rows
            .iter()
            .map(|row| row.try_get::<&str, _>(0))
            .collect::<Result<HashSet<_>, _>>()
            .map_err(|e| self.error(e))?;
        Ok(ids
            .iter()
            .zip(&texts)
            .filter(|(_, text)| !renewed.contains(text.as_str()))
            .map(|(id, _)| *id)
            .collect())
    }

    async fn fail_lapsed(
        &self,
        now: SystemTime,
        unstarted_before: SystemTime,
        outcome: JobOutcome,
        expires_at: SystemTime,
    ) -> Result<Vec<JobId>, StoreError> {
        let (state, response) = outcome_columns(&outcome);
        let rows = sqlx::query(self.sql.fail_lapsed.clone())
            .bind(to_millis(now))
            .bind(to_millis(unstarted_before))
            .bind(state)
            .bind(response)
            .bind(to_millis(expires_at))
            .bind(self.changes_channel())
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        rows.iter()
            .map(|row| parse_id(row.try_get(0).map_err(|e| self.error(e))?))
            .collect()
    }

    async fn sweep(&self, now: SystemTime) -> Result<usize, StoreError> {
        let now = to_millis(now);
        let mut swept = 0;
        loop {
            let done = sqlx::query(self.sql.sweep.clone())
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(|e| self.error(e))?;
            let deleted = done.rows_affected();
            swept += usize::try_from(deleted).unwrap_or(usize::MAX);
            // A short batch means the backlog is gone, or the rest is locked by another
            // instance's sweep, which will delete it.
            if deleted < SWEEP_BATCH.unsigned_abs() {
                return Ok(swept);
            }
        }
    }

    async fn changes(&self) -> Result<Option<Changes>, StoreError> {
        self.listen().await
    }
}

impl PostgresStore {
    /// The `LISTEN`/`NOTIFY` channel on which changed jobs are announced, in the transaction of
    /// the change: `cancelled {id}` for a cancel, `updated {id}` for an end or a progress
    /// change; ids in their 32-digit text form. The channel is `{table}_changed`, so that
    /// deployments with separate tables do not hear each other; see [`JobStore::changes`].
    ///
    /// ```no_run
    /// use tower_fhir_async::PostgresStore;
    /// use tower_fhir_async::store::sqlx::postgres::PgListener;
    ///
    /// # async fn run(store: PostgresStore, pool: tower_fhir_async::store::sqlx::PgPool)
    /// # -> Result<(), tower_fhir_async::store::sqlx::Error> {
    /// let mut listener = PgListener::connect_with(&pool).await?;
    /// listener.listen(&store.changes_channel()).await?;
    /// let change = listener.recv().await?;
    /// println!("{}", change.payload()); // e.g. "cancelled 4f9c…"
    /// # Ok(())
    /// # }
    /// ```
    pub fn changes_channel(&self) -> String {
        format!("{}_changed", self.sql.table)
    }
    /// [`Transition::Start`].
    async fn start(
        &self,
        id: &JobId,
        instance: &str,
        lease_until: SystemTime,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(self.sql.start.clone())
            .bind(id.to_string())
            .bind(instance)
            .bind(to_millis(lease_until))
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(done.rows_affected() == 1)
    }

    /// [`Transition::Finish`], announced.
    async fn finish(
        &self,
        id: &JobId,
        outcome: JobOutcome,
        finished_at: SystemTime,
        expires_at: SystemTime,
    ) -> Result<bool, StoreError> {
        let (state, response) = outcome_columns(&outcome);
        let done = sqlx::query(self.sql.finish.clone())
            .bind(id.to_string())
            .bind(state)
            .bind(response)
            .bind(to_millis(finished_at))
            .bind(to_millis(expires_at))
            .bind(self.changes_channel())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(done.is_some())
    }

    /// [`Transition::Progress`], announced when it changed anything.
    async fn set_progress(&self, id: &JobId, progress: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(self.sql.set_progress.clone())
            .bind(id.to_string())
            .bind(progress)
            .bind(self.changes_channel())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(done.is_some())
    }

    /// The changes notified on [`changes_channel`](Self::changes_channel), on a connection of
    /// its own.
    async fn listen(&self) -> Result<Option<Changes>, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        // End the stream when the connection drops instead of reconnecting in the
        // background: the layer asks again, and catches up through lease renewal (cancels) or
        // store reads (long polls).
        listener.eager_reconnect(false);
        listener
            .listen(&self.changes_channel())
            .await
            .map_err(|e| self.error(e))?;
        let ids = futures_util::stream::unfold(listener, |mut listener| async move {
            loop {
                match listener.try_recv().await {
                    Ok(Some(notification)) => {
                        if let Some(change) = decode_change(notification.payload()) {
                            return Some((change, listener));
                        }
                        tracing::debug!(
                            payload = notification.payload(),
                            "ignoring a notification that is not a job change"
                        );
                    }
                    Ok(None) => {
                        tracing::debug!("the PostgreSQL LISTEN connection was lost");
                        return None;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "the PostgreSQL LISTEN connection failed");
                        return None;
                    }
                }
            }
        });
        Ok(Some(Box::pin(ids)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        for good in ["jobs", "_jobs", "Jobs_2", &"a".repeat(MAX_TABLE_LEN)] {
            assert_eq!(check_table_name(good), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            "2jobs",
            "jobs;drop table x",
            "jobs\"",
            "public.jobs",
            "jöbs",
            "jobs ",
            &"a".repeat(MAX_TABLE_LEN + 1),
        ] {
            assert!(check_table_name(bad).is_err(), "{bad:?}");
        }
    }
}
