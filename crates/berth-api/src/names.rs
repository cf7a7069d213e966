//! Name syntax checks with Kubernetes' exact messages (`k8s.io/apimachinery/pkg/util/validation`):
//! RFC 1123 labels and subdomains, qualified names (label keys, annotation keys, finalizers) and
//! label values. Each returns the list of messages; empty means valid.

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const QUALIFIED_NAME_PART_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const QUALIFIED_NAME_MSG: &str = "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";

fn is_lower_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn label_syntax_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && is_lower_alnum(b[0])
        && is_lower_alnum(b[b.len() - 1])
        && b.iter().all(|&c| is_lower_alnum(c) || c == b'-')
}

/// `IsDNS1123Label`: at most 63 characters of `[a-z0-9-]`, alphanumeric at both ends.
pub fn dns1123_label(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > 63 {
        out.push("must be no more than 63 characters".to_owned());
    }
    if !label_syntax_ok(s) {
        out.push(DNS1123_LABEL_MSG.to_owned());
    }
    out
}

/// `IsDNS1123Subdomain`: at most 253 characters, dot-separated RFC 1123 labels.
pub fn dns1123_subdomain(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > 253 {
        out.push("must be no more than 253 characters".to_owned());
    }
    if !s.split('.').all(label_syntax_ok) {
        out.push(DNS1123_SUBDOMAIN_MSG.to_owned());
    }
    out
}

fn qualified_part_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
}

/// `IsQualifiedName`: `[prefix/]name`, prefix a DNS subdomain, name at most 63 characters.
pub fn qualified_name(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let parts: Vec<&str> = s.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                out.push("prefix part must be non-empty".to_owned());
            } else {
                out.extend(
                    dns1123_subdomain(prefix)
                        .into_iter()
                        .map(|m| format!("prefix part {m}")),
                );
            }
            *name
        }
        _ => {
            out.push(QUALIFIED_NAME_MSG.to_owned());
            return out;
        }
    };
    if name.is_empty() {
        out.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        out.push("name part must be no more than 63 characters".to_owned());
    }
    if !name.is_empty() && !qualified_part_ok(name) {
        out.push(QUALIFIED_NAME_PART_MSG.to_owned());
    }
    out
}

/// `IsValidLabelValue`: empty, or at most 63 characters like a qualified name's name part.
pub fn label_value(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > 63 {
        out.push("must be no more than 63 characters".to_owned());
    }
    if !s.is_empty() && !qualified_part_ok(s) {
        out.push(LABEL_VALUE_MSG.to_owned());
    }
    out
}

/// `IsValidPathSegmentName`-style refusal of `.`/`..`, `/` and `%`, which every object name
/// must also pass (names become URL path segments).
pub fn path_segment(s: &str) -> Vec<String> {
    if s == "." || s == ".." {
        return vec![format!("may not be '{s}'")];
    }
    let mut out = Vec::new();
    for bad in ["/", "%"] {
        if s.contains(bad) {
            out.push(format!("may not contain '{bad}'"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    #[rstest]
    #[case("a", true)]
    #[case("my-name", true)]
    #[case("123-abc", true)]
    #[case("-a", false)]
    #[case("a-", false)]
    #[case("A", false)]
    #[case("a.b", false)]
    #[case("", false)]
    fn labels(#[case] s: &str, #[case] ok: bool) {
        assert_eq!(dns1123_label(s).is_empty(), ok, "{s}");
    }

    #[rstest]
    #[case("example.com", true)]
    #[case("a", true)]
    #[case("a..b", false)]
    #[case(".a", false)]
    #[case("pvc-0f1e", true)]
    #[case("Upper", false)]
    fn subdomains(#[case] s: &str, #[case] ok: bool) {
        assert_eq!(dns1123_subdomain(s).is_empty(), ok, "{s}");
    }

    #[test]
    fn subdomain_length() {
        let long = "a".repeat(254);
        assert_eq!(
            dns1123_subdomain(&long),
            vec!["must be no more than 253 characters".to_owned()]
        );
        assert!(dns1123_label(&"a".repeat(64)).contains(&"must be no more than 63 characters".to_owned()));
    }

    #[rstest]
    #[case("app", vec![])]
    #[case("example.com/MyName", vec![])]
    #[case("kubernetes.io/pvc-protection", vec![])]
    #[case("/x", vec!["prefix part must be non-empty"])]
    #[case("a/", vec!["name part must be non-empty"])]
    #[case("a/b/c", vec![QUALIFIED_NAME_MSG])]
    #[case("-x", vec![QUALIFIED_NAME_PART_MSG])]
    #[case("Ex.com/x", vec!["prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"])]
    fn qualified_names(#[case] s: &str, #[case] want: Vec<&str>) {
        assert_eq!(qualified_name(s), want);
    }

    #[rstest]
    #[case("", true)]
    #[case("v1.2_3-x", true)]
    #[case("_x", false)]
    #[case("a b", false)]
    fn label_values(#[case] s: &str, #[case] ok: bool) {
        assert_eq!(label_value(s).is_empty(), ok, "{s}");
    }

    proptest! {
        #[test]
        fn never_panic(s in "\\PC{0,80}") {
            let _ = (dns1123_label(&s), dns1123_subdomain(&s), qualified_name(&s), label_value(&s), path_segment(&s));
        }
    }
}
