//! The public store conformance suite (`tower_fhir_async::store_conformance_tests!`) against
//! `MemoryStore`: one test per case, each on a store of its own. `tests/store_redis.rs` and
//! `tests/store_postgres.rs` run the same macro against real servers, behind their cargo
//! features.

use tower_fhir_async::MemoryStore;
use tower_fhir_async::store::conformance::Fixture;

/// A fresh `MemoryStore` per case; a second handle is a clone, which shares its jobs as two
/// layers in one process would.
struct Memory;

impl Fixture for Memory {
    type Store = MemoryStore;

    async fn store(&self) -> MemoryStore {
        MemoryStore::new()
    }

    async fn handle(&self, store: &MemoryStore) -> MemoryStore {
        store.clone()
    }
}

tower_fhir_async::store_conformance_tests!(Memory);
