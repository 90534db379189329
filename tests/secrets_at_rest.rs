//! No credential reaches a shared store (SEC-11, issue #5, issue 11 item 5): a job whose kick-off
//! carries a bearer token, a session cookie and an `access_token` query parameter, and a bulk
//! export whose `access_token` name is percent-encoded (`access%5Ftoken`), run through
//! `RedisStore` and `PostgresStore`; then every stored key and row is scanned for the secret.
//! Jobs are bound to callers by a caller function that returns the credential itself
//! (`caller_from_header(Authorization)`, issue 11 item 6), with idempotency keys, polls and
//! another caller's denied requests: the store keeps only the caller's keyed digest.

#![cfg(all(feature = "redis", feature = "postgres"))]

mod support;

use axum::Router;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::routing::post;
use http::{Method, StatusCode};
use support::{Reply, TestClient, serve};
use tower_fhir_async::redis::AsyncCommands;
use tower_fhir_async::store::sqlx::postgres::PgPoolOptions;
// Only names this test generated (a random table, names from information_schema) go into SQL.
use tower_fhir_async::store::sqlx::{self, AssertSqlSafe, Row};
use tower_fhir_async::{AsyncLayer, JobId, JobStore, PostgresStore, RedisStore};

const SECRET: &str = "s3cr3t-bearer-9f2c";

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// How many jobs [`run_jobs_with_credentials`] leaves in the store.
const JOBS: usize = 2;

/// Polls `url` as the caller sending `authorization` until it stops answering 202; at most
/// `limit` polls, 20 ms apart.
async fn poll_until_done(
    client: &TestClient,
    url: &str,
    authorization: &str,
    limit: usize,
) -> Reply {
    for _ in 0..limit {
        let reply = client
            .send(Method::GET, url, &[("authorization", authorization)], "")
            .await;
        if reply.status != StatusCode::ACCEPTED {
            return reply;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("job at {url} still running after {limit} polls");
}

/// Runs two jobs carrying the secret through a layer on `store` and waits for their results: a
/// create, and a bulk export (a search with `_outputFormat`) whose `access_token` name is
/// percent-encoded, so that its manifest echoes the kick-off's URL. The caller id is the
/// `Authorization` value, secret included; another caller's poll and DELETE are denied.
async fn run_jobs_with_credentials<S: JobStore>(store: S) {
    let app = Router::new()
        .route(
            "/fhir/Patient",
            post(|| async {
                (
                    StatusCode::CREATED,
                    [(CONTENT_TYPE, "application/fhir+json")],
                    r#"{"resourceType":"Patient","id":"p1"}"#,
                )
            })
            .get(|| async {
                (
                    [(CONTENT_TYPE, "application/fhir+json")],
                    r#"{"resourceType":"Bundle","type":"searchset","total":1,"entry":[{"resource":{"resourceType":"Patient","id":"p1"}}]}"#,
                )
            }),
        )
        .layer(
            AsyncLayer::builder(store)
                .caller_from_header(AUTHORIZATION)
                .caller_key("secrets-at-rest-test-caller-key!")
                .build(),
        );
    let addr = serve(app).await;
    let client = TestClient::default();
    let bearer = format!("Bearer {SECRET}");
    let cookie = format!("session={SECRET}");
    let kick = client
        .send(
            Method::POST,
            &format!("http://{addr}/fhir/Patient?access_token={SECRET}&name=x"),
            &[
                ("prefer", "respond-async"),
                ("authorization", &bearer),
                ("cookie", &cookie),
                ("idempotency-key", "create-1"),
            ],
            r#"{"resourceType":"Patient"}"#,
        )
        .await;
    assert_eq!(kick.status, StatusCode::ACCEPTED, "{kick:?}");
    let status_url = kick.header("content-location").to_owned();
    let done = poll_until_done(&client, &status_url, &bearer, 150).await;
    assert_eq!(done.status, StatusCode::OK, "the caller's own job");
    // SEC-10: another caller learns nothing and changes nothing.
    let other = format!("Bearer other-{SECRET}");
    for method in [Method::GET, Method::DELETE] {
        let denied = client
            .send(method, &status_url, &[("authorization", &other)], "")
            .await;
        assert_eq!(denied.status, StatusCode::NOT_FOUND, "{denied:?}");
    }
    let again = poll_until_done(&client, &status_url, &bearer, 1).await;
    assert_eq!(again.status, StatusCode::OK, "the job survived: {again:?}");

    let export = client
        .send(
            Method::GET,
            &format!(
                "http://{addr}/fhir/Patient?_outputFormat=application%2Ffhir%2Bndjson&access%5Ftoken={SECRET}&name=x"
            ),
            &[
                ("prefer", "respond-async"),
                ("authorization", &bearer),
                ("idempotency-key", "export-1"),
            ],
            "",
        )
        .await;
    assert_eq!(export.status, StatusCode::ACCEPTED, "{export:?}");
    let manifest = poll_until_done(&client, export.header("content-location"), &bearer, 150).await;
    assert_eq!(manifest.status, StatusCode::OK, "{manifest:?}");
    assert!(
        !contains_secret(&manifest.body),
        "the manifest echoes the token: {}",
        String::from_utf8_lossy(&manifest.body)
    );
}

fn contains_secret(bytes: &[u8]) -> bool {
    bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes())
}

// SEC-11: nothing under the store's Redis prefix holds the credential.
#[tokio::test]
async fn sec_11_no_credential_in_any_redis_key() {
    let prefix = format!("secrets-test-{}:", JobId::new());
    let store = RedisStore::connect(&redis_url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to Redis at {} (set REDIS_URL): {e}",
                redis_url()
            )
        })
        .with_prefix(prefix.clone());
    run_jobs_with_credentials(store).await;

    let client = tower_fhir_async::redis::Client::open(redis_url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis.keys(format!("{prefix}*")).await.unwrap();
    assert!(!keys.is_empty(), "the job left keys under {prefix}");
    let mut scanned = 0;
    for key in &keys {
        let kind: String = tower_fhir_async::redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        let values: Vec<Vec<u8>> = match kind.as_str() {
            "hash" => redis
                .hgetall::<_, Vec<(Vec<u8>, Vec<u8>)>>(key)
                .await
                .unwrap()
                .into_iter()
                .flat_map(|(f, v)| [f, v])
                .collect(),
            "zset" => redis.zrange(key, 0, -1).await.unwrap(),
            "string" => vec![redis.get(key).await.unwrap()],
            other => panic!("unexpected key type {other} for {key}"),
        };
        for value in values {
            scanned += 1;
            assert!(
                !contains_secret(&value),
                "{key} holds the credential: {}",
                String::from_utf8_lossy(&value)
            );
        }
        assert!(
            !contains_secret(key.as_bytes()),
            "a key name holds the credential: {key}"
        );
    }
    assert!(scanned > 0);
    let _: () = redis.del(&keys).await.unwrap();
}

