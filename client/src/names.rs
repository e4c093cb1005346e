//! Names of categories, nodes, consumers and chunks.
//!
//! Every name that reaches a server's file system is validated here first, so
//! `..`, `/`, NUL bytes, absolute paths and over-long names are rejected before
//! any path is built. The grammar is the one of the HTTP contract:
//!
//! | name     | pattern                               |
//! |----------|---------------------------------------|
//! | category | `^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$` |
//! | node     | `^[A-Za-z0-9_-]{1,64}$`               |
//! | consumer | `^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$` |
//! | chunk    | `<node>-chunk<9 digits>`              |

use std::fmt;
use std::str::FromStr;

/// Longest category or consumer name, in bytes.
pub const MAX_CATEGORY_NAME_BYTES: usize = 128;
/// Longest node name, in bytes.
pub const MAX_NODE_NAME_BYTES: usize = 64;
/// Number of decimal digits of a chunk index in a chunk name.
pub const CHUNK_INDEX_DIGITS: usize = 9;
/// Largest chunk index that fits in a chunk name.
pub const MAX_CHUNK_INDEX: u32 = 999_999_999;
const CHUNK_INFIX: &str = "-chunk";

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name {name:?}: {reason}")]
pub struct NameError {
    /// What kind of name it was ("category", "node", "consumer", "chunk").
    pub kind: &'static str,
    /// The rejected name (escaped when printed).
    pub name: String,
    /// What rule it broke.
    pub reason: &'static str,
}

fn err(kind: &'static str, name: &str, reason: &'static str) -> NameError {
    let mut name = name.to_owned();
    if name.len() > 200 {
        let mut cut = 200;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
        name.push('…');
    }
    NameError { kind, name, reason }
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Checks the category/consumer grammar: a letter, digit or `_` first, then
/// up to 127 letters, digits, `_`, `.` or `-`.
fn validate_dotted(kind: &'static str, name: &str) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    match bytes.first() {
        None => return Err(err(kind, name, "it is empty")),
        Some(&b) if !is_word_byte(b) => {
            return Err(err(
                kind,
                name,
                "it must start with a letter, a digit or '_'",
            ));
        }
        Some(_) => {}
    }
    if bytes.len() > MAX_CATEGORY_NAME_BYTES {
        return Err(err(kind, name, "it is longer than 128 bytes"));
    }
    if !bytes
        .iter()
        .all(|&b| is_word_byte(b) || b == b'.' || b == b'-')
    {
        return Err(err(
            kind,
            name,
            "only letters, digits, '_', '.' and '-' are allowed",
        ));
    }
    Ok(())
}

/// Validates a category name.
pub fn validate_category(name: &str) -> Result<(), NameError> {
    validate_dotted("category", name)
}

/// Validates a consumer name.
pub fn validate_consumer(name: &str) -> Result<(), NameError> {
    validate_dotted("consumer", name)
}

/// Validates a node name: 1 to 64 letters, digits, `_` or `-`.
pub fn validate_node(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(err("node", name, "it is empty"));
    }
    if name.len() > MAX_NODE_NAME_BYTES {
        return Err(err("node", name, "it is longer than 64 bytes"));
    }
    if !name.bytes().all(|b| is_word_byte(b) || b == b'-') {
        return Err(err(
            "node",
            name,
            "only letters, digits, '_' and '-' are allowed",
        ));
    }
    Ok(())
}

/// Turns any string (a host name, say) into a valid node name: invalid bytes
/// become `-`, the result is cut to 64 bytes, and an empty result is `node`.
pub fn sanitize_node(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NODE_NAME_BYTES)
        .collect();
    if out.is_empty() {
        out.push_str("node");
    }
    out
}

/// A parsed chunk name: `<owner>-chunk<9 digits>`.
///
/// Ordering is by owner, then index, which is the order of the chunk list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkName {
    /// The node that owns (and alone appends to) the chunk.
    pub owner: String,
    /// The chunk's position in its owner's sequence.
    pub index: u32,
}

impl ChunkName {
    /// Builds a chunk name; the owner must be a valid node name.
    pub fn new(owner: impl Into<String>, index: u32) -> Self {
        Self {
            owner: owner.into(),
            index,
        }
    }

    /// What every chunk name of `owner` starts with (`owner-chunk`). Chunk
    /// names of a node whose name starts with it do too (`owner-chunkx`):
    /// parse what it prefixes.
    pub fn prefix_of(owner: &str) -> String {
        format!("{owner}{CHUNK_INFIX}")
    }

