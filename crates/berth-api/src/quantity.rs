//! Kubernetes `resource.Quantity`: parsing (`1Gi`, `500M`, `1e3`, `0.5Gi`, `100m`), exact
//! comparison, and the canonical string Kubernetes prints (`1024Mi` -> `1Gi`, `1000` -> `1k`).
//!
//! Values are held exactly as a signed count of nano-units (10^-9), which is the finest precision
//! Kubernetes keeps: finer fractions round up, as Kubernetes rounds them. Values too large for
//! that representation (beyond about 10^29) are refused rather than silently clamped. Never panics.

use std::cmp::Ordering;
use std::fmt;

/// How the quantity was written; the canonical form keeps the family (binary, decimal, exponent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `Ki`, `Mi`, `Gi`, `Ti`, `Pi`, `Ei`
    BinarySI,
    /// `n`, `u`, `m`, ``, `k`, `M`, `G`, `T`, `P`, `E`
    DecimalSI,
    /// `1e3`, `5E-2`
    DecimalExponent,
}

/// A parsed quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    nanos: i128,
    format: Format,
}

/// Why a quantity string does not parse; the messages are Kubernetes' own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")]
    Format,
    #[error("unable to parse quantity's suffix")]
    Suffix,
    #[error("quantity is too large")]
    TooLarge,
}

const NANO: i128 = 1_000_000_000;

impl Quantity {
    /// Parses a quantity string as `resource.ParseQuantity` does.
    pub fn parse(s: &str) -> Result<Quantity, QuantityError> {
        if s.is_empty() {
            return Err(QuantityError::Format);
        }
        let bytes = s.as_bytes();
        let mut i = 0;
        let mut negative = false;
        if bytes[0] == b'+' || bytes[0] == b'-' {
            negative = bytes[0] == b'-';
            i = 1;
        }
        let num_start = i;
        let mut int_digits = String::new();
        let mut frac_digits = String::new();
        let mut seen_dot = false;
        while i < bytes.len() {
            let c = bytes[i];
            if c.is_ascii_digit() {
                if seen_dot {
                    frac_digits.push(c as char);
                } else {
                    int_digits.push(c as char);
                }
            } else if c == b'.' && !seen_dot {
                seen_dot = true;
            } else {
                break;
            }
            i += 1;
        }
        if i == num_start || (int_digits.is_empty() && frac_digits.is_empty()) {
            return Err(QuantityError::Format);
        }
        let suffix = &s[i..];
        let (format, base10, base2) = match suffix {
            "" => (Format::DecimalSI, 0i32, 0u32),
            "n" => (Format::DecimalSI, -9, 0),
            "u" => (Format::DecimalSI, -6, 0),
            "m" => (Format::DecimalSI, -3, 0),
            "k" => (Format::DecimalSI, 3, 0),
            "M" => (Format::DecimalSI, 6, 0),
            "G" => (Format::DecimalSI, 9, 0),
            "T" => (Format::DecimalSI, 12, 0),
            "P" => (Format::DecimalSI, 15, 0),
            "E" => (Format::DecimalSI, 18, 0),
            "Ki" => (Format::BinarySI, 0, 10),
            "Mi" => (Format::BinarySI, 0, 20),
            "Gi" => (Format::BinarySI, 0, 30),
            "Ti" => (Format::BinarySI, 0, 40),
            "Pi" => (Format::BinarySI, 0, 50),
            "Ei" => (Format::BinarySI, 0, 60),
            _ => {
                let first = suffix.as_bytes()[0];
                if first != b'e' && first != b'E' {
                    return Err(if suffix.bytes().all(|c| b"eEinumkKMGTP+-0123456789".contains(&c)) {
                        QuantityError::Suffix
                    } else {
                        QuantityError::Format
                    });
                }
                let exp = &suffix[1..];
                let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(QuantityError::Suffix);
                }
                let e: i32 = exp.parse().map_err(|_| QuantityError::TooLarge)?;
                (Format::DecimalExponent, e, 0)
            }
        };
        // value = 0.<int><frac> scaled: mantissa digits * 10^(base10 - frac_len) * 2^base2, in nanos.
        let digits: String = format!("{int_digits}{frac_digits}");
        let digits = digits.trim_start_matches('0');
        let frac_len = i32::try_from(frac_digits.len()).map_err(|_| QuantityError::TooLarge)?;
        let exp10 = base10
            .checked_sub(frac_len)
            .and_then(|e| e.checked_add(9))
            .ok_or(QuantityError::TooLarge)?;
        let nanos = scale_digits(digits, exp10, base2)?;
        Ok(Quantity {
            nanos: if negative { -nanos } else { nanos },
            format,
        })
    }

    /// A whole number of units (bytes for storage), as a Quantity with the given format.
    pub fn from_units(units: i64, format: Format) -> Quantity {
        Quantity {
            nanos: i128::from(units) * NANO,
            format,
        }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The exact value in nano-units.
    pub fn nanos(&self) -> i128 {
        self.nanos
    }

    /// The value rounded up to whole units (bytes), as Kubernetes' `Value()` does.
    pub fn value_ceil(&self) -> i128 {
        let q = self.nanos / NANO;
        if self.nanos % NANO > 0 { q + 1 } else { q }
    }

    pub fn is_zero(&self) -> bool {
        self.nanos == 0
    }

    pub fn is_negative(&self) -> bool {
        self.nanos < 0
    }

    /// Kubernetes' canonical string: the shortest exact form in the quantity's own family.
    pub fn canonical(&self) -> String {
        let n = self.nanos;
        if n == 0 {
            return "0".to_owned();
        }
        let sign = if n < 0 { "-" } else { "" };
        let abs = n.unsigned_abs();
        let whole = abs.is_multiple_of(NANO as u128);
        if self.format == Format::BinarySI && whole && abs / (NANO as u128) >= 1024 {
            let mut units = abs / (NANO as u128);
            let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
            let mut idx = 0;
            while idx + 1 < suffixes.len() && units.is_multiple_of(1024) {
                units /= 1024;
                idx += 1;
            }
            return format!("{sign}{units}{}", suffixes[idx]);
        }
        // Decimal: mantissa * 10^exp with exp a multiple of 3, starting from nanos (exp -9).
        let mut mantissa = abs;
        let mut exp: i32 = -9;
        while mantissa.is_multiple_of(1000) && exp < 18 {
            mantissa /= 1000;
            exp += 3;
        }
        if self.format == Format::DecimalExponent {
            return if exp == 0 {
                format!("{sign}{mantissa}")
            } else {
                format!("{sign}{mantissa}e{exp}")
            };
        }
        let suffix = match exp {
            -9 => "n",
            -6 => "u",
            -3 => "m",
            0 => "",
            3 => "k",
            6 => "M",
            9 => "G",
            12 => "T",
            15 => "P",
            _ => "E",
        };
        format!("{sign}{mantissa}{suffix}")
    }
}

