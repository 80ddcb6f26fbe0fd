//! Byte sizes as people write them in a plan: `512MiB`, `2G`, `1.5GiB` is refused, `1000000` is bytes.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes, written in TOML as a string with a unit (`"512MiB"`) or a bare integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

const UNITS: &[(&str, u64)] = &[
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    // Single letters are binary, as in systemd and `df -h`.
    ("T", 1 << 40),
    ("G", 1 << 30),
    ("M", 1 << 20),
    ("K", 1 << 10),
    ("B", 1),
];

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(digits);
        let unit = unit.trim();
        let invalid = || {
            format!(
                "{s:?} is not a size; write a whole number with an optional unit, such as \"512MiB\", \"2GiB\" or \"4096\" (units: B, K/KiB, M/MiB, G/GiB, T/TiB, KB, MB, GB, TB)"
            )
        };
        let number: u64 = number.parse().map_err(|_| invalid())?;
        let factor = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(unit) && name.len() == unit.len())
                .map(|&(_, f)| f)
                .ok_or_else(invalid)?
        };
        number
            .checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large (more than 16 EiB)"))
    }
}

impl fmt::Display for ByteSize {
    /// The shortest exact binary form: `512MiB`, `1GiB`, `1000B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &(unit, factor) in &UNITS[..4] {
            if self.0 >= factor && self.0.is_multiple_of(factor) {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"512MiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("a size cannot be negative ({v})")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A size for people: `0`, `812`, `4.0K`, `1.2M`, `37G`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["", "K", "M", "G", "T", "P"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => bytes.to_string(),
        _ if value < 10.0 => format!("{value:.1}{}", UNITS[unit]),
        _ => format!("{value:.0}{}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        let cases = [
            ("512MiB", 512 << 20),
            ("512M", 512 << 20),
            ("512mib", 512 << 20),
            ("2 GiB", 2 << 30),
            ("1KB", 1000),
            ("4096", 4096),
            ("7B", 7),
            ("1TiB", 1 << 40),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(want)), "{text}");
        }
    }

    #[test]
    fn refuses_nonsense() {
        for text in [
            "",
            "MiB",
            "1.5GiB",
            "-1",
            "12 parsecs",
            "99999999999999999999",
            "16384PiB",
        ] {
            let err = text.parse::<ByteSize>().unwrap_err();
            assert!(err.contains(&format!("{:?}", text.trim())), "{text}: {err}");
        }
        assert!(
            "20000000TiB"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn display_is_exact_and_round_trips() {
        for n in [0, 1, 1000, 1024, 1536, 512 << 20, 3 << 30, u64::MAX] {
            let shown = ByteSize(n).to_string();
            assert_eq!(shown.parse::<ByteSize>(), Ok(ByteSize(n)), "{shown}");
        }
        assert_eq!(ByteSize(512 << 20).to_string(), "512MiB");
        assert_eq!(ByteSize(1536).to_string(), "1536B");
    }

    #[test]
    fn human_sizes() {
        let cases = [
            (0, "0"),
            (812, "812"),
            (4096, "4.0K"),
            (1_258_291, "1.2M"),
            (39_728_447_488, "37G"),
        ];
        for (bytes, want) in cases {
            assert_eq!(human(bytes), want);
        }
    }
}
