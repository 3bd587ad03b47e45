//! Canonical JSON (appendices, "Canonical JSON") on top of ruma's `CanonicalJsonValue`.
//!
//! Federation input must already be strictly canonical-JSON-valid (no floats); this module adds
//! the lenient reading the spec's own examples use, where `-0` and `1e10` stand for integers.

use std::borrow::Cow;

use ruma::{CanonicalJsonValue, Int};
use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CanonicalError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("{0} is not an integer in the canonical JSON range")]
    Number(String),
    /// JSON that canonical JSON does not allow (a float, an integer out of range); the callers
    /// say what was not canonical.
    #[error("{0}")]
    NotCanonical(String),
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

/// The canonical text of a JSON document read strictly (integers in ±(2^53-1) only): `bytes`
/// themselves when they are canonical already, else parsed and encoded.
pub fn canonical_text(bytes: &[u8]) -> Result<Cow<'_, str>, CanonicalError> {
    if let Some(text) = already_canonical(bytes) {
        return Ok(Cow::Borrowed(text));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| CanonicalError::NotJson(e.to_string()))?;
    encode_value(value).map(Cow::Owned)
}

/// The canonical text of a JSON value read strictly (integers in ±(2^53-1) only).
pub fn encode_value(value: Value) -> Result<String, CanonicalError> {
    let canonical = CanonicalJsonValue::try_from(value).map_err(|e| CanonicalError::NotCanonical(e.to_string()))?;
    Ok(encode(&canonical))
}

/// `bytes` as text when they already are the canonical encoding of the JSON they hold, that is
/// when `encode(parse(bytes)) == bytes` (strict parsing: integers in ±(2^53-1) only); `None` when
/// they are not, or when this scan is unsure (an escaped object key, deep nesting), so that the
/// caller falls back to parsing and re-encoding.
///
/// Why: a request is authenticated over the canonical text of its body, and every homeserver
/// (peekgate and Synapse alike) sends bodies that are canonical already. One allocation-free scan
/// then stands in for parsing into a map, sorting and serialising again, which is most of the cost
/// of checking a large `/send`.
pub fn already_canonical(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut scan = CanonicalScan { bytes, at: 0 };
    scan.value(0)?;
    (scan.at == bytes.len()).then_some(text)
}

/// Nesting deeper than this is left to the full parser (serde_json refuses over 128 levels).
const SCAN_MAX_DEPTH: usize = 64;

/// The largest integer canonical JSON allows, 2^53-1; it has 16 digits.
const MAX_SAFE_INTEGER: u64 = 9_007_199_254_740_991;

