//! Secret references in StorageClass parameters, resolved as external-provisioner's
//! `getSecretReference` does (`pkg/controller/controller.go`, v5 and later). Pure: this names the
//! Secret to read; it never reads one, and it never sees a secret's data.
//!
//! Each CSI call that can carry credentials has a pair of parameters,
//! `csi.storage.k8s.io/<kind>-secret-name` and `-namespace`; the first four kinds also accept the
//! deprecated `csi<Kind>SecretName`/`Namespace` pair. A kind with neither falls back to the
//! `csi.storage.k8s.io/secret-name`/`-namespace` pair. The values are templates:
//! - the namespace may use `${pv.name}` and `${pvc.namespace}` (neither is under the claim
//!   author's control);
//! - the name may use those and `${pvc.name}` and `${pvc.annotations['<key>']}`.
//!
//! Since external-provisioner v5.0 every kind, the provisioner's included, allows the same
//! tokens; older releases refused claim annotations for the provisioner secret.

use std::collections::BTreeMap;

use berth_api::names::{dns1123_label, dns1123_subdomain};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;

use super::ProvisionError;

/// A CSI call that may carry credentials, and so may have a secret named in the class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecretKind {
    /// CreateVolume and DeleteVolume.
    Provisioner,
    /// ControllerPublishVolume and ControllerUnpublishVolume.
    ControllerPublish,
    /// NodeStageVolume.
    NodeStage,
    /// NodePublishVolume.
    NodePublish,
    /// ControllerExpandVolume.
    ControllerExpand,
    /// NodeExpandVolume.
    NodeExpand,
    /// ControllerModifyVolume.
    ControllerModify,
}

/// Where one kind's templates live among the class parameters.
struct SecretParams {
    /// The name external-provisioner uses for the kind in its messages.
    label: &'static str,
    name_key: &'static str,
    namespace_key: &'static str,
    deprecated: Option<(&'static str, &'static str)>,
}

const DEFAULT_PARAMS: SecretParams = SecretParams {
    label: "Default",
    name_key: "csi.storage.k8s.io/secret-name",
    namespace_key: "csi.storage.k8s.io/secret-namespace",
    deprecated: None,
};

impl SecretKind {
    /// Every kind, in the order external-provisioner resolves them.
    pub const ALL: [SecretKind; 7] = [
        SecretKind::Provisioner,
        SecretKind::ControllerPublish,
        SecretKind::NodeStage,
        SecretKind::NodePublish,
        SecretKind::ControllerExpand,
        SecretKind::NodeExpand,
        SecretKind::ControllerModify,
    ];

    fn params(self) -> SecretParams {
        let (label, name_key, namespace_key, deprecated) = match self {
            SecretKind::Provisioner => (
                "Provisioner",
                "csi.storage.k8s.io/provisioner-secret-name",
                "csi.storage.k8s.io/provisioner-secret-namespace",
                Some(("csiProvisionerSecretName", "csiProvisionerSecretNamespace")),
            ),
            SecretKind::ControllerPublish => (
                "ControllerPublish",
                "csi.storage.k8s.io/controller-publish-secret-name",
                "csi.storage.k8s.io/controller-publish-secret-namespace",
                Some(("csiControllerPublishSecretName", "csiControllerPublishSecretNamespace")),
            ),
            SecretKind::NodeStage => (
                "NodeStage",
                "csi.storage.k8s.io/node-stage-secret-name",
                "csi.storage.k8s.io/node-stage-secret-namespace",
                Some(("csiNodeStageSecretName", "csiNodeStageSecretNamespace")),
            ),
            SecretKind::NodePublish => (
                "NodePublish",
                "csi.storage.k8s.io/node-publish-secret-name",
                "csi.storage.k8s.io/node-publish-secret-namespace",
                Some(("csiNodePublishSecretName", "csiNodePublishSecretNamespace")),
            ),
            SecretKind::ControllerExpand => (
                "ControllerExpand",
                "csi.storage.k8s.io/controller-expand-secret-name",
                "csi.storage.k8s.io/controller-expand-secret-namespace",
                None,
            ),
            SecretKind::NodeExpand => (
                "NodeExpand",
                "csi.storage.k8s.io/node-expand-secret-name",
                "csi.storage.k8s.io/node-expand-secret-namespace",
                None,
            ),
            SecretKind::ControllerModify => (
                "ControllerModify",
                "csi.storage.k8s.io/controller-modify-secret-name",
                "csi.storage.k8s.io/controller-modify-secret-namespace",
                None,
            ),
        };
        SecretParams {
            label,
            name_key,
            namespace_key,
            deprecated,
        }
    }

