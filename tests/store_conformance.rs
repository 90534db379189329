//! The public store conformance suite (`tower_fhir_async::store::conformance`) against every
//! `JobStore` backend. Each case also runs as its own test, so a failure names the case.
//!
//! This file runs `MemoryStore`; `tests/store_redis.rs` and `tests/store_postgres.rs` run the same
//! cases against real servers, behind their cargo features. (Issue #12 folds the three into one
//! exported macro.)

use tower_fhir_async::MemoryStore;
use tower_fhir_async::store::conformance;

mod memory {
    use super::*;

    // CANCEL-3, CANCEL-5, CANCEL-6, EXPIRE-3 (all store-level cases at once, sharing one store).
    #[tokio::test]
    async fn cancel_3_expire_3_run_all_cases_on_one_shared_store() {
        conformance::run_all(&MemoryStore::default()).await;
    }

    // [DESIGN] create / get round trip.
    #[tokio::test]
    async fn design_create_then_get_returns_the_record() {
        conformance::create_then_get_returns_the_record(&MemoryStore::default()).await;
    }

    // [DESIGN] ids are unique in the store.
    #[tokio::test]
    async fn design_create_rejects_a_taken_id() {
        conformance::create_rejects_a_taken_id(&MemoryStore::default()).await;
    }

    // STATUS-15, CANCEL-7: unknown ids are absent for every operation.
    #[tokio::test]
    async fn status_15_cancel_7_unknown_ids_are_absent() {
        conformance::unknown_ids_are_absent(&MemoryStore::default()).await;
    }

    // [DESIGN] Accepted → Running is a compare-and-set.
    #[tokio::test]
    async fn design_start_moves_accepted_to_running_once() {
        conformance::start_moves_accepted_to_running_once(&MemoryStore::default()).await;
    }

    // STATUS-14: the first finish wins; the result never changes afterwards.
    #[tokio::test]
    async fn status_14_finish_first_transition_wins() {
        conformance::finish_first_transition_wins(&MemoryStore::default()).await;
    }

    // [DESIGN] a job that never started can be failed (shutdown).
    #[tokio::test]
    async fn design_finish_from_accepted_is_allowed() {
        conformance::finish_from_accepted_is_allowed(&MemoryStore::default()).await;
    }

    // CANCEL-3, CANCEL-6: a cancelled job is absent and never resurrected.
    #[tokio::test]
    async fn cancel_3_cancel_6_cancel_removes_the_job_and_blocks_later_transitions() {
        conformance::cancel_removes_the_job_and_blocks_later_transitions(&MemoryStore::default())
            .await;
    }

    // CANCEL-5: cancel after completion removes the result.
    #[tokio::test]
    async fn cancel_5_cancel_after_finish_removes_the_result() {
        conformance::cancel_after_finish_removes_the_result(&MemoryStore::default()).await;
    }

    // EXPIRE-3, CANCEL-7: expired records are absent before any sweep.
    #[tokio::test]
    async fn expire_3_expired_records_are_absent_before_any_sweep() {
        conformance::expired_records_are_absent_before_any_sweep(&MemoryStore::default()).await;
    }

    // EXPIRE-1: sweeping reclaims expired records only.
    #[tokio::test]
    async fn expire_1_sweep_removes_only_expired_records() {
        conformance::sweep_removes_only_expired_records(&MemoryStore::default()).await;
    }

    // STATUS-4: progress is kept while the job runs, dropped when it ends.
    #[tokio::test]
    async fn status_4_progress_is_kept_until_the_job_ends() {
        conformance::progress_is_kept_until_the_job_ends(&MemoryStore::default()).await;
    }

    // [DESIGN] lease renewal names the jobs that stopped running on this instance.
    #[tokio::test]
    async fn design_renew_leases_reports_jobs_that_stopped_running_here() {
        conformance::renew_leases_reports_jobs_that_stopped_running_here(&MemoryStore::default())
            .await;
    }

