//! The catalogue of invalid EventConsumers (`operator/testdata/invalid-eventconsumers.yaml`):
//! what the API server must reject and with which message. Shared by the operator's unit
//! tests (CEL rules, evaluated client-side) and the API-server test in `tests/`.

use serde::Deserialize;
use serde_json::Value;

/// The catalogue file's text.
pub const CATALOGUE_YAML: &str = include_str!("../testdata/invalid-eventconsumers.yaml");

/// The catalogue: a valid base object and the invalid variations of it.
#[derive(Deserialize, Debug, Clone)]
pub struct Catalogue {
    /// A valid EventConsumer every case starts from.
    pub base: Value,
    /// The invalid variations.
    pub cases: Vec<Case>,
}

/// One invalid EventConsumer.
#[derive(Deserialize, Debug, Clone)]
pub struct Case {
    /// Unique, used as a suffix of the object's name.
    pub name: String,
    /// `openapi` or `cel`: which part of the schema rejects it.
    pub layer: Layer,
    /// JSON merge patch applied to the base for the create.
    pub patch: Value,
    /// For transition rules: a merge patch applied to the created object for an update that
    /// must be rejected (the create must succeed).
    #[serde(default)]
    pub update: Option<Value>,
    /// Substrings that must all appear in the rejection.
    pub expect: Vec<String>,
}

/// Which part of the CRD schema rejects a case.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// OpenAPI keywords: types, enums, ranges, patterns, required fields.
    Openapi,
    /// CEL `x-kubernetes-validations` rules.
    Cel,
}

impl Case {
    /// The object to create: the base with this case's patch.
    pub fn created(&self, base: &Value) -> Value {
        let mut object = base.clone();
        merge_patch(&mut object, &self.patch);
        object
    }

    /// The object of the rejected update, if this case tests a transition rule.
    pub fn updated(&self, base: &Value) -> Option<Value> {
        self.update.as_ref().map(|update| {
            let mut object = self.created(base);
            merge_patch(&mut object, update);
            object
        })
    }
}

/// Parses the catalogue.
pub fn load() -> Catalogue {
    serde_norway::from_str(CATALOGUE_YAML)
        .expect("operator/testdata/invalid-eventconsumers.yaml parses")
}

/// Applies a JSON merge patch (RFC 7386) to `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": {"b": 1, "c": [1, 2]}, "d": "x"});
        merge_patch(
            &mut doc,
            &json!({"a": {"b": null, "c": [3], "e": {"f": true}}, "d": null, "g": 2}),
        );
        assert_eq!(doc, json!({"a": {"c": [3], "e": {"f": true}}, "g": 2}));
        let mut scalar = json!(1);
        merge_patch(&mut scalar, &json!({"a": 1}));
        assert_eq!(scalar, json!({"a": 1}));
    }

    #[test]
    fn catalogue_is_large_distinct_and_well_formed() {
        let catalogue = load();
        assert!(
            catalogue.cases.len() >= 25,
            "at least 25 invalid cases, got {}",
            catalogue.cases.len()
        );
        let names: BTreeSet<_> = catalogue.cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.len(), catalogue.cases.len(), "case names are unique");
        let objects: BTreeSet<String> = catalogue
            .cases
            .iter()
            .map(|c| {
                format!(
                    "{}{:?}",
                    c.created(&catalogue.base),
                    c.updated(&catalogue.base)
                )
            })
            .collect();
        assert_eq!(
            objects.len(),
            catalogue.cases.len(),
            "every case is a distinct object"
        );
        for case in &catalogue.cases {
            assert!(!case.expect.is_empty(), "{}: expects a message", case.name);
            assert!(
                case.name.len() <= 40
                    && case
                        .name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{}: usable in an object name",
                case.name
            );
            match case.updated(&catalogue.base) {
                Some(updated) => assert_ne!(
                    updated,
                    case.created(&catalogue.base),
                    "{}: the update changes the object",
                    case.name
                ),
                None => assert_ne!(
                    case.created(&catalogue.base),
                    catalogue.base,
                    "{}: changes the base",
                    case.name
                ),
            }
        }
    }
}
