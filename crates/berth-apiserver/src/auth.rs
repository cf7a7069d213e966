//! Bearer-token authentication. Two kinds of token exist: admin (every verb) and read-only
//! (get, list, watch; anything else is 403). Only SHA-256 digests of the tokens are kept in
//! memory and on disk, and a presented token is compared to them in constant time. A token is
//! never logged and never part of an error message.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    ReadOnly,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "readonly",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "readonly" => Some(Role::ReadOnly),
            _ => None,
        }
    }
}

/// The accepted tokens, by digest.
#[derive(Clone, Default)]
pub struct Tokens {
    digests: Vec<(Role, [u8; 32])>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("count", &self.digests.len()).finish()
    }
}

/// A malformed token file line.
#[derive(Debug, thiserror::Error)]
#[error("token file line {line}: expected `<admin|readonly> <sha256 hex>`")]
pub struct TokenFileError {
    pub line: usize,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// Accepts `token` with `role`.
    pub fn add(&mut self, role: Role, token: &str) {
        self.digests.push((role, digest(token)));
    }

    /// The role of a presented token. Every digest is compared (no early exit), each in
    /// constant time.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        let presented = digest(token);
        let mut found = None;
        for (role, d) in &self.digests {
            if bool::from(d.ct_eq(&presented)) {
                found = Some(*role);
            }
        }
        found
    }

    /// The token file: one `<role> <sha256 hex>` a line; holds no secret.
    pub fn to_file(&self) -> String {
        self.digests
            .iter()
            .map(|(r, d)| format!("{} {}\n", r.name(), hex::encode(d)))
            .collect()
    }

    pub fn from_file(text: &str) -> Result<Tokens, TokenFileError> {
        let mut digests = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = || TokenFileError { line: i + 1 };
            let (role, hexd) = line.split_once(' ').ok_or_else(err)?;
            let role = Role::parse(role).ok_or_else(err)?;
            let bytes = hex::decode(hexd.trim()).map_err(|_| err())?;
            let d: [u8; 32] = bytes.try_into().map_err(|_| err())?;
            digests.push((role, d));
        }
        Ok(Tokens { digests })
    }
}

/// A new random token: 32 bytes, hex.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b)?;
    Ok(hex::encode(b))
}

/// The token of an `Authorization: Bearer …` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, rest) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let t = rest.trim();
    (!t.is_empty()).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_file_round_trip() {
        let mut t = Tokens::default();
        t.add(Role::Admin, "a");
        t.add(Role::ReadOnly, "r");
        assert_eq!(t.role_of("a"), Some(Role::Admin));
        assert_eq!(t.role_of("r"), Some(Role::ReadOnly));
        assert_eq!(t.role_of("x"), None);
        let file = t.to_file();
        assert!(!file.contains(" a\n"));
        let back = Tokens::from_file(&file).unwrap();
        assert_eq!(back.role_of("a"), Some(Role::Admin));
        assert!(Tokens::from_file("admin zz").is_err());
        assert!(Tokens::from_file("root 00").is_err());
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
