//! Label selectors (`app=web,tier!=db,env in (a,b),!legacy`) and field selectors
//! (`metadata.name=x,status.phase!=Bound`), parsed from list and watch query strings.
//!
//! The label grammar is Kubernetes' (`k8s.io/apimachinery/pkg/labels`): `=`, `==`, `!=`, `in`,
//! `notin`, bare `key` (exists), `!key` (does not exist), and `>`/`<` on integer values, with keys
//! and values checked as Kubernetes checks them. Field selectors accept `=`, `==` and `!=` on the
//! fields Kubernetes supports for each kind. Parsers never panic; an empty selector matches
//! everything.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::{Resource, names};

/// A selector string that does not parse; the server answers 400 with this message, which is
/// Kubernetes' own (`unable to parse requirement: ...` for a bad term, `found ',', expected: ...`
/// between terms, `field label not supported: ...` for fields).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SelectorError(pub String);

/// A label requirement's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelOp {
    /// `=` or `==`
    Equals,
    /// `!=`
    NotEquals,
    In,
    NotIn,
    /// bare `key`
    Exists,
    /// `!key`
    DoesNotExist,
    /// `>`
    GreaterThan,
    /// `<`
    LessThan,
}

/// One `key op values` term of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: LabelOp,
    pub values: BTreeSet<String>,
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.key);
        match self.op {
            LabelOp::Exists => v.is_some(),
            LabelOp::DoesNotExist => v.is_none(),
            LabelOp::Equals | LabelOp::In => v.is_some_and(|v| self.values.contains(v)),
            LabelOp::NotEquals | LabelOp::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            LabelOp::GreaterThan | LabelOp::LessThan => {
                let Some(have) = v.and_then(|v| v.parse::<i64>().ok()) else {
                    return false;
                };
                self.values.iter().filter_map(|w| w.parse::<i64>().ok()).all(|want| {
                    if self.op == LabelOp::GreaterThan {
                        have > want
                    } else {
                        have < want
                    }
                })
            }
        }
    }
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    /// All must match.
    pub requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
    End,
}

impl Tok {
    fn text(&self) -> String {
        match self {
            Tok::Ident(s) => s.clone(),
            Tok::Not => "!".into(),
            Tok::Eq => "=".into(),
            Tok::DoubleEq => "==".into(),
            Tok::NotEq => "!=".into(),
            Tok::Gt => ">".into(),
            Tok::Lt => "<".into(),
            Tok::Open => "(".into(),
            Tok::Close => ")".into(),
            Tok::Comma => ",".into(),
            Tok::End => String::new(),
        }
    }
}

fn is_special(c: char) -> bool {
    matches!(c, '!' | '=' | '(' | ')' | ',' | '>' | '<')
}