// SEC-11: no column of any row of the store's PostgreSQL table holds the credential.
#[tokio::test]
async fn sec_11_no_credential_in_any_postgres_row() {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(&database_url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to PostgreSQL at {} (set DATABASE_URL): {e}",
                database_url()
            )
        });
    let table = format!("secrets_test_{}", JobId::new());
    let store = PostgresStore::new(pool.clone()).with_table(&table);
    store.migrate().await.unwrap();
    run_jobs_with_credentials(store).await;

    // Every column, whatever its type, as text (bytea in its escape form, so plain bytes show).
    let columns: Vec<String> = sqlx::query(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = $1",
    )
    .bind(&table)
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|row| {
        let (name, kind): (String, String) = (row.get(0), row.get(1));
        if kind == "bytea" {
            format!("encode(\"{name}\", 'escape')")
        } else {
            format!("\"{name}\"::text")
        }
    })
    .collect();
    assert!(columns.len() > 5, "the table has its columns: {columns:?}");
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {} FROM \"{table}\"",
        columns.join(", ")
    )))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), JOBS, "one row per job");
    for row in &rows {
        for (i, column) in columns.iter().enumerate() {
            let value: Option<String> = row.get(i);
            assert!(
                !value
                    .as_deref()
                    .is_some_and(|v| contains_secret(v.as_bytes())),
                "{column} holds the credential: {value:?}"
            );
        }
    }
    sqlx::query(AssertSqlSafe(format!("DROP TABLE \"{table}\"")))
        .execute(&pool)
        .await
        .unwrap();
}
