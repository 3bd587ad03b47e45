//! Canonical JSON (appendices, "Canonical JSON") on top of ruma's `CanonicalJsonValue`.
//!
//! Federation input must already be strictly canonical-JSON-valid (no floats); this module adds
//! the lenient reading the spec's own examples use, where `-0` and `1e10` stand for integers.

use ruma::{CanonicalJsonValue, Int};
use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CanonicalError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("{0} is not an integer in the canonical JSON range")]
    Number(String),
}

/// Parses JSON text, reading numbers written with a fraction or exponent as integers when their
/// value is an integer in ±(2^53-1) (so `-0` is `0` and `1e10` is `10000000000`).
pub fn parse_lenient(text: &str) -> Result<CanonicalJsonValue, CanonicalError> {
    let value: Value = serde_json::from_str(text).map_err(|e| CanonicalError::NotJson(e.to_string()))?;
    to_canonical_lenient(value)
}

fn to_canonical_lenient(value: Value) -> Result<CanonicalJsonValue, CanonicalError> {
    Ok(match value {
        Value::Null => CanonicalJsonValue::Null,
        Value::Bool(b) => CanonicalJsonValue::Bool(b),
        Value::String(s) => CanonicalJsonValue::String(s),
        Value::Number(n) => CanonicalJsonValue::Integer(integer(&n)?),
        Value::Array(items) => {
            CanonicalJsonValue::Array(items.into_iter().map(to_canonical_lenient).collect::<Result<_, _>>()?)
        }
        Value::Object(map) => CanonicalJsonValue::Object(
            map.into_iter().map(|(k, v)| Ok((k, to_canonical_lenient(v)?))).collect::<Result<_, CanonicalError>>()?,
        ),
    })
}

fn integer(n: &serde_json::Number) -> Result<Int, CanonicalError> {
    let out_of_range = || CanonicalError::Number(n.to_string());
    if let Some(i) = n.as_i64() {
        return Int::try_from(i).map_err(|_| out_of_range());
    }
    let f = n.as_f64().ok_or_else(out_of_range)?;
    if f.fract() != 0.0 || f.abs() > 9_007_199_254_740_991.0 {
        return Err(out_of_range());
    }
    // `as` is exact here: the value is integral and within 2^53.
    Int::try_from(f as i64).map_err(|_| out_of_range())
}

/// The canonical encoding: sorted keys, no insignificant whitespace, raw UTF-8.
pub fn encode(value: &CanonicalJsonValue) -> String {
    serde_json::to_string(value).expect("canonical JSON values always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_that_are_not_integers_are_refused() {
        assert!(parse_lenient(r#"{"a": 1.5}"#).is_err());
        assert!(parse_lenient(r#"{"a": 1e300}"#).is_err());
        assert!(parse_lenient(r#"{"a": 9007199254740992}"#).is_err());
        assert_eq!(encode(&parse_lenient(r#"{"a": -0}"#).unwrap()), r#"{"a":0}"#);
    }

    /// Regression (#11 property tests): serde_json's default float parser read
    /// `9007199254740991.0` as 9007199254740990; the lenient reading must keep the value.
    #[test]
    fn integral_fractions_keep_their_exact_value() {
        assert_eq!(encode(&parse_lenient("9007199254740991.0").unwrap()), "9007199254740991");
        assert_eq!(encode(&parse_lenient("-9007199254740991.0").unwrap()), "-9007199254740991");
        assert_eq!(encode(&parse_lenient("9007199254740990.0").unwrap()), "9007199254740990");
        assert!(parse_lenient("9007199254740993.0").is_err());
    }
}