    /// The `csi.storage.k8s.io/` parameter holding this kind's secret name template.
    pub fn name_key(self) -> &'static str {
        self.params().name_key
    }

    /// The `csi.storage.k8s.io/` parameter holding this kind's secret namespace template.
    pub fn namespace_key(self) -> &'static str {
        self.params().namespace_key
    }
}

/// Why a class's secret parameters are unusable; the messages are external-provisioner's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The name/namespace pair is incomplete, doubled or empty.
    #[error("failed to get {}name and namespace template from params: {problem}", default_word(*.default))]
    Params { default: bool, problem: ParamsProblem },
    /// A template uses a token that is not allowed where it is (or does not exist).
    #[error("error resolving value {template:?}: invalid tokens: {}", super::go_quoted_list(.tokens))]
    InvalidTokens { template: String, tokens: Vec<String> },
    /// The namespace, once resolved, is not an RFC 1123 label.
    #[error("{}", not_valid(.template, .resolved, "namespace"))]
    InvalidNamespace { template: String, resolved: String },
    /// The name, once resolved, is not an RFC 1123 subdomain.
    #[error("{}", not_valid(.template, .resolved, "secret"))]
    InvalidName { template: String, resolved: String },
}

/// What is wrong with a name/namespace parameter pair.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsProblem {
    #[error("{kind} secrets specified in parameters with both \"csi\" and \"csi.storage.k8s.io/\" keys")]
    BothKeys { kind: &'static str },
    #[error("either name and namespace for {kind} secrets specified, Both must be specified")]
    OnlyOne { kind: &'static str },
    #[error("{kind} secrets specified in parameters but value of either namespace or name is empty")]
    Empty { kind: &'static str },
}

fn default_word(default: bool) -> &'static str {
    if default { "default " } else { "" }
}

fn not_valid(template: &str, resolved: &str, what: &str) -> String {
    if template == resolved {
        format!("{template:?} is not a valid {what} name")
    } else {
        format!("{template:?} resolved to {resolved:?} which is not a valid {what} name")
    }
}

/// The (name, namespace) templates of one kind, or `None` when the class names none.
fn templates(params: &BTreeMap<String, String>, sp: &SecretParams) -> Result<Option<(String, String)>, ParamsProblem> {
    let (mut name, mut namespace) = (String::new(), String::new());
    let (mut names, mut namespaces) = (0, 0);
    let keys = sp
        .deprecated
        .into_iter()
        .chain(std::iter::once((sp.name_key, sp.namespace_key)));
    for (name_key, namespace_key) in keys {
        if let Some(t) = params.get(name_key) {
            name = t.clone();
            names += 1;
        }
        if let Some(t) = params.get(namespace_key) {
            namespace = t.clone();
            namespaces += 1;
        }
    }
    let kind = sp.label;
    match (names, namespaces) {
        (0, 0) => Ok(None),
        (n, ns) if n > 1 || ns > 1 => Err(ParamsProblem::BothKeys { kind }),
        (1, 1) if name.is_empty() || namespace.is_empty() => Err(ParamsProblem::Empty { kind }),
        (1, 1) => Ok(Some((name, namespace))),
        _ => Err(ParamsProblem::OnlyOne { kind }),
    }
}

/// The Secret `(namespace, name)` the class names for `kind`, with its templates resolved for
/// the volume `pv_name` of `claim`, or `None` when the class names no secret for it (neither
/// the kind's own pair nor the default pair). A pair must be complete, given once (not both the
/// deprecated and the prefixed key), non-empty, use only the allowed tokens, and resolve to a
/// valid namespace and Secret name.
pub fn resolve_secret_ref(
    class_params: &BTreeMap<String, String>,
    kind: SecretKind,
    pv_name: &str,
    claim: &PersistentVolumeClaim,
) -> Result<Option<(String, String)>, ProvisionError> {
    let found = templates(class_params, &kind.params())
        .map_err(|problem| SecretError::Params {
            default: false,
            problem,
        })?
        .map(Ok)
        .or_else(|| {
            templates(class_params, &DEFAULT_PARAMS)
                .map_err(|problem| SecretError::Params { default: true, problem })
                .transpose()
        })
        .transpose()?;
    let Some((name_template, namespace_template)) = found else {
        return Ok(None);
    };

    let claim_namespace = claim.metadata.namespace.as_deref().unwrap_or("");
    let claim_name = claim.metadata.name.as_deref().unwrap_or("");
    let annotations = claim.metadata.annotations.as_ref();

    let namespace = expand(&namespace_template, |token| match token {
        "pv.name" => Some(pv_name.to_owned()),
        "pvc.namespace" => Some(claim_namespace.to_owned()),
        _ => None,
    })?;
    if !dns1123_label(&namespace).is_empty() {
        return Err(SecretError::InvalidNamespace {
            template: namespace_template,
            resolved: namespace,
        }
        .into());
    }

    let name = expand(&name_template, |token| match token {
        "pv.name" => Some(pv_name.to_owned()),
        "pvc.name" => Some(claim_name.to_owned()),
        "pvc.namespace" => Some(claim_namespace.to_owned()),
        _ => {
            let key = token.strip_prefix("pvc.annotations['")?.strip_suffix("']")?;
            annotations?.get(key).cloned()
        }
    })?;
    if !dns1123_subdomain(&name).is_empty() {
        return Err(SecretError::InvalidName {
            template: name_template,
            resolved: name,
        }
        .into());
    }
    Ok(Some((namespace, name)))
}

/// Expands `$name` and `${name}` as Go's `os.Expand` does, failing with every unknown token
/// (sorted, each once) rather than replacing it by "".
fn expand(template: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, SecretError> {
    let bytes = template.as_bytes();
    let mut out = String::with_capacity(template.len());
    let mut missing: Vec<String> = Vec::new();
    let mut start = 0;
    let mut j = 0;
    while j < bytes.len() {
        if bytes[j] == b'$' && j + 1 < bytes.len() {
            out.push_str(&template[start..j]);
            let (name, width) = shell_name(&template[j + 1..]);
            if name.is_empty() && width == 0 {
                // Valid syntax, but not a name: the dollar stays.
                out.push('$');
            } else if !name.is_empty() {
                match lookup(name) {
                    Some(v) => out.push_str(&v),
                    None => missing.push(name.to_owned()),
                }
            }
            // Otherwise bad syntax (`${` or `${}`): os.Expand eats it.
            j += width;
            start = j + 1;
        }
        j += 1;
    }
    out.push_str(template.get(start..).unwrap_or(""));
    if missing.is_empty() {
        Ok(out)
    } else {
        missing.sort();
        missing.dedup();
        Err(SecretError::InvalidTokens {
            template: template.to_owned(),
            tokens: missing,
        })
    }
}

/// Go's `getShellName`: the variable name after a `$` and how many bytes it spans.
fn shell_name(s: &str) -> (&str, usize) {
    let b = s.as_bytes();
    let special = |c: u8| matches!(c, b'*' | b'#' | b'$' | b'@' | b'!' | b'?' | b'-') || c.is_ascii_digit();
    if b.first() == Some(&b'{') {
        if b.len() > 2 && special(b[1]) && b[2] == b'}' {
            return (&s[1..2], 3);
        }
        return match b.iter().skip(1).position(|&c| c == b'}') {
            Some(0) => ("", 2),
            Some(i) => (&s[1..=i], i + 2),
            None => ("", 1),
        };
    }
    if b.first().is_some_and(|&c| special(c)) {
        return (&s[0..1], 1);
    }
    let n = b
        .iter()
        .take_while(|&&c| c == b'_' || c.is_ascii_alphanumeric())
        .count();
    (&s[..n], n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::provision::fixtures::claim;
    use rstest::rstest;
    use serde_json::json;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn resolve(pairs: &[(&str, &str)], kind: SecretKind) -> Result<Option<(String, String)>, String> {
        let c = claim(json!({"metadata": {"annotations": {"example.com/secret": "team-a-creds"}}}));
        resolve_secret_ref(&params(pairs), kind, "pvc-u-1", &c).map_err(|e| e.to_string())
    }

    fn ok(ns: &str, name: &str) -> Result<Option<(String, String)>, String> {
        Ok(Some((ns.to_owned(), name.to_owned())))
    }

    const PROV_NAME: &str = "csi.storage.k8s.io/provisioner-secret-name";
    const PROV_NS: &str = "csi.storage.k8s.io/provisioner-secret-namespace";

    #[rstest]
    #[case::none(&[], SecretKind::Provisioner, Ok(None))]
    #[case::literal(&[(PROV_NAME, "creds"), (PROV_NS, "kube-system")], SecretKind::Provisioner, ok("kube-system", "creds"))]
    #[case::pv_name_in_both(&[(PROV_NAME, "${pv.name}-creds"), (PROV_NS, "${pv.name}")], SecretKind::Provisioner, ok("pvc-u-1", "pvc-u-1-creds"))]
    #[case::claim_name_and_namespace(&[(PROV_NAME, "${pvc.namespace}-${pvc.name}"), (PROV_NS, "${pvc.namespace}")], SecretKind::Provisioner, ok("default", "default-data"))]
    #[case::annotation_in_the_name(&[(PROV_NAME, "${pvc.annotations['example.com/secret']}"), (PROV_NS, "${pvc.namespace}")], SecretKind::Provisioner, ok("default", "team-a-creds"))]
    #[case::bare_dollar_name(&[(PROV_NAME, "x-$pv"), (PROV_NS, "ns")], SecretKind::Provisioner, Err(r#"error resolving value "x-$pv": invalid tokens: ["pv"]"#.to_owned()))]
    #[case::claim_name_not_allowed_in_the_namespace(&[(PROV_NAME, "creds"), (PROV_NS, "${pvc.name}")], SecretKind::Provisioner, Err(r#"error resolving value "${pvc.name}": invalid tokens: ["pvc.name"]"#.to_owned()))]
    #[case::annotation_not_allowed_in_the_namespace(&[(PROV_NAME, "creds"), (PROV_NS, "${pvc.annotations['example.com/secret']}")], SecretKind::Provisioner, Err(r#"error resolving value "${pvc.annotations['example.com/secret']}": invalid tokens: ["pvc.annotations['example.com/secret']"]"#.to_owned()))]
    #[case::missing_annotation(&[(PROV_NAME, "${pvc.annotations['nope']}-${pv.nme}"), (PROV_NS, "ns")], SecretKind::Provisioner, Err(r#"error resolving value "${pvc.annotations['nope']}-${pv.nme}": invalid tokens: ["pv.nme" "pvc.annotations['nope']"]"#.to_owned()))]
    #[case::name_without_namespace(&[(PROV_NAME, "creds")], SecretKind::Provisioner, Err("failed to get name and namespace template from params: either name and namespace for Provisioner secrets specified, Both must be specified".to_owned()))]
    #[case::empty_value(&[(PROV_NAME, ""), (PROV_NS, "ns")], SecretKind::Provisioner, Err("failed to get name and namespace template from params: Provisioner secrets specified in parameters but value of either namespace or name is empty".to_owned()))]
    #[case::deprecated_keys(&[("csiProvisionerSecretName", "old"), ("csiProvisionerSecretNamespace", "ns")], SecretKind::Provisioner, ok("ns", "old"))]
    #[case::deprecated_and_prefixed(&[("csiProvisionerSecretName", "old"), (PROV_NAME, "new"), (PROV_NS, "ns")], SecretKind::Provisioner, Err("failed to get name and namespace template from params: Provisioner secrets specified in parameters with both \"csi\" and \"csi.storage.k8s.io/\" keys".to_owned()))]
    #[case::deprecated_name_prefixed_namespace(&[("csiNodeStageSecretName", "old"), ("csi.storage.k8s.io/node-stage-secret-namespace", "ns")], SecretKind::NodeStage, ok("ns", "old"))]
    #[case::expand_kinds_have_no_deprecated_keys(&[("csiControllerExpandSecretName", "old"), ("csiControllerExpandSecretNamespace", "ns")], SecretKind::ControllerExpand, Ok(None))]
    #[case::default_pair(&[("csi.storage.k8s.io/secret-name", "shared"), ("csi.storage.k8s.io/secret-namespace", "ns")], SecretKind::NodePublish, ok("ns", "shared"))]
    #[case::own_pair_beats_default(&[("csi.storage.k8s.io/secret-name", "shared"), ("csi.storage.k8s.io/secret-namespace", "ns"), ("csi.storage.k8s.io/node-expand-secret-name", "own"), ("csi.storage.k8s.io/node-expand-secret-namespace", "ns2")], SecretKind::NodeExpand, ok("ns2", "own"))]
    #[case::broken_default(&[("csi.storage.k8s.io/secret-name", "shared")], SecretKind::ControllerPublish, Err("failed to get default name and namespace template from params: either name and namespace for Default secrets specified, Both must be specified".to_owned()))]
    #[case::other_kinds_pair_is_ignored(&[(PROV_NAME, "creds"), (PROV_NS, "ns")], SecretKind::NodePublish, Ok(None))]
    #[case::bad_namespace(&[(PROV_NAME, "creds"), (PROV_NS, "Kube_System")], SecretKind::Provisioner, Err(r#""Kube_System" is not a valid namespace name"#.to_owned()))]
    #[case::bad_resolved_name(&[(PROV_NAME, "${pvc.annotations['example.com/secret']}.."), (PROV_NS, "ns")], SecretKind::Provisioner, Err(r#""${pvc.annotations['example.com/secret']}.." resolved to "team-a-creds.." which is not a valid secret name"#.to_owned()))]
    fn secret_references(
        #[case] pairs: &[(&str, &str)],
        #[case] kind: SecretKind,
        #[case] want: Result<Option<(String, String)>, String>,
    ) {
        assert_eq!(resolve(pairs, kind), want);
    }

    #[rstest]
    #[case::plain("abc", "abc")]
    #[case::braces("a${x}b", "aXb")]
    #[case::bare("$x-b", "X-b")]
    #[case::trailing_dollar("ab$", "ab$")]
    #[case::dollar_before_punctuation("a$.b", "a$.b")]
    #[case::unterminated_brace_is_eaten("a${x", "ax")]
    #[case::empty_braces_are_eaten("a${}b", "ab")]
    fn expansion_follows_os_expand(#[case] template: &str, #[case] want: &str) {
        let lookup = |t: &str| (t == "x").then(|| "X".to_owned());
        assert_eq!(expand(template, lookup).unwrap(), want);
    }

    #[test]
    fn keys_are_the_documented_ones() {
        assert_eq!(
            SecretKind::ControllerPublish.name_key(),
            "csi.storage.k8s.io/controller-publish-secret-name"
        );
        assert_eq!(
            SecretKind::NodeExpand.namespace_key(),
            "csi.storage.k8s.io/node-expand-secret-namespace"
        );
    }
}
