//! `GET [base]/metadata`: the CapabilityStatement. Bulk-data clients read it before exporting
//! and drop any requested type not listed under `rest.resource`, so it lists every type and the
//! search parameters from the same table search uses.

use serde_json::{Value, json};

use crate::db::ResourceType;
use crate::search;

const BULK_EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const BULK_PATIENT_EXPORT: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const BULK_GROUP_EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

pub(crate) fn statement(base: &str, auth: bool) -> Value {
    let resources: Vec<Value> = ResourceType::ALL.into_iter().map(resource).collect();
    let security = if auth {
        "Every request needs `Authorization: Bearer <client-id>`; an asynchronous job's status URL \
         answers only the client that started the job."
    } else {
        "No authentication (start the server with --auth to require a bearer token)."
    };
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2024-01-01",
        "kind": "instance",
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "software": { "name": "tower-fhir-async example server", "version": env!("CARGO_PKG_VERSION") },
        "implementation": {
            "description": "Synthetic FHIR R4 data behind tower-fhir-async's AsyncLayer (send Prefer: respond-async)",
            "url": base,
        },
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "rest": [{
            "mode": "server",
            "security": { "description": security },
            "resource": resources,
            "interaction": [{ "code": "batch" }],
            "operation": [
                { "name": "export", "definition": BULK_EXPORT },
                { "name": "patient-export", "definition": BULK_PATIENT_EXPORT },
                { "name": "group-export", "definition": BULK_GROUP_EXPORT },
                {
                    "name": "reindex",
                    "definition": format!("{base}/OperationDefinition/reindex"),
                    "documentation": "Walks every resource (slowly, for the demo); reports progress when run with Prefer: respond-async",
                },
            ],
        }],
    })
}

fn resource(kind: ResourceType) -> Value {
    let interactions: Vec<Value> = ["read", "vread", "search-type", "create", "update", "delete"]
        .iter()
        .map(|code| json!({ "code": code }))
        .collect();
    let params: Vec<Value> = search::params(kind)
        .iter()
        .map(|p| json!({ "name": p.name, "type": p.kind, "documentation": p.documentation }))
        .collect();
    let mut resource = json!({
        "type": kind.as_str(),
        "interaction": interactions,
        "versioning": "versioned-update",
        "readHistory": false,
        "updateCreate": true,
        "conditionalCreate": false,
        "conditionalUpdate": false,
        "conditionalDelete": "not-supported",
        "searchParam": params,
    });
    let export = match kind {
        ResourceType::Patient => Some(BULK_PATIENT_EXPORT),
        ResourceType::Group => Some(BULK_GROUP_EXPORT),
        _ => None,
    };
    if let Some(definition) = export {
        resource["operation"] = json!([{ "name": "export", "definition": definition }]);
    }
    resource
}
