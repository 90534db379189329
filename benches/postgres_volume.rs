//! `PostgresStore` at volume (issue #16): a million finished jobs in the table. Reports the
//! table's size, the latency of polls (`JobStore::get` of random jobs) against the same polls on
//! a table of a thousand jobs in the same run, the time the sweeper takes to remove the expired
//! half, and the table's size after the sweep, after a plain `VACUUM` (what autovacuum does),
//! and after as many jobs again: whether the space the sweep freed is used again.
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --features postgres --bench
//! postgres_volume`. `PG_VOLUME_JOBS` (default 1 000 000) sets the number of jobs,
//! `PG_VOLUME_POLLS` (default 20 000) the polls per measurement. The jobs are copies of one
//! finished job written through the store (a 1 KiB result), inserted with `generate_series`;
//! the bench's table (`volume_jobs_…`) is dropped at the end.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use tower_fhir_async::store::sqlx::postgres::PgPoolOptions;
use tower_fhir_async::store::sqlx::{self, PgPool};
use tower_fhir_async::store::{JobStore, Transition};
use tower_fhir_async::{JobId, JobKind, JobOutcome, JobRecord, PostgresStore, StoredResponse};

const JOBS_VAR: &str = "PG_VOLUME_JOBS";
const POLLS_VAR: &str = "PG_VOLUME_POLLS";
/// Concurrent pollers (the pool has as many connections).
const POLLERS: usize = 8;
/// The jobs of the small table polled for comparison.
const SMALL: u64 = 1_000;
const HOUR: Duration = Duration::from_secs(3600);

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn positive(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{name}={text} is not a positive whole number")),
        },
    }
}

async fn run() -> Result<(), String> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL to a PostgreSQL database on this machine".to_owned())?;
    let jobs = positive(JOBS_VAR, 1_000_000)?;
    let polls = positive(POLLS_VAR, 20_000)?;
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(POLLERS).unwrap_or(8))
        .connect(&url)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))?;
    println!(
        "PostgreSQL at volume: {jobs} finished jobs ({JOBS_VAR}), {polls} polls per measurement \
         ({POLLS_VAR}) by {POLLERS} concurrent pollers"
    );
    let small = Table::new(&pool, "small").await?;
    let large = Table::new(&pool, "large").await?;
    let result = measure(&small, &large, jobs, polls).await;
    small.drop_table().await;
    large.drop_table().await;
    result
}

async fn measure(small: &Table, large: &Table, jobs: u64, polls: u64) -> Result<(), String> {
    let now = SystemTime::now();
    small.fill(SMALL, now).await?;
    let started = Instant::now();
    large.fill(jobs, now).await?;
    let filled = started.elapsed();
    let sizes = large.sizes().await?;
    println!(
        "filled: {jobs} jobs in {:.1} s; table {}, indexes {}",
        filled.as_secs_f64(),
        mib(sizes.0),
        mib(sizes.1)
    );

    // Warm-up: the pool's connections opened, the statements prepared.
    small.polls(SMALL, polls / 10 + POLLERS as u64).await?;
    large.polls(jobs, polls / 10 + POLLERS as u64).await?;
    let small_poll = small.polls(SMALL, polls).await?;
    let large_poll = large.polls(jobs, polls).await?;
    println!();
    println!(
        "{:<30}{:>10}{:>10}{:>10}{:>12}",
        "polls (JobStore::get)", "p50", "p99", "max", "polls/s"
    );
    for (name, poll) in [
        (format!("{SMALL} jobs"), &small_poll),
        (format!("{jobs} jobs"), &large_poll),
    ] {
        println!(
            "{:<30}{:>10}{:>10}{:>10}{:>12.0}",
            name,
            micros(poll.p50),
            micros(poll.p99),
            micros(poll.max),
            poll.rate
        );
    }
    println!(
        "large / small: p50 {:.2}×, p99 {:.2}×, rate {:.1} %",
        poll_ratio(large_poll.p50, small_poll.p50),
        poll_ratio(large_poll.p99, small_poll.p99),
        100.0 * large_poll.rate / small_poll.rate
    );

    // Half the jobs expired an hour after `now`: sweep two hours on.
    let started = Instant::now();
    let swept = large
        .store
        .sweep(now + 2 * HOUR)
        .await
        .map_err(|e| format!("sweeping: {e}"))?;
    let took = started.elapsed();
    println!();
    println!(
        "sweep: {swept} expired jobs removed in {:.1} s ({:.0} jobs/s, batches of 1 000)",
        took.as_secs_f64(),
        swept as f64 / took.as_secs_f64()
    );
    let after_sweep = large.sizes().await?;
    large.vacuum().await?;
    let after_vacuum = large.sizes().await?;
    let started = Instant::now();
    large.fill_more(jobs / 2, now).await?;
    let refilled = started.elapsed();
    let after_refill = large.sizes().await?;
    println!();
    println!("{:<44}{:>12}{:>12}", "table size", "table", "indexes");
    for (name, (table, indexes)) in [
        (format!("{jobs} jobs"), sizes),
        ("after the sweep".to_owned(), after_sweep),
        (
            "after VACUUM (what autovacuum does)".to_owned(),
            after_vacuum,
        ),
        (
            format!(
                "after {} jobs more ({:.1} s)",
                jobs / 2,
                refilled.as_secs_f64()
            ),
            after_refill,
        ),
    ] {
        println!("{name:<44}{:>12}{:>12}", mib(table), mib(indexes));
    }
    println!(
        "growth over the first fill after expiry, vacuum and refill: table {:+.1} %, indexes {:+.1} %",
        growth(after_refill.0, sizes.0),
        growth(after_refill.1, sizes.1)
    );
    Ok(())
}

