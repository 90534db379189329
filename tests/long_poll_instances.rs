//! A long poll held by one instance wakes when the job, running on another instance, ends
//! (issue #7 item 3), on a `MemoryStore` shared in one process; `tests/shared_instances.rs` runs
//! the same scenario on Redis and PostgreSQL.

#[path = "support/long_poll.rs"]
mod long_poll;

use tower_fhir_async::MemoryStore;

// STATUS-3, issue #7 item 3. Paused time: the answer must come before the backstop read.
#[tokio::test(start_paused = true)]
async fn status_3_long_poll_wakes_across_instances_memory() {
    let store = MemoryStore::default();
    long_poll::long_poll_wakes_across_instances(|| store.clone(), true).await;
}
