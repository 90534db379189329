//! The in-memory resource database: one `RwLock<BTreeMap>` per resource type. The server owns
//! `id`, `meta.versionId` and `meta.lastUpdated`; they are stamped here, under the write lock,
//! so two concurrent updates can never hand out the same version.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde_json::{Map, Value, json};

use crate::instant::{self, Millis};

/// The resource types this server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum ResourceType {
    Patient,
    Observation,
    Condition,
    Group,
}

impl ResourceType {
    pub(crate) const ALL: [ResourceType; 4] = [
        ResourceType::Patient,
        ResourceType::Observation,
        ResourceType::Condition,
        ResourceType::Group,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ResourceType::Patient => "Patient",
            ResourceType::Observation => "Observation",
            ResourceType::Condition => "Condition",
            ResourceType::Group => "Group",
        }
    }

    /// Case-sensitive, as FHIR type names are.
    pub(crate) fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// Whether the type belongs to the Patient compartment (what patient- and group-level
    /// `$export` may return).
    pub(crate) fn in_patient_compartment(self) -> bool {
        !matches!(self, ResourceType::Group)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One stored version of a resource. Shared as `Arc` so searches and exports take snapshots
/// without copying JSON.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) kind: ResourceType,
    pub(crate) id: String,
    pub(crate) version: u64,
    pub(crate) updated: Millis,
    pub(crate) resource: Value,
}

impl Stored {
    /// `Patient/p-1`: the form used in references.
    pub(crate) fn reference(&self) -> String {
        format!("{}/{}", self.kind.as_str(), self.id)
    }

    /// The patient this resource is about: itself for a Patient, `subject` for the others.
    pub(crate) fn patient_id(&self) -> Option<&str> {
        match self.kind {
            ResourceType::Patient => Some(&self.id),
            ResourceType::Observation | ResourceType::Condition => {
                self.resource["subject"]["reference"]
                    .as_str()
                    .and_then(|r| r.strip_prefix("Patient/"))
            }
            ResourceType::Group => None,
        }
    }
}

/// Why a conditional update was refused.
#[derive(Debug)]
pub(crate) struct VersionConflict {
    pub(crate) current: Option<u64>,
}

/// The in-memory tables.
pub(crate) struct Db {
    tables: [RwLock<BTreeMap<String, Arc<Stored>>>; 4],
    next_id: AtomicU64,
}

impl Db {
    pub(crate) fn new() -> Self {
        Self {
            tables: Default::default(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Loads generated data as version 1 with the given `lastUpdated`.
    pub(crate) fn seed(&self, kind: ResourceType, id: String, updated: Millis, resource: Value) {
        let stored = stamp(kind, id.clone(), 1, updated, resource);
        self.write(kind).insert(id, Arc::new(stored));
    }

    pub(crate) fn get(&self, kind: ResourceType, id: &str) -> Option<Arc<Stored>> {
        self.read(kind).get(id).cloned()
    }

    /// Stores a new resource under a server-assigned id (any id in the body is replaced, as
    /// FHIR `create` requires).
    pub(crate) fn create(&self, kind: ResourceType, resource: Value) -> Arc<Stored> {
        let mut table = self.write(kind);
        let id = loop {
            let n = self.next_id.fetch_add(1, Ordering::Relaxed);
            let id = format!("{}-new-{n}", prefix(kind));
            // A client may already have PUT a resource under this id.
            if !table.contains_key(&id) {
                break id;
            }
        };
        let stored = Arc::new(stamp(kind, id.clone(), 1, instant::now(), resource));
        table.insert(id, stored.clone());
        stored
    }

    /// Replaces (or creates, when absent) the resource with this id. `if_match` is the version an
    /// `If-Match` header demands. Returns the new version and whether it was created.
    pub(crate) fn put(
        &self,
        kind: ResourceType,
        id: &str,
        resource: Value,
        if_match: Option<u64>,
    ) -> Result<(Arc<Stored>, bool), VersionConflict> {
        let mut table = self.write(kind);
        let current = table.get(id).map(|s| s.version);
        if let Some(wanted) = if_match
            && current != Some(wanted)
        {
            return Err(VersionConflict { current });
        }
        let version = current.map_or(1, |v| v + 1);
        let stored = Arc::new(stamp(
            kind,
            id.to_owned(),
            version,
            instant::now(),
            resource,
        ));
        table.insert(id.to_owned(), stored.clone());
        Ok((stored, current.is_none()))
    }

    pub(crate) fn delete(&self, kind: ResourceType, id: &str) {
        self.write(kind).remove(id);
    }

    /// Every resource of a type that satisfies `keep`, in id order. Only `Arc`s are copied, and
    /// the lock is released before the caller serialises anything.
    pub(crate) fn scan(
        &self,
        kind: ResourceType,
        keep: impl Fn(&Stored) -> bool,
    ) -> Vec<Arc<Stored>> {
        self.read(kind)
            .values()
            .filter(|s| keep(s))
            .cloned()
            .collect()
    }

    // A panic while holding a lock cannot leave a map half-written (every mutation is a single
    // insert/remove), so a poisoned lock is still safe to use.
    fn read(&self, kind: ResourceType) -> RwLockReadGuard<'_, BTreeMap<String, Arc<Stored>>> {
        self.tables[kind.index()]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, kind: ResourceType) -> RwLockWriteGuard<'_, BTreeMap<String, Arc<Stored>>> {
        self.tables[kind.index()]
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The id prefix per type, so an id alone tells what it names in logs.
pub(crate) fn prefix(kind: ResourceType) -> &'static str {
    match kind {
        ResourceType::Patient => "p",
        ResourceType::Observation => "o",
        ResourceType::Condition => "c",
        ResourceType::Group => "g",
    }
}

/// Sets `id`, `meta.versionId` and `meta.lastUpdated`, keeping any other `meta` the client sent
/// (profiles, tags).
fn stamp(kind: ResourceType, id: String, version: u64, updated: Millis, resource: Value) -> Stored {
    let mut object = match resource {
        Value::Object(object) => object,
        _ => Map::new(),
    };
    let mut meta = match object.remove("meta") {
        Some(Value::Object(meta)) => meta,
        _ => Map::new(),
    };
    meta.insert("versionId".into(), json!(version.to_string()));
    meta.insert("lastUpdated".into(), json!(instant::format(updated)));
    object.insert("resourceType".into(), json!(kind.as_str()));
    object.insert("id".into(), json!(id));
    object.insert("meta".into(), Value::Object(meta));
    Stored {
        kind,
        id,
        version,
        updated,
        resource: Value::Object(object),
    }
}

/// Whether `id` is a valid FHIR id (`[A-Za-z0-9\-\.]{1,64}`).
pub(crate) fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}