struct Polls {
    p50: Duration,
    p99: Duration,
    max: Duration,
    rate: f64,
}

/// One jobs table of the bench, with a template job written through the store.
struct Table {
    pool: PgPool,
    name: String,
    store: Arc<PostgresStore>,
    template: JobId,
    /// Ids given to copies so far.
    next: std::sync::atomic::AtomicU64,
}

impl Table {
    async fn new(pool: &PgPool, what: &str) -> Result<Self, String> {
        let name = format!("volume_jobs_{what}_{}", JobId::new());
        let store = PostgresStore::new(pool.clone()).with_table(&name);
        store
            .migrate()
            .await
            .map_err(|e| format!("creating {name}: {e}"))?;
        // The template: a finished interaction job with a 1 KiB Bundle.
        let template = JobId::new();
        let record = JobRecord::new(
            template,
            JobKind::Interaction,
            "POST",
            "/fhir/Patient/$everything",
            SystemTime::now(),
        );
        store
            .create(record)
            .await
            .map_err(|e| format!("creating the template job: {e}"))?;
        let body = format!(
            r#"{{"resourceType":"Bundle","type":"searchset","total":1,"entry":[{{"resource":{{"resourceType":"Patient","id":"p","text":{{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>"}}}}}}]}}"#,
            "x".repeat(850)
        );
        let outcome = JobOutcome::Completed(StoredResponse {
            status: StatusCode::OK,
            headers: vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/fhir+json"),
            )],
            body: Bytes::from(body),
        });
        let now = SystemTime::now();
        store
            .transition(
                &template,
                Transition::Finish {
                    outcome,
                    finished_at: now,
                    expires_at: now + 24 * HOUR,
                },
            )
            .await
            .map_err(|e| format!("finishing the template job: {e}"))?;
        Ok(Self {
            pool: pool.clone(),
            name,
            store: Arc::new(store),
            template,
            next: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// `count` copies of the template (copies 1…count, see [`copy_id`]); the first half expire an hour after `now`,
    /// the rest a day after.
    async fn fill(&self, count: u64, now: SystemTime) -> Result<(), String> {
        self.copies(count, now, count / 2).await
    }

    /// `count` more copies, none of them expiring soon.
    async fn fill_more(&self, count: u64, now: SystemTime) -> Result<(), String> {
        self.copies(count, now, 0).await
    }

    async fn copies(&self, count: u64, now: SystemTime, expiring: u64) -> Result<(), String> {
        let first = self
            .next
            .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        let soon = millis(now + HOUR);
        let later = millis(now + 24 * HOUR);
        let sql = format!(
            "INSERT INTO \"{t}\" (id, kind, state, owner, method, target, progress, instance, \
             lease_until_ms, response, created_ms, finished_ms, expires_ms) \
             SELECT lpad(to_hex((g * 2654435761) % 4294967296), 8, '0') || lpad(to_hex(g), 24, '0'), kind, state, owner, method, target, progress, \
             instance, lease_until_ms, response, created_ms, finished_ms, \
             CASE WHEN g < $2 + $4 THEN $5 ELSE $6 END \
             FROM \"{t}\" AS tpl, generate_series($2::bigint, $2::bigint + $3 - 1) AS g \
             WHERE tpl.id = $1",
            t = self.name
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(self.template.to_string())
            .bind(i64::try_from(first).unwrap_or(i64::MAX))
            .bind(i64::try_from(count).unwrap_or(i64::MAX))
            .bind(i64::try_from(expiring).unwrap_or(i64::MAX))
            .bind(soon)
            .bind(later)
            .execute(&self.pool)
            .await
            .map_err(|e| format!("copying jobs into {}: {e}", self.name))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE \"{}\"", self.name)))
            .execute(&self.pool)
            .await
            .map_err(|e| format!("ANALYZE: {e}"))?;
        Ok(())
    }

    /// `polls` reads of random jobs among ids 1…`jobs`, by [`POLLERS`] tasks.
    async fn polls(&self, jobs: u64, polls: u64) -> Result<Polls, String> {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for poller in 0..POLLERS {
            let store = self.store.clone();
            let share = polls / POLLERS as u64;
            tasks.push(tokio::spawn(async move {
                let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ (poller as u64 + 1);
                let mut latencies = Vec::with_capacity(share as usize);
                for _ in 0..share {
                    // xorshift: a random job among the copies.
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let id = copy_id(1 + seed % jobs);
                    let asked = Instant::now();
                    let found = store.get(&id, SystemTime::now()).await;
                    latencies.push(asked.elapsed());
                    match found {
                        Ok(Some(_)) => {}
                        Ok(None) => return Err(format!("job {id} was not found")),
                        Err(e) => return Err(format!("reading job {id}: {e}")),
                    }
                }
                Ok(latencies)
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.map_err(|e| e.to_string())??);
        }
        let elapsed = started.elapsed();
        all.sort();
        let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
        Ok(Polls {
            p50: at(0.50),
            p99: at(0.99),
            max: all[all.len() - 1],
            rate: all.len() as f64 / elapsed.as_secs_f64(),
        })
    }

    /// The table's size (heap and TOAST) and its indexes', in bytes.
    async fn sizes(&self) -> Result<(i64, i64), String> {
        let row: (i64, i64) =
            sqlx::query_as("SELECT pg_table_size($1::regclass), pg_indexes_size($1::regclass)")
                .bind(format!("\"{}\"", self.name))
                .fetch_one(&self.pool)
                .await
                .map_err(|e| format!("reading the size of {}: {e}", self.name))?;
        Ok(row)
    }

    async fn vacuum(&self) -> Result<(), String> {
        sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM \"{}\"", self.name)))
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| format!("VACUUM: {e}"))
    }

    async fn drop_table(&self) {
        let sql = format!("DROP TABLE IF EXISTS \"{}\"", self.name);
        if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
        {
            eprintln!("warning: dropping {} failed: {error}", self.name);
        }
    }
}

/// The id of copy `n`, as the `INSERT` makes it: a multiplicative hash of `n` first, so that
/// copies are spread over the primary key's range as the layer's random ids are (and the space
/// of expired ones is used again), then `n` itself, so that ids are unique.
fn copy_id(n: u64) -> JobId {
    let spread = n.wrapping_mul(2_654_435_761) % (1 << 32);
    JobId::parse(&format!("{spread:08x}{n:024x}")).expect("a 32-digit id")
}

fn millis(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn mib(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
}

fn micros(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}

fn poll_ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn growth(now: i64, before: i64) -> f64 {
    100.0 * (now - before) as f64 / before.max(1) as f64
}
