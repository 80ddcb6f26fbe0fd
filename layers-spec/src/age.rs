//! Ages as people write them in a plan: `30d`, `2w`, `12h`, `90m`, `3600s`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A length of time in seconds, written in TOML as a whole number with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Age(pub u64);

const UNITS: &[(&str, u64)] = &[
    ("w", 7 * 86_400),
    ("d", 86_400),
    ("h", 3_600),
    ("m", 60),
    ("s", 1),
];

impl FromStr for Age {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let invalid = || {
            format!(
                "{s:?} is not an age; write a whole number and a unit, such as \"30d\", \"2w\" or \"12h\" (units: s, m, h, d, w)"
            )
        };
        let digits = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
        let (number, unit) = s.split_at(digits);
        let number: u64 = number.parse().map_err(|_| invalid())?;
        let factor = UNITS
            .iter()
            .find(|(name, _)| *name == unit.trim())
            .map(|&(_, f)| f)
            .ok_or_else(invalid)?;
        number
            .checked_mul(factor)
            .map(Age)
            .ok_or_else(|| format!("{s:?} is too long"))
    }
}

impl fmt::Display for Age {
    /// The largest exact unit: `30d`, `2w`, `90m`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &(unit, factor) in UNITS {
            if self.0 >= factor && self.0.is_multiple_of(factor) {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}s", self.0)
    }
}

impl Serialize for Age {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Age {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_and_print_back() {
        for (text, seconds, shown) in [
            ("30d", 30 * 86_400, "30d"),
            ("2w", 14 * 86_400, "2w"),
            ("14d", 14 * 86_400, "2w"),
            ("90m", 5_400, "90m"),
            ("0s", 0, "0s"),
        ] {
            let age: Age = text.parse().unwrap();
            assert_eq!(age, Age(seconds), "{text}");
            assert_eq!(age.to_string(), shown, "{text}");
        }
        for bad in ["30", "d", "1.5d", "30 days", "-1d", ""] {
            let e = bad.parse::<Age>().unwrap_err();
            assert!(e.contains("is not an age"), "{bad}: {e}");
        }
    }
}