    /// Parses and validates a chunk name.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let suffix_len = CHUNK_INFIX.len() + CHUNK_INDEX_DIGITS;
        if name.len() <= suffix_len || !name.is_char_boundary(name.len() - suffix_len) {
            return Err(err(
                "chunk",
                name,
                "expected <node>-chunk<9 digits>, e.g. eu1-chunk000000042",
            ));
        }
        let (owner, suffix) = name.split_at(name.len() - suffix_len);
        let digits = suffix.strip_prefix(CHUNK_INFIX).ok_or_else(|| {
            err(
                "chunk",
                name,
                "expected <node>-chunk<9 digits>, e.g. eu1-chunk000000042",
            )
        })?;
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(
                "chunk",
                name,
                "the index after '-chunk' must be 9 decimal digits",
            ));
        }
        validate_node(owner).map_err(|_| {
            err(
                "chunk",
                name,
                "the owner before '-chunk' is not a valid node name",
            )
        })?;
        let index = digits
            .parse()
            .map_err(|_| err("chunk", name, "the index is not a number"))?;
        Ok(Self {
            owner: owner.to_owned(),
            index,
        })
    }
}

impl fmt::Display for ChunkName {
    /// `owner-chunk000000042`. Written without the formatting machinery:
    /// every produce answer names its chunk.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // u32::MAX has 10 digits; at least 9 are written.
        let mut digits = [b'0'; 10];
        let mut at = digits.len();
        let mut n = self.index;
        while n > 0 {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        let digits = &digits[at.min(digits.len() - 9)..];
        // One write when the name fits a buffer on the stack (any valid
        // owner does): `to_string` then allocates once, at its size.
        let mut name = [0u8; MAX_NODE_NAME_BYTES + CHUNK_INFIX.len() + 10];
        let len = self.owner.len() + CHUNK_INFIX.len() + digits.len();
        if len <= name.len() {
            let (owner, rest) = name.split_at_mut(self.owner.len());
            owner.copy_from_slice(self.owner.as_bytes());
            let (infix, rest) = rest.split_at_mut(CHUNK_INFIX.len());
            infix.copy_from_slice(CHUNK_INFIX.as_bytes());
            rest[..digits.len()].copy_from_slice(digits);
            // A str, then ASCII.
            return f.write_str(std::str::from_utf8(&name[..len]).map_err(|_| fmt::Error)?);
        }
        f.write_str(&self.owner)?;
        f.write_str(CHUNK_INFIX)?;
        // Only ASCII digits were written.
        f.write_str(std::str::from_utf8(digits).map_err(|_| fmt::Error)?)
    }
}

impl FromStr for ChunkName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories() {
        for ok in ["app", "nginx.access", "_x", "9", &"a".repeat(128)] {
            assert!(validate_category(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-x",
            "a/b",
            "/abs",
            "a\0b",
            "a b",
            "é",
            &"a".repeat(129),
        ] {
            assert!(validate_category(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nodes() {
        assert!(validate_node("eu-1_a").is_ok());
        for bad in ["", "a.b", "a/b", "..", &"n".repeat(65)] {
            assert!(validate_node(bad).is_err(), "{bad:?}");
        }
        assert_eq!(sanitize_node("web-01.example.com"), "web-01-example-com");
        assert_eq!(sanitize_node(""), "node");
        assert_eq!(sanitize_node(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn chunk_names_round_trip() {
        let c = ChunkName::parse("eu1-chunk000000042").unwrap();
        assert_eq!(c, ChunkName::new("eu1", 42));
        assert_eq!(c.to_string(), "eu1-chunk000000042");
        let dashed = ChunkName::parse("eu-west-1-chunk999999999").unwrap();
        assert_eq!(dashed.owner, "eu-west-1");
        assert_eq!(dashed.index, MAX_CHUNK_INDEX);
        for (index, want) in [
            (0, "n-chunk000000000"),
            (7, "n-chunk000000007"),
            (123_456_789, "n-chunk123456789"),
            (u32::MAX, "n-chunk4294967295"),
        ] {
            let name = ChunkName::new("n", index);
            assert_eq!(name.to_string(), want);
            assert_eq!(name.to_string(), format!("n-chunk{index:09}"));
        }
        // The longest valid owner with the longest index fits the buffer;
        // a longer owner (not a valid name, but a public field) is written
        // in pieces.
        for owner in [
            "o".repeat(MAX_NODE_NAME_BYTES),
            "ö".repeat(MAX_NODE_NAME_BYTES),
        ] {
            let name = ChunkName::new(&owner, u32::MAX);
            assert_eq!(name.to_string(), format!("{owner}-chunk4294967295"));
        }
    }

    #[test]
    fn bad_chunk_names() {
        for bad in [
            "",
            "chunk000000001",
            "-chunk000000001",
            "eu1-chunk00000001",
            "eu1-chunk0000000001",
            "eu1-chunk00000000x",
            "eu1_chunk000000001",
            "../x-chunk000000001",
            "e.u-chunk000000001",
            "é-chunk000000001",
        ] {
            assert!(ChunkName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