fn lex(s: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    while let Some(&c) = it.peek() {
        if c.is_whitespace() {
            it.next();
            continue;
        }
        if is_special(c) {
            it.next();
            let next_eq = it.peek() == Some(&'=');
            let tok = match c {
                '!' if next_eq => {
                    it.next();
                    Tok::NotEq
                }
                '!' => Tok::Not,
                '=' if next_eq => {
                    it.next();
                    Tok::DoubleEq
                }
                '=' => Tok::Eq,
                '(' => Tok::Open,
                ')' => Tok::Close,
                ',' => Tok::Comma,
                '>' => Tok::Gt,
                _ => Tok::Lt,
            };
            out.push(tok);
            continue;
        }
        let mut ident = String::new();
        while let Some(&c) = it.peek() {
            if c.is_whitespace() || is_special(c) {
                break;
            }
            ident.push(c);
            it.next();
        }
        out.push(Tok::Ident(ident));
    }
    out.push(Tok::End);
    out
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

/// `[a, b]` for several errors, as Kubernetes' error aggregates print.
fn aggregate(errs: Vec<String>) -> Option<String> {
    match errs.len() {
        0 => None,
        1 => errs.into_iter().next(),
        _ => Some(format!("[{}]", errs.join(", "))),
    }
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.toks.get(self.pos).unwrap_or(&Tok::End)
    }

    fn next(&mut self) -> Tok {
        let t = self.peek().clone();
        if self.pos < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    /// The whole selector: requirements separated by commas. Errors inside a requirement are
    /// prefixed `unable to parse requirement: `; errors between requirements are not.
    fn selector(&mut self) -> Result<Vec<Requirement>, String> {
        let mut out = Vec::new();
        loop {
            match self.peek() {
                Tok::Ident(_) | Tok::Not => {
                    let r = self
                        .requirement()
                        .map_err(|e| format!("unable to parse requirement: {e}"))?;
                    out.push(r);
                    match self.next() {
                        Tok::End => return Ok(out),
                        Tok::Comma => {
                            if !matches!(self.peek(), Tok::Ident(_) | Tok::Not) {
                                return Err(format!(
                                    "found '{}', expected: identifier after ','",
                                    self.peek().text()
                                ));
                            }
                        }
                        t => return Err(format!("found '{}', expected: ',' or 'end of string'", t.text())),
                    }
                }
                Tok::End => return Ok(out),
                t => {
                    return Err(format!(
                        "found '{}', expected: !, identifier, or 'end of string'",
                        t.text()
                    ));
                }
            }
        }
    }

    fn requirement(&mut self) -> Result<Requirement, String> {
        let mut op = None;
        let mut tok = self.next();
        if tok == Tok::Not {
            op = Some(LabelOp::DoesNotExist);
            tok = self.next();
        }
        let Tok::Ident(key) = tok else {
            return Err(format!("found '{}', expected: identifier", tok.text()));
        };
        // Kubernetes checks the key here with no field path, hence its `<nil>`.
        let key_errs = names::qualified_name(&key);
        if !key_errs.is_empty() {
            return Err(format!("<nil>: Invalid value: {:?}: {}", key, key_errs.join("; ")));
        }
        if matches!(self.peek(), Tok::End | Tok::Comma) {
            op = Some(op.unwrap_or(LabelOp::Exists));
        }
        if let Some(op) = op {
            return Ok(Requirement {
                key,
                op,
                values: BTreeSet::new(),
            });
        }
        let op = match self.next() {
            Tok::Eq | Tok::DoubleEq => LabelOp::Equals,
            Tok::NotEq => LabelOp::NotEquals,
            Tok::Gt => LabelOp::GreaterThan,
            Tok::Lt => LabelOp::LessThan,
            Tok::Ident(s) if s == "in" => LabelOp::In,
            Tok::Ident(s) if s == "notin" => LabelOp::NotIn,
            t => return Err(format!("found '{}', expected: '=', '!=', '==', 'in', notin'", t.text())),
        };
        let values = match op {
            LabelOp::In | LabelOp::NotIn => self.value_set()?,
            _ => self.exact_value()?,
        };
        // NewRequirement's checks on the values, in its order.
        let mut errs = Vec::new();
        if matches!(op, LabelOp::GreaterThan | LabelOp::LessThan) {
            for (i, v) in values.iter().enumerate() {
                if v.parse::<i64>().is_err() {
                    errs.push(format!(
                        "values[{i}]: Invalid value: {v:?}: for 'Gt', 'Lt' operators, the value must be an integer"
                    ));
                }
            }
        }
        for (i, v) in values.iter().enumerate() {
            let msgs = names::label_value(v);
            if !msgs.is_empty() {
                errs.push(format!("values[{i}][{key}]: Invalid value: {v:?}: {}", msgs.join("; ")));
            }
        }
        match aggregate(errs) {
            Some(e) => Err(e),
            None => Ok(Requirement { key, op, values }),
        }
    }

    fn exact_value(&mut self) -> Result<BTreeSet<String>, String> {
        match self.peek() {
            Tok::End | Tok::Comma => Ok(BTreeSet::from([String::new()])),
            _ => match self.next() {
                Tok::Ident(v) => Ok(BTreeSet::from([v])),
                t => Err(format!("found '{}', expected: identifier", t.text())),
            },
        }
    }

    fn value_set(&mut self) -> Result<BTreeSet<String>, String> {
        let t = self.next();
        if t != Tok::Open {
            return Err(format!("found '{}' expected: '('", t.text()));
        }
        let first = self.peek().clone();
        match first {
            Tok::Ident(_) | Tok::Comma => {
                let values = self.identifiers()?;
                if self.next() != Tok::Close {
                    return Err(format!("found '{}', expected: ')'", first.text()));
                }
                Ok(values)
            }
            Tok::Close => {
                self.next();
                Ok(BTreeSet::from([String::new()]))
            }
            t => Err(format!("found '{}', expected: ',', ')' or identifier", t.text())),
        }
    }

    /// A possibly empty, comma-separated list of possibly empty values; stops before `)`.
    fn identifiers(&mut self) -> Result<BTreeSet<String>, String> {
        let mut values = BTreeSet::new();
        loop {
            match self.next() {
                Tok::Ident(v) => {
                    values.insert(v);
                    match self.peek() {
                        Tok::Comma => continue,
                        Tok::Close => return Ok(values),
                        t => return Err(format!("found '{}', expected: ',' or ')'", t.text())),
                    }
                }
                Tok::Comma => {
                    if values.is_empty() {
                        values.insert(String::new());
                    }
                    match self.peek() {
                        Tok::Close => {
                            values.insert(String::new());
                            return Ok(values);
                        }
                        Tok::Comma => {
                            self.next();
                            values.insert(String::new());
                        }
                        _ => {}
                    }
                }
                t => return Err(format!("found '{}', expected: ',', or identifier", t.text())),
            }
        }
    }
}

fn validate_key(key: &str) -> Result<(), SelectorError> {
    let msgs = names::qualified_name(key);
    if msgs.is_empty() {
        Ok(())
    } else {
        Err(SelectorError(format!(
            "key: Invalid value: {key:?}: {}",
            msgs.join("; ")
        )))
    }
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut p = Parser { toks: lex(s), pos: 0 };
        let requirements = p.selector().map_err(SelectorError)?;
        Ok(LabelSelector { requirements })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// `matches` on an object's `metadata.labels` (absent labels are the empty set).
    pub fn matches_object(&self, obj: &Value) -> bool {
        self.matches(&labels_of(obj))
    }

    /// From a `metav1.LabelSelector` (`matchLabels`, `matchExpressions`), as in a claim's
    /// `spec.selector`. `None` (no selector) is for the caller to decide; an empty one matches all.
    pub fn from_api(sel: &Value) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in m {
                validate_key(k)?;
                let v = v.as_str().unwrap_or("").to_owned();
                requirements.push(Requirement {
                    key: k.clone(),
                    op: LabelOp::Equals,
                    values: BTreeSet::from([v]),
                });
            }
        }
        if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e.get("key").and_then(Value::as_str).unwrap_or("").to_owned();
                validate_key(&key)?;
                let values: BTreeSet<String> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .unwrap_or_default();
                let op = match e.get("operator").and_then(Value::as_str).unwrap_or("") {
                    "In" => LabelOp::In,
                    "NotIn" => LabelOp::NotIn,
                    "Exists" => LabelOp::Exists,
                    "DoesNotExist" => LabelOp::DoesNotExist,
                    other => {
                        return Err(SelectorError(format!(
                            "{other:?} is not a valid label selector operator"
                        )));
                    }
                };
                requirements.push(Requirement { key, op, values });
            }
        }
        Ok(LabelSelector { requirements })
    }
}

