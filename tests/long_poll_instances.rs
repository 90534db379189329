//! A long poll held by one instance wakes when the job, running on another instance, ends
//! (issue #7 item 3), on a `MemoryStore` shared in one process; `tests/shared_instances.rs` runs
//! the same scenario on Redis and PostgreSQL.

#[path = "support/long_poll.rs"]
mod long_poll;

use tower_fhir_async::MemoryStore;

#[tokio::test(flavor = "multi_thread")]
async fn status_4_long_poll_wakes_across_instances_memory() {
    let store = MemoryStore::default();
    long_poll::long_poll_wakes_across_instances(|| store.clone()).await;
}
