//! Volume ids and names: the only strings from a client that could ever reach a path.
//!
//! Berth makes its own volume ids (32 lowercase hex digits) and only ever builds paths from ids
//! it made and found in its journal. Client-supplied ids and names are still checked here, so a
//! hostile string (`../`, `/abs`, NUL, 300 bytes) is refused with a clear message before any
//! lookup, while a harmless unknown id (`reallyfakevolumeid`) is simply "not found".

use std::fmt;

/// CSI caps every string field at 128 bytes.
pub const MAX_LEN: usize = 128;

/// Why an id or name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("is {0} bytes; at most 128 are allowed")]
    TooLong(usize),
    #[error("must not contain NUL or control characters")]
    Control,
    #[error("must not contain '/' (it is not a path)")]
    Slash,
    #[error("must not be '.' or '..' or contain '..'")]
    Dots,
    #[error("may only contain letters, digits, '.', '_' and '-'")]
    Charset,
}

/// A volume id made by Berth: 32 lowercase hex digits. Safe to use as a path component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeId(String);

impl VolumeId {
    /// A fresh random id.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        Ok(VolumeId(hex::encode(bytes)))
    }

    /// Parses an id Berth made; `None` for anything else (which then cannot exist).
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then(|| VolumeId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VolumeId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        VolumeId::parse(&s).ok_or_else(|| format!("{s:?} is not a Berth volume id"))
    }
}

impl From<VolumeId> for String {
    fn from(id: VolumeId) -> String {
        id.0
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeId({})", self.0)
    }
}

/// Checks an id supplied by a client (volume_id, snapshot_id, a list token).
///
/// Accepts what could be an id of any driver ([A-Za-z0-9._-], no "..", ≤128 bytes), so an
/// unknown but harmless id is answered with NOT_FOUND rather than INVALID_ARGUMENT.
pub fn check_client_id(s: &str) -> Result<(), IdError> {
    check_common(s)?;
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(IdError::Charset);
    }
    Ok(())
}

/// Checks a volume name supplied by a client (CreateVolume.name).
///
/// Names are never used as paths, but a name that looks like a path is refused anyway: it is
/// always a mistake or an attack, and refusing it keeps logs and other consumers safe.
pub fn check_name(s: &str) -> Result<(), IdError> {
    check_common(s)?;
    if s.contains('/') {
        return Err(IdError::Slash);
    }
    Ok(())
}

fn check_common(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_LEN {
        return Err(IdError::TooLong(s.len()));
    }
    if s.chars().any(char::is_control) {
        return Err(IdError::Control);
    }
    if s.contains('/') {
        return Err(IdError::Slash);
    }
    if s == "." || s.contains("..") {
        return Err(IdError::Dots);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("reallyfakevolumeid", Ok(()))]
    #[case("pvc-2f4c6a0e-1d7b-4b8e-9a51-0f2a7a1e9c11", Ok(()))]
    #[case("", Err(IdError::Empty))]
    #[case("../etc", Err(IdError::Slash))]
    #[case("..", Err(IdError::Dots))]
    #[case("a..b", Err(IdError::Dots))]
    #[case("/abs/path", Err(IdError::Slash))]
    #[case("nul\0byte", Err(IdError::Control))]
    #[case("sp ace", Err(IdError::Charset))]
    fn client_ids(#[case] id: &str, #[case] want: Result<(), IdError>) {
        assert_eq!(check_client_id(id), want);
    }

    #[test]
    fn over_long_strings_are_refused() {
        assert_eq!(check_client_id(&"a".repeat(129)), Err(IdError::TooLong(129)));
        assert_eq!(check_client_id(&"a".repeat(128)), Ok(()));
        assert_eq!(check_name(&"n".repeat(300)), Err(IdError::TooLong(300)));
    }

    #[rstest]
    #[case("sanity-controller-create-single-size-1a2b", Ok(()))]
    #[case("My Volume (test)", Ok(()))]
    #[case("../../x", Err(IdError::Slash))]
    #[case("/abs", Err(IdError::Slash))]
    #[case("x\0y", Err(IdError::Control))]
    #[case("..", Err(IdError::Dots))]
    fn names(#[case] name: &str, #[case] want: Result<(), IdError>) {
        assert_eq!(check_name(name), want);
    }

    #[test]
    fn generated_ids_parse_back_and_are_path_safe() {
        let id = VolumeId::generate().unwrap();
        assert_eq!(VolumeId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(check_client_id(id.as_str()), Ok(()));
        assert_eq!(VolumeId::parse("invalid-token"), None);
        assert_eq!(VolumeId::parse(&"A".repeat(32)), None);
    }
}