    // [DESIGN] a job whose instance died is failed, never left running forever.
    #[tokio::test]
    async fn design_fail_lapsed_fails_only_lapsed_running_jobs() {
        conformance::fail_lapsed_fails_only_lapsed_running_jobs(&MemoryStore::default()).await;
    }

    // STATUS-14, BUNDLE-*: stored responses survive storage byte for byte.
    #[tokio::test]
    async fn status_14_stored_responses_round_trip_exactly() {
        conformance::stored_responses_round_trip_exactly(&MemoryStore::default()).await;
    }

    // KICK-9, issue #7 item 6: a repeat with the same owner and key names the first job.
    #[tokio::test]
    async fn kick_9_create_once_returns_the_existing_job_for_a_repeated_key() {
        conformance::create_once_returns_the_existing_job_for_a_repeated_key(
            &MemoryStore::default(),
        )
        .await;
    }

    // KICK-9, issue #7 item 6: keys are scoped to the caller, never shared across callers.
    #[tokio::test]
    async fn kick_9_create_once_never_matches_across_owners() {
        conformance::create_once_never_matches_across_owners(&MemoryStore::default()).await;
    }

    // KICK-9, issue #7 item 6 (Idempotency-Key): without a caller identity, a key never matches.
    #[tokio::test]
    async fn kick_9_create_once_without_an_owner_always_creates() {
        conformance::create_once_without_an_owner_always_creates(&MemoryStore::default()).await;
    }

    // KICK-9, issue #7 item 6 (Idempotency-Key): a cancelled job is never returned for a repeat.
    #[tokio::test]
    async fn kick_9_create_once_after_cancel_creates_a_new_job() {
        conformance::create_once_after_cancel_creates_a_new_job(&MemoryStore::default()).await;
    }

    // KICK-9, issue #7 item 6 (Idempotency-Key): a failed job is never returned for a repeat.
    #[tokio::test]
    async fn kick_9_create_once_after_failure_creates_a_new_job() {
        conformance::create_once_after_failure_creates_a_new_job(&MemoryStore::default()).await;
    }

    // KICK-9, issue #7 item 6: a completed job is returned until it expires.
    #[tokio::test]
    async fn kick_9_create_once_returns_a_completed_job_until_it_expires() {
        conformance::create_once_returns_a_completed_job_until_it_expires(&MemoryStore::default())
            .await;
    }

    // KICK-9, issue #7 item 6 (Idempotency-Key): concurrent repeats create exactly one job.
    #[tokio::test]
    async fn kick_9_create_once_has_one_winner_among_concurrent_kick_offs() {
        conformance::create_once_has_one_winner_among_concurrent_kick_offs(&MemoryStore::default())
            .await;
    }

    // KICK-9, issue #7 item 6: keys up to MAX_IDEMPOTENCY_KEY_LEN bytes of any text.
    #[tokio::test]
    async fn kick_9_create_once_supports_the_longest_key() {
        conformance::create_once_supports_the_longest_key(&MemoryStore::default()).await;
    }

    // KICK-9, issue #7 item 6 (Idempotency-Key): a taken id is a conflict and leaves the key free.
    #[tokio::test]
    async fn kick_9_create_once_rejects_a_taken_id() {
        conformance::create_once_rejects_a_taken_id(&MemoryStore::default()).await;
    }

    // KICK-9, issue #11 item 2: a kick-off answered 503 leaves no job, even when its create lands late.
    #[tokio::test]
    async fn kick_9_abandon_removes_the_job_and_blocks_a_late_create() {
        conformance::abandon_removes_the_job_and_blocks_a_late_create(&MemoryStore::default())
            .await;
    }

    // KICK-9, issue #11 item 2: an abandon that overtakes its create still leaves no job.
    #[tokio::test]
    async fn kick_9_abandon_before_create_blocks_the_create() {
        conformance::abandon_before_create_blocks_the_create(&MemoryStore::default()).await;
    }

    // KICK-9, issue #11 item 2: an idempotent retry never names an abandoned job.
    #[tokio::test]
    async fn kick_9_abandon_frees_the_idempotency_key() {
        conformance::abandon_frees_the_idempotency_key(&MemoryStore::default()).await;
    }
}