/// `digits * 10^exp10 * 2^exp2`, rounded up (away from zero) to an integer, refusing overflow.
fn scale_digits(digits: &str, exp10: i32, exp2: u32) -> Result<i128, QuantityError> {
    if digits.is_empty() {
        return Ok(0);
    }
    let mut kept = digits;
    let mut round_up = false;
    let mut exp10 = exp10;
    if exp10 < 0 {
        // Drop the digits below 10^0; any non-zero dropped digit rounds up.
        let drop = usize::try_from(-exp10).unwrap_or(usize::MAX);
        if drop >= kept.len() {
            return Ok(1);
        }
        let (head, tail) = kept.split_at(kept.len() - drop);
        round_up = tail.bytes().any(|c| c != b'0');
        kept = head;
        exp10 = 0;
    }
    if kept.len() > 38 {
        return Err(QuantityError::TooLarge);
    }
    let mut v: i128 = kept.parse().map_err(|_| QuantityError::TooLarge)?;
    if round_up {
        v = v.checked_add(1).ok_or(QuantityError::TooLarge)?;
    }
    for _ in 0..exp10 {
        v = v.checked_mul(10).ok_or(QuantityError::TooLarge)?;
    }
    for _ in 0..exp2 {
        v = v.checked_mul(2).ok_or(QuantityError::TooLarge)?;
    }
    Ok(v)
}