/// An object's `metadata.labels` as a map (non-string values are skipped).
pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// A field requirement's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldOp {
    /// `=` or `==`
    Equals,
    /// `!=`
    NotEquals,
}

/// One `field op value` term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    pub field: String,
    pub op: FieldOp,
    pub value: String,
}

/// A parsed field selector; the fields each kind supports are those Kubernetes supports
/// (`metadata.name`, `metadata.namespace`, plus per kind, e.g. `status.phase`, `spec.nodeName`,
/// `involvedObject.*` for events). Others are refused at parse time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldSelector {
    /// All must match.
    pub requirements: Vec<FieldRequirement>,
    /// The kind the selector was parsed for (its fields are read from objects of that kind);
    /// empty: taken from each object's `kind`.
    pub kind: &'static str,
}

/// The selectable fields of a kind beyond `metadata.name` and `metadata.namespace`, with the JSON
/// pointer each reads.
fn kind_fields(kind: &str) -> &'static [(&'static str, &'static str)] {
    match kind {
        "Pod" => &[
            ("spec.nodeName", "/spec/nodeName"),
            ("spec.restartPolicy", "/spec/restartPolicy"),
            ("spec.schedulerName", "/spec/schedulerName"),
            ("spec.serviceAccountName", "/spec/serviceAccountName"),
            ("spec.hostNetwork", "/spec/hostNetwork"),
            ("status.phase", "/status/phase"),
            ("status.podIP", "/status/podIP"),
            ("status.nominatedNodeName", "/status/nominatedNodeName"),
        ],
        "Event" => &[
            ("involvedObject.kind", "/involvedObject/kind"),
            ("involvedObject.namespace", "/involvedObject/namespace"),
            ("involvedObject.name", "/involvedObject/name"),
            ("involvedObject.uid", "/involvedObject/uid"),
            ("involvedObject.apiVersion", "/involvedObject/apiVersion"),
            ("involvedObject.resourceVersion", "/involvedObject/resourceVersion"),
            ("involvedObject.fieldPath", "/involvedObject/fieldPath"),
            ("reason", "/reason"),
            ("reportingComponent", "/reportingComponent"),
            ("source", "/source/component"),
            ("type", "/type"),
        ],
        "Secret" => &[("type", "/type")],
        "Namespace" => &[("status.phase", "/status/phase")],
        "Node" => &[("spec.unschedulable", "/spec/unschedulable")],
        _ => &[],
    }
}

