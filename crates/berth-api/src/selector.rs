//! Label selectors (`app=web,tier!=db,env in (a,b),!legacy`) and field selectors
//! (`metadata.name=x,status.phase!=Bound`), parsed from list and watch query strings.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::Resource;

/// A selector string that does not parse; the server answers 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement: {0}")]
pub struct SelectorError(pub String);

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {}

impl LabelSelector {
    pub fn parse(_s: &str) -> Result<Self, SelectorError> {
        Ok(LabelSelector {})
    }

    pub fn matches(&self, _labels: &BTreeMap<String, String>) -> bool {
        true
    }
}

/// A parsed field selector; the fields each kind supports are those Kubernetes supports
/// (`metadata.name`, `metadata.namespace`, plus per kind, e.g. `status.phase`, `spec.nodeName`,
/// `involvedObject.*` for events). Others are refused at parse time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldSelector {}

impl FieldSelector {
    pub fn parse(_res: &Resource, _s: &str) -> Result<Self, SelectorError> {
        Ok(FieldSelector {})
    }

    pub fn matches(&self, _obj: &Value) -> bool {
        true
    }
}