/// A cursor over text that must be canonical JSON: every method returns `None` as soon as the
/// text is not (or might not be) in its canonical form.
struct CanonicalScan<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> CanonicalScan<'a> {
    fn next_byte(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// Steps over `byte` if it comes next.
    fn eat(&mut self, byte: u8) -> bool {
        let next = self.next_byte() == Some(byte);
        self.at += usize::from(next);
        next
    }

    fn value(&mut self, depth: usize) -> Option<()> {
        match self.next_byte()? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => self.string().map(|_| ()),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.integer(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.bytes[self.at..].starts_with(word).then(|| self.at += word.len())
    }

    /// Keys without escapes, in strictly increasing order (so no duplicates): the byte order of
    /// UTF-8 is the code point order canonical JSON sorts by.
    fn object(&mut self, depth: usize) -> Option<()> {
        let mut previous: Option<&'a [u8]> = None;
        self.items(depth, b'}', |scan| {
            let (key, escaped) = scan.string()?;
            if escaped || previous.is_some_and(|previous| previous >= key) || !scan.eat(b':') {
                return None;
            }
            previous = Some(key);
            scan.value(depth)
        })
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        self.items(depth, b']', |scan| scan.value(depth))
    }

    /// An object's or array's items, each read by `item`, separated by `,` up to `close`.
    fn items(&mut self, depth: usize, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        if depth > SCAN_MAX_DEPTH {
            return None;
        }
        self.at += 1;
        if self.eat(close) {
            return Some(());
        }
        loop {
            item(self)?;
            if self.eat(close) {
                return Some(());
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    /// A string written as the canonical encoder writes it: raw UTF-8 except `"`, `\` and the
    /// control characters, which take the shortest escape (`\n`, or `\u001f` in lower case).
    /// Returns the raw text between the quotes and whether it holds an escape.
    fn string(&mut self) -> Option<(&'a [u8], bool)> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.at;
        let mut escaped = false;
        loop {
            self.skip_plain_bytes();
            match self.next_byte()? {
                b'"' => {
                    self.at += 1;
                    return Some((&self.bytes[start..self.at - 1], escaped));
                }
                b'\\' => {
                    escaped = true;
                    self.escape()?;
                }
                0x00..=0x1f => return None,
                _ => self.at += 1,
            }
        }
    }

    /// Steps over the bytes a string holds as they are, eight at a time, up to the next `"`,
    /// `\` or control character (or the last few bytes): most of a `/send` is string contents.
    fn skip_plain_bytes(&mut self) {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
        // The high bit of each byte below `n`, exact for the lowest such byte; a byte above it
        // may be marked too, which does not matter, since only the lowest is used.
        let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH_BITS;
        let equal = |x: u64, b: u8| below(x ^ (ONES * u64::from(b)), 1);
        while let Some(chunk) = self.bytes.get(self.at..self.at + 8) {
            let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
            let special = below(x, 0x20) | equal(x, b'"') | equal(x, b'\\');
            if special != 0 {
                self.at += special.trailing_zeros() as usize / 8;
                return;
            }
            self.at += 8;
        }
    }

    fn escape(&mut self) -> Option<()> {
        let escape = self.bytes.get(self.at + 1..)?;
        let length = match escape.first()? {
            b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't' => 2,
            b'u' => {
                let hex = std::str::from_utf8(escape.get(1..5)?).ok()?;
                let lower_hex = hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                let code = u32::from_str_radix(hex, 16).ok().filter(|_| lower_hex)?;
                // Only the control characters without a short form are written as `\u00xx`.
                if code >= 0x20 || matches!(code, 0x08 | 0x09 | 0x0a | 0x0c | 0x0d) {
                    return None;
                }
                6
            }
            _ => return None,
        };
        self.at += length;
        Some(())
    }

    /// An integer without sign on zero or leading zeros, within ±(2^53-1). A fraction or exponent
    /// after it is refused by the caller, which expects `,`, `]`, `}` or the end there.
    fn integer(&mut self) -> Option<()> {
        let negative = self.eat(b'-');
        let start = self.at;
        while self.next_byte().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        let digits = &self.bytes[start..self.at];
        let leading_zero = digits.len() > 1 && digits[0] == b'0';
        let negative_zero = negative && digits == b"0";
        if digits.is_empty() || digits.len() > 16 || leading_zero || negative_zero {
            return None;
        }
        let value = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        (value <= MAX_SAFE_INTEGER).then_some(())
    }
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

    /// Each byte value at each place of a step, within plain bytes: the string scan stops at
    /// exactly `"`, `\\` and the control characters, whichever step (8 or 1) reads it.
    #[test]
    fn the_string_scan_stops_at_exactly_the_special_bytes() {
        for length in [1, 7, 8, 9, 16, 17, 24, 31, 32, 40] {
            for at in 0..length {
                for byte in 0..=255u8 {
                    let mut text = vec![b'a'; length];
                    text[at] = byte;
                    let mut scan = CanonicalScan { bytes: &text, at: 0 };
                    scan.skip_plain_bytes();
                    let special = byte < 0x20 || byte == b'"' || byte == b'\\';
                    // The steps leave the last few bytes to `string`, one at a time.
                    let stop = if special { at } else { length };
                    assert!(scan.at <= stop, "length {length}, byte {byte:#x} at {at}: stopped at {}", scan.at);
                    assert!(stop - scan.at < 8, "length {length}, byte {byte:#x} at {at}: stopped at {}", scan.at);
                    if special && at + 8 <= length {
                        assert_eq!(scan.at, at, "length {length}, byte {byte:#x}");
                    }
                }
            }
        }
    }

    #[test]
    fn canonical_text_is_taken_as_it_is() {
        for text in [
            "{}",
            "[]",
            r#"{"":0,"a":[true,false,null,-9007199254740991,9007199254740991],"b":{"c":"d"}}"#,
            "{\"a\":\"quote \\\" backslash \\\\ newline \\n tab \\t us \\u001f nul \\u0000 del \u{7f} / é 日本\"}",
            r#"{"a":1,"aa":2,"b":3,"é":4,"日":5}"#,
        ] {
            assert_eq!(already_canonical(text.as_bytes()), Some(text), "{text}");
            assert!(matches!(canonical_text(text.as_bytes()), Ok(Cow::Borrowed(t)) if t == text));
            assert_eq!(encode(&parse_lenient(text).unwrap()), text);
        }
    }

    #[test]
    fn anything_else_is_parsed_and_encoded() {
        for (text, canonical) in [
            (r#"{ "a": 1 }"#, r#"{"a":1}"#),
            (r#"{"b":1,"a":2}"#, r#"{"a":2,"b":1}"#),
            (r#"{"a":1,"a":2}"#, r#"{"a":2}"#),
            (r#"{"a":"\/"}"#, r#"{"a":"/"}"#),
            (r#"{"a":"\u0041"}"#, r#"{"a":"A"}"#),
            (r#"{"a":"\u001F"}"#, r#"{"a":"\u001f"}"#),
            (r#"{"a":"\u000a"}"#, r#"{"a":"\n"}"#),
            (r#"{"\u0061":1}"#, r#"{"a":1}"#),
            (r#"{"a":1} "#, r#"{"a":1}"#),
        ] {
            assert_eq!(already_canonical(text.as_bytes()), None, "{text}");
            assert_eq!(canonical_text(text.as_bytes()).unwrap(), canonical, "{text}");
        }
        for refused in
            [r#"{"a":1.0}"#, r#"{"a":-0}"#, r#"{"a":01}"#, r#"{"a":9007199254740992}"#, "{\"a\":\"\u{1}\"}", "{"]
        {
            assert_eq!(already_canonical(refused.as_bytes()), None, "{refused}");
            assert!(canonical_text(refused.as_bytes()).is_err(), "{refused}");
        }
        assert_eq!(already_canonical(b"\"\xff\""), None);
        let deep = format!("{}{}", "[".repeat(SCAN_MAX_DEPTH + 1), "]".repeat(SCAN_MAX_DEPTH + 1));
        assert_eq!(already_canonical(deep.as_bytes()), None);
        assert_eq!(canonical_text(deep.as_bytes()).unwrap(), deep);
    }
}