fn field_pointer(kind: &str, field: &str) -> Option<&'static str> {
    match field {
        "metadata.name" => Some("/metadata/name"),
        "metadata.namespace" => Some("/metadata/namespace"),
        _ => kind_fields(kind).iter().find(|(f, _)| *f == field).map(|(_, p)| *p),
    }
}

/// Splits on unescaped `sep`, keeping escapes for the next stage.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            if let Some(last) = parts.last_mut() {
                last.push('\\');
                last.push(c);
            }
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(String::new());
        } else if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    if escaped && let Some(last) = parts.last_mut() {
        last.push('\\');
    }
    parts
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                Some(e) => return Err(format!("invalid escape sequence: \\{e}")),
                None => return Err("unterminated escape sequence".into()),
            }
        } else if c == ',' || c == '=' {
            return Err(format!("invalid field selector: unescaped character in value: {c}"));
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

impl FieldSelector {
    pub fn parse(res: &Resource, s: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector {
                requirements,
                kind: res.kind,
            });
        }
        for term in split_unescaped(s, ',') {
            if term.is_empty() {
                continue;
            }
            // Find the operator outside escapes: `!=`, `==`, then `=`.
            let (field, op, value) = split_field_term(&term)
                .ok_or_else(|| SelectorError(format!("invalid selector: '{s}'; can't understand '{term}'")))?;
            let field = field.to_owned();
            if field_pointer(res.kind, &field).is_none() {
                return Err(SelectorError(format!("field label not supported: {field}")));
            }
            let value = unescape(value).map_err(SelectorError)?;
            requirements.push(FieldRequirement { field, op, value });
        }
        Ok(FieldSelector {
            requirements,
            kind: res.kind,
        })
    }

    /// Whether `obj` satisfies every term; a missing field reads as `""`, booleans as
    /// `true`/`false`.
    pub fn matches(&self, obj: &Value) -> bool {
        let kind = if self.kind.is_empty() {
            obj.get("kind").and_then(Value::as_str).unwrap_or("")
        } else {
            self.kind
        };
        let read = |ptr: &str| {
            obj.pointer(ptr).and_then(|v| match v {
                Value::String(s) if s.is_empty() => None,
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            })
        };
        self.requirements.iter().all(|r| {
            let mut have = field_pointer(kind, &r.field)
                .or_else(|| field_pointer_any(&r.field))
                .and_then(read);
            // An event's `source` is its source.component, else its reportingComponent.
            if have.is_none() && r.field == "source" {
                have = read("/reportingComponent");
            }
            let have = have.unwrap_or_else(|| default_field_value(&r.field));
            match r.op {
                FieldOp::Equals => have == r.value,
                FieldOp::NotEquals => have != r.value,
            }
        })
    }
}

/// Boolean fields read as `false` when unset, as Kubernetes' field sets have them.
fn default_field_value(field: &str) -> String {
    match field {
        "spec.unschedulable" | "spec.hostNetwork" => "false".into(),
        _ => String::new(),
    }
}

