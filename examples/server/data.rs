//! The synthetic data set: patients with a few Observations and Conditions each, and a few
//! Groups. Seeded, so `p-1` is the same person on every run and the printed curl commands and
//! expected counts stay valid.

use serde_json::{Value, json};

use crate::db::{Db, ResourceType};
use crate::instant::{self, Millis};
use crate::prng::SplitMix64;

const SEED: u64 = 0x5EED_F41A_2024;

/// 2024-01-01T00:00:00Z: generated `lastUpdated` values fall in 2024, so `_since` has something
/// to cut.
const YEAR_START: Millis = 1_704_067_200_000;
const YEAR_MS: u64 = 366 * 86_400_000;

const FAMILY: &[&str] = &[
    "Smith",
    "Johnson",
    "Garcia",
    "Müller",
    "Nguyen",
    "Okafor",
    "Kowalski",
    "Rossi",
    "Tanaka",
    "Silva",
    "Novak",
    "Haddad",
    "Jensen",
    "Dubois",
    "Kim",
    "Ivanova",
    "Hernandez",
    "Murphy",
];
const GIVEN_FEMALE: &[&str] = &[
    "Anna", "Maria", "Aiko", "Fatima", "Olga", "Chloe", "Grace", "Lucia", "Mei", "Zara",
];
const GIVEN_MALE: &[&str] = &[
    "John", "Carlos", "Kenji", "Omar", "Piotr", "Louis", "Liam", "Marco", "Minh", "Tomas",
];

/// LOINC code, display, UCUM unit, low, high, category.
const OBSERVATIONS: &[(&str, &str, &str, u64, u64, &str)] = &[
    ("8867-4", "Heart rate", "/min", 50, 110, "vital-signs"),
    (
        "8480-6",
        "Systolic blood pressure",
        "mm[Hg]",
        95,
        170,
        "vital-signs",
    ),
    ("29463-7", "Body weight", "kg", 45, 120, "vital-signs"),
    ("8302-2", "Body height", "cm", 150, 195, "vital-signs"),
    (
        "2339-0",
        "Glucose [Mass/volume] in Blood",
        "mg/dL",
        70,
        200,
        "laboratory",
    ),
];

/// SNOMED CT code and display.
const CONDITIONS: &[(&str, &str)] = &[
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("195967001", "Asthma"),
    ("35489007", "Depressive disorder"),
    ("55822004", "Hyperlipidemia"),
];
const DIABETES: &str = "44054006";

/// How many resources of each type were generated.
pub(crate) struct Summary {
    pub(crate) patients: usize,
    pub(crate) observations: usize,
    pub(crate) conditions: usize,
    pub(crate) groups: usize,
}

/// Fills `db` with `patients` patients and their data.
pub(crate) fn generate(db: &Db, patients: usize) -> Summary {
    let mut rng = SplitMix64::new(SEED);
    let (mut observations, mut conditions) = (0, 0);
    let mut diabetic = Vec::new();
    for p in 1..=patients {
        let patient_id = format!("p-{p}");
        db.seed(
            ResourceType::Patient,
            patient_id.clone(),
            updated(&mut rng),
            patient(&mut rng, &patient_id),
        );
        for _ in 0..rng.between(2, 4) {
            observations += 1;
            let id = format!("o-{observations}");
            let resource = observation(&mut rng, &patient_id);
            db.seed(ResourceType::Observation, id, updated(&mut rng), resource);
        }
        for _ in 0..rng.between(0, 2) {
            conditions += 1;
            let id = format!("c-{conditions}");
            let (resource, code) = condition(&mut rng, &patient_id);
            if code == DIABETES && diabetic.last() != Some(&p) {
                diabetic.push(p);
            }
            db.seed(ResourceType::Condition, id, updated(&mut rng), resource);
        }
    }

    let every_tenth: Vec<usize> = (1..=patients).step_by(10).collect();
    let pilot: Vec<usize> = (1..=patients.min(25)).collect();
    let groups = [
        ("g-1", "Every tenth patient", every_tenth),
        ("g-2", "Patients with type 2 diabetes", diabetic),
        ("g-3", "Pilot cohort (first 25 patients)", pilot),
    ];
    for (id, name, members) in &groups {
        db.seed(
            ResourceType::Group,
            (*id).to_owned(),
            YEAR_START,
            group(name, members),
        );
    }
    Summary {
        patients,
        observations,
        conditions,
        groups: groups.len(),
    }
}

fn updated(rng: &mut SplitMix64) -> Millis {
    YEAR_START + (rng.next_u64() % YEAR_MS) as Millis
}

fn patient(rng: &mut SplitMix64, id: &str) -> Value {
    let female = rng.next_u64() % 2 == 0;
    let given = rng.pick(if female { GIVEN_FEMALE } else { GIVEN_MALE });
    let family = rng.pick(FAMILY);
    let birth = format!(
        "{}-{:02}-{:02}",
        rng.between(1940, 2015),
        rng.between(1, 12),
        rng.between(1, 28)
    );
    json!({
        "resourceType": "Patient",
        "id": id,
        "identifier": [{ "system": "urn:example:mrn", "value": format!("MRN-{}", &id[2..]) }],
        "active": true,
        "name": [{ "use": "official", "family": family, "given": [given] }],
        "gender": if female { "female" } else { "male" },
        "birthDate": birth,
    })
}

fn observation(rng: &mut SplitMix64, patient_id: &str) -> Value {
    let &(code, display, unit, low, high, category) = rng.pick(OBSERVATIONS);
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": category,
        }]}],
        "code": {
            "coding": [{ "system": "http://loinc.org", "code": code, "display": display }],
            "text": display,
        },
        "subject": { "reference": format!("Patient/{patient_id}") },
        "effectiveDateTime": instant::format(YEAR_START - (rng.next_u64() % YEAR_MS) as Millis),
        "valueQuantity": {
            "value": rng.between(low, high),
            "unit": unit,
            "system": "http://unitsofmeasure.org",
            "code": unit,
        },
    })
}

fn condition(rng: &mut SplitMix64, patient_id: &str) -> (Value, &'static str) {
    let &(code, display) = rng.pick(CONDITIONS);
    let resource = json!({
        "resourceType": "Condition",
        "clinicalStatus": { "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
            "code": "active",
        }]},
        "code": {
            "coding": [{ "system": "http://snomed.info/sct", "code": code, "display": display }],
            "text": display,
        },
        "subject": { "reference": format!("Patient/{patient_id}") },
        "onsetDateTime": instant::format(YEAR_START - (rng.next_u64() % (5 * YEAR_MS)) as Millis),
    });
    (resource, code)
}

fn group(name: &str, members: &[usize]) -> Value {
    let member: Vec<Value> = members
        .iter()
        .map(|p| json!({ "entity": { "reference": format!("Patient/p-{p}") } }))
        .collect();
    json!({
        "resourceType": "Group",
        "type": "person",
        "actual": true,
        "name": name,
        "quantity": members.len(),
        "member": member,
    })
}