impl PartialOrd for Quantity {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Quantity {
    /// By value only; the format does not matter (`1Gi` == `1024Mi`, `1G` < `1Gi`).
    fn cmp(&self, other: &Self) -> Ordering {
        self.nanos.cmp(&other.nanos)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

/// Parses a quantity given as JSON (a string, or a number as Kubernetes also accepts).
pub fn from_json(v: &serde_json::Value) -> Result<Quantity, QuantityError> {
    match v {
        serde_json::Value::String(s) => Quantity::parse(s),
        serde_json::Value::Number(n) => Quantity::parse(&n.to_string()),
        _ => Err(QuantityError::Format),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    #[rstest]
    #[case("1Gi", 1 << 30, "1Gi")]
    #[case("1024Mi", 1 << 30, "1Gi")]
    #[case("0.5Gi", 1 << 29, "512Mi")]
    #[case("500M", 500_000_000, "500M")]
    #[case("1e3", 1000, "1e3")]
    #[case("1E3", 1000, "1e3")]
    #[case("1000", 1000, "1k")]
    #[case("1.5", 2, "1500m")]
    #[case("100m", 1, "100m")]
    #[case("+5Ki", 5120, "5Ki")]
    #[case("512", 512, "512")]
    #[case("1023Ki", 1023 * 1024, "1023Ki")]
    #[case("0.1Ki", 103, "102400m")]
    #[case(".5", 1, "500m")]
    #[case("5.", 5, "5")]
    #[case("0", 0, "0")]
    #[case("-1Gi", -(1 << 30), "-1Gi")]
    #[case("1n", 1, "1n")]
    #[case("1e-10", 1, "1e-9")]
    #[case("2E", 2_000_000_000_000_000_000, "2E")]
    fn parses_and_canonicalises(#[case] s: &str, #[case] units: i128, #[case] canon: &str) {
        let q = Quantity::parse(s).unwrap();
        assert_eq!(q.value_ceil(), units, "{s}");
        assert_eq!(q.canonical(), canon, "{s}");
    }

    #[rstest]
    #[case("")]
    #[case("Gi")]
    #[case("1Gb")]
    #[case("1 Gi")]
    #[case("1.2.3")]
    #[case("abc")]
    #[case("1e")]
    #[case("1e+")]
    #[case("--1")]
    #[case("1ki")]
    #[case("1e99999")]
    #[case(" 1Gi")]
    #[case("1Gi ")]
    #[case("99999999999999999999999999999999999999999E")]
    fn refuses(#[case] s: &str) {
        assert!(Quantity::parse(s).is_err(), "{s}");
    }

    #[test]
    fn compares_by_value() {
        let g = Quantity::parse("1G").unwrap();
        let gi = Quantity::parse("1Gi").unwrap();
        assert!(g < gi);
        assert_eq!(Quantity::parse("1024Mi").unwrap().cmp(&gi), Ordering::Equal);
        assert_eq!(Quantity::parse("1e9").unwrap().cmp(&g), Ordering::Equal);
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = Quantity::parse(&s);
        }

        #[test]
        fn grammar_like_strings_never_panic(s in "[+-]?[0-9.]{0,25}([eE][+-]?[0-9]{0,6}|[numkMGTPE]|[KMGTPE]i)?") {
            let _ = Quantity::parse(&s);
        }

        #[test]
        fn canonical_round_trips(n in -1_000_000_000_000i64..1_000_000_000_000i64, suffix in prop::sample::select(vec!["", "m", "k", "M", "Ki", "Mi", "Gi", "e3", "e-3"])) {
            let q = Quantity::parse(&format!("{n}{suffix}")).unwrap();
            let again = Quantity::parse(&q.canonical()).unwrap();
            prop_assert_eq!(q.nanos(), again.nanos());
        }

        #[test]
        fn binary_bytes_match_integer_math(n in 0u32..1_000_000, shift in prop::sample::select(vec![(0u32, ""), (10, "Ki"), (20, "Mi"), (30, "Gi")])) {
            let q = Quantity::parse(&format!("{n}{}", shift.1)).unwrap();
            prop_assert_eq!(q.value_ceil(), i128::from(n) << shift.0);
        }
    }
}