/// For objects whose `kind` is not set: the pointer of `field` in any kind.
fn field_pointer_any(field: &str) -> Option<&'static str> {
    ["Pod", "Event", "Secret", "Namespace", "Node"]
        .iter()
        .find_map(|k| field_pointer(k, field))
}

fn split_field_term(term: &str) -> Option<(&str, FieldOp, &str)> {
    let bytes = term.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'!' if bytes.get(i + 1) == Some(&b'=') => return Some((&term[..i], FieldOp::NotEquals, &term[i + 2..])),
            b'=' if bytes.get(i + 1) == Some(&b'=') => return Some((&term[..i], FieldOp::Equals, &term[i + 2..])),
            b'=' => return Some((&term[..i], FieldOp::Equals, &term[i + 1..])),
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::resources::RESOURCES;
    use proptest::prelude::*;
    use rstest::rstest;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[rstest]
    #[case("", &[], true)]
    #[case("app=web", &[("app", "web")], true)]
    #[case("app==web", &[("app", "db")], false)]
    #[case("app!=web", &[], true)]
    #[case("app!=web", &[("app", "web")], false)]
    #[case("env in (a, b)", &[("env", "b")], true)]
    #[case("env in (a,b)", &[("env", "c")], false)]
    #[case("env notin (a,b)", &[], true)]
    #[case("env notin (a,b)", &[("env", "a")], false)]
    #[case("legacy", &[("legacy", "")], true)]
    #[case("!legacy", &[("legacy", "")], false)]
    #[case("!legacy", &[], true)]
    #[case("app=web,tier!=db,env in (a,b),!legacy", &[("app", "web"), ("env", "a")], true)]
    #[case("app=web,tier!=db", &[("app", "web"), ("tier", "db")], false)]
    #[case("app=", &[("app", "")], true)]
    #[case("replicas>2", &[("replicas", "3")], true)]
    #[case("replicas<2", &[("replicas", "3")], false)]
    #[case("example.com/role in (in, notin)", &[("example.com/role", "notin")], true)]
    #[case("x in (foo,,baz),y,z notin ()", &[("x", ""), ("y", "1")], true)]
    #[case("x in (,)", &[("x", "")], true)]
    fn label_matches(#[case] sel: &str, #[case] l: &[(&str, &str)], #[case] want: bool) {
        assert_eq!(LabelSelector::parse(sel).unwrap().matches(&labels(l)), want, "{sel}");
    }

    #[rstest]
    #[case("app=web,", "found '', expected: identifier after ','")]
    #[case(",a", "found ',', expected: !, identifier, or 'end of string'")]
    #[case("!", "unable to parse requirement: found '', expected: identifier")]
    #[case("!a=b", "found '=', expected: ',' or 'end of string'")]
    #[case("env in a", "unable to parse requirement: found 'a' expected: '('")]
    #[case("env in (a b)", "unable to parse requirement: found 'b', expected: ',' or ')'")]
    #[case(
        "env (a)",
        "unable to parse requirement: found '(', expected: '=', '!=', '==', 'in', notin'"
    )]
    #[case(
        "a>b",
        "unable to parse requirement: values[0]: Invalid value: \"b\": for 'Gt', 'Lt' operators, the value must be an integer"
    )]
    #[case(
        "-a=b",
        "unable to parse requirement: <nil>: Invalid value: \"-a\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
    )]
    #[case(
        "a=-b",
        "unable to parse requirement: values[0][a]: Invalid value: \"-b\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
    )]
    #[case(
        "a>-1x",
        "unable to parse requirement: [values[0]: Invalid value: \"-1x\": for 'Gt', 'Lt' operators, the value must be an integer, values[0][a]: Invalid value: \"-1x\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')]"
    )]
    fn label_errors(#[case] sel: &str, #[case] want: &str) {
        assert_eq!(LabelSelector::parse(sel).unwrap_err().to_string(), want);
    }

    #[test]
    fn from_api_selector() {
        let s = LabelSelector::from_api(&json!({"matchLabels": {"tier": "fast"},
            "matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]}))
        .unwrap();
        assert!(s.matches(&labels(&[("tier", "fast"), ("zone", "a")])));
        assert!(!s.matches(&labels(&[("tier", "fast"), ("zone", "b")])));
        assert!(!s.matches(&labels(&[])));
    }

    fn res(kind: &str) -> &'static Resource {
        RESOURCES.iter().find(|r| r.kind == kind).unwrap()
    }

    #[rstest]
    #[case("Pod", "spec.nodeName=n1", json!({"kind": "Pod", "spec": {"nodeName": "n1"}}), true)]
    #[case("Pod", "spec.nodeName=", json!({"kind": "Pod", "spec": {}}), true)]
    #[case("Pod", "status.phase!=Running,metadata.namespace==a", json!({"kind": "Pod", "metadata": {"namespace": "a"}, "status": {"phase": "Pending"}}), true)]
    #[case("Pod", "status.phase!=Pending", json!({"kind": "Pod", "status": {"phase": "Pending"}}), false)]
    #[case("Event", "involvedObject.kind=PersistentVolumeClaim,involvedObject.name=data", json!({"kind": "Event", "involvedObject": {"kind": "PersistentVolumeClaim", "name": "data"}}), true)]
    #[case("Event", "source=persistentvolume-controller", json!({"kind": "Event", "source": {"component": "persistentvolume-controller"}}), true)]
    #[case("Event", "source=berth-binder", json!({"kind": "Event", "reportingComponent": "berth-binder"}), true)]
    #[case("Secret", "type=Opaque", json!({"type": "Opaque"}), true)]
    #[case("Node", "spec.unschedulable=false", json!({"kind": "Node", "spec": {}}), true)]
    #[case("Node", "spec.unschedulable=true", json!({"kind": "Node", "spec": {"unschedulable": true}}), true)]
    #[case("Secret", "type=Opaque", json!({"kind": "Secret", "type": "kubernetes.io/tls"}), false)]
    #[case("PersistentVolume", "metadata.name=pv\\,1", json!({"kind": "PersistentVolume", "metadata": {"name": "pv,1"}}), true)]
    #[case("Pod", "spec.nodeName=n1,", json!({"kind": "Pod", "spec": {"nodeName": "n1"}}), true)]
    fn field_matches(#[case] kind: &str, #[case] sel: &str, #[case] obj: Value, #[case] want: bool) {
        assert_eq!(
            FieldSelector::parse(res(kind), sel).unwrap().matches(&obj),
            want,
            "{sel}"
        );
    }

    #[rstest]
    #[case(
        "PersistentVolumeClaim",
        "status.phase=Bound",
        "field label not supported: status.phase"
    )]
    #[case("Pod", "spec.volumes=x", "field label not supported: spec.volumes")]
    #[case("Pod", "nonsense", "invalid selector: 'nonsense'; can't understand 'nonsense'")]
    #[case(
        "Pod",
        "spec.nodeName=a=b",
        "invalid field selector: unescaped character in value: ="
    )]
    #[case("Pod", "spec.nodeName=\\q", "invalid escape sequence: \\q")]
    fn field_errors(#[case] kind: &str, #[case] sel: &str, #[case] want: &str) {
        assert_eq!(FieldSelector::parse(res(kind), sel).unwrap_err().to_string(), want);
    }

    proptest! {
        #[test]
        fn label_parse_never_panics(s in "\\PC{0,60}") {
            let _ = LabelSelector::parse(&s);
        }

        #[test]
        fn label_grammar_never_panics(s in "[a-z!=(), <>]{0,40}") {
            if let Ok(sel) = LabelSelector::parse(&s) {
                let _ = sel.matches(&BTreeMap::new());
            }
        }

        #[test]
        fn field_parse_never_panics(s in "\\PC{0,60}", idx in 0usize..16) {
            let r = &RESOURCES[idx % RESOURCES.len()];
            if let Ok(sel) = FieldSelector::parse(r, &s) {
                let _ = sel.matches(&json!({}));
            }
        }

        #[test]
        fn equality_selector_matches_its_own_label(k in "[a-z][a-z0-9]{0,10}", v in "[a-z0-9]{0,10}") {
            let sel = LabelSelector::parse(&format!("{k}={v}")).unwrap();
            prop_assert!(sel.matches(&labels(&[(&k, &v)])));
            let neg = LabelSelector::parse(&format!("{k}!={v}")).unwrap();
            prop_assert!(!neg.matches(&labels(&[(&k, &v)])));
        }
    }
}
