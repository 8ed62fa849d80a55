//! Resource identifiers in the EC2 shape: `vol-` / `snap-` followed by 17 lowercase hex digits.

use std::fmt;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Number of hex digits after the prefix, as in EC2 (`vol-0123456789abcdef0`).
pub const ID_HEX_DIGITS: usize = 17;

/// The id did not have the expected `PREFIX-` + 17 lowercase hex digit shape.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} id {value:?}: expected {prefix}-<17 lowercase hex digits>")]
pub struct InvalidId {
    kind: &'static str,
    prefix: &'static str,
    value: String,
}

fn generate(prefix: &str) -> String {
    let mut rng = rand::thread_rng();
    let digits: String = (0..ID_HEX_DIGITS)
        .map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap_or('0'))
        .collect();
    format!("{prefix}-{digits}")
}

fn validate(kind: &'static str, prefix: &'static str, s: &str) -> Result<(), InvalidId> {
    let ok = s
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| {
            hex.len() == ID_HEX_DIGITS
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(InvalidId {
            kind,
            prefix,
            value: s.chars().take(64).collect(),
        })
    }
}

macro_rules! resource_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A new random id.
            pub fn generate() -> Self {
                Self(generate($prefix))
            }
            /// Parses and validates an id; it is safe to use as a path or key component.
            pub fn parse(s: &str) -> Result<Self, InvalidId> {
                validate($kind, $prefix, s).map(|()| Self(s.to_owned()))
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
            /// The 17 hex digits as a number (at most 68 bits).
            pub fn number(&self) -> u128 {
                let hex = &self.0[self.0.len() - ID_HEX_DIGITS..];
                u128::from_str_radix(hex, 16).unwrap_or(0)
            }
            /// The id whose 17 hex digits are `n` (the inverse of `number`; bits above 68 are
            /// dropped).
            pub fn from_number(n: u128) -> Self {
                let n = n & ((1u128 << (4 * ID_HEX_DIGITS)) - 1);
                Self(format!("{}-{:017x}", $prefix, n))
            }
            /// A 64-bit tag (the low 64 bits of the 68-bit hex number), written into WAL
            /// records and chunk headers to detect files that belong to another resource.
            pub fn tag(&self) -> u64 {
                let hex = &self.0[self.0.len() - 16..];
                u64::from_str_radix(hex, 16).unwrap_or(0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                validate($kind, $prefix, &s).map(|()| Self(s))
            }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                Self::parse(s)
            }
        }
    };
}

resource_id!(
    /// A volume id, `vol-` + 17 lowercase hex digits (EC2 `VolumeId`).
    VolumeId,
    "volume",
    "vol"
);
resource_id!(
    /// A snapshot id, `snap-` + 17 lowercase hex digits (EC2 `SnapshotId`).
    SnapshotId,
    "snapshot",
    "snap"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse() {
        for _ in 0..100 {
            let id = VolumeId::generate();
            assert_eq!(VolumeId::from_number(id.number()), id);
            assert_eq!(VolumeId::parse(id.as_str()).unwrap(), id);
            assert_eq!(id.as_str().len(), 4 + ID_HEX_DIGITS);
        }
        assert!(SnapshotId::generate().as_str().starts_with("snap-"));
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in [
            "",
            "vol-",
            "vol-0123456789abcdef",
            "vol-0123456789abcdef01",
            "vol-0123456789ABCDEF0",
            "vol-../../etc/passw",
            "snap-0123456789abcdef0",
            "vol_0123456789abcdef0",
        ] {
            assert!(VolumeId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn tag_is_low_64_bits() {
        let id = VolumeId::parse("vol-1000000000000002a").unwrap();
        assert_eq!(id.tag(), 0x2a);
    }

    #[test]
    fn serde_validates() {
        let ok: VolumeId = serde_json::from_str("\"vol-0123456789abcdef0\"").unwrap();
        assert_eq!(ok.as_str(), "vol-0123456789abcdef0");
        assert!(serde_json::from_str::<VolumeId>("\"vol-x\"").is_err());
    }
}
