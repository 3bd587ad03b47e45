//! #11 property tests (proptest, stable Rust): the X-Matrix parser and verifier, canonical JSON,
//! the PDU intake, and the `/send` and `/peek` bodies through the real HTTP edge. Zero panics:
//! proptest turns a panic in a case into a failure (and shrinks it), and the HTTP properties
//! fail on any 5xx or dropped connection.
//!
//! Case counts: the pure properties run [`PURE_CASES`] cases, those that sign or verify with
//! ed25519 in every case (slow in a debug build) [`SIGNING_CASES`], the HTTP ones
//! [`HTTP_CASES`]. `PEEKGATE_PROPTEST_CASES=N` sets every property to N cases except the HTTP
//! ones, which get N / 20 (at least the default); `PEEKGATE_PROPTEST_HTTP_CASES` sets those
//! directly. The longer run (README):
//! `PEEKGATE_PROPTEST_CASES=100000 cargo test --release --test properties`.

mod support;

use std::fmt::Debug;
use std::future::Future;
use std::task::{Context, Poll, Waker};

use peekgate::canonical_json::{already_canonical, encode, parse_lenient};
use peekgate::events::intake::{self, Hashes, IntakeError};
use peekgate::events::{EventError, RoomVersion};
use peekgate::keys::SigningKey;
use peekgate::xmatrix::{self, AuthFailure, Inbound, RequestKeys};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestCaseError, TestRunner};
use reqwest::Method;
use ruma::api::federation::authentication::XMatrix;
use ruma::{CanonicalJsonValue, RoomId, ServerName};
use serde_json::{json, Value};
use support::client::{enc, Client};
use support::peer::{signing_bytes, KeyMode, TestPeer};
use support::{verify, DbKind, ServerSpec, TestServer};

/// Cases per pure property (parsers and encoders: cheap).
const PURE_CASES: u32 = 3000;
/// Cases per property that signs or verifies with ed25519 in every case (the X-Matrix signer
/// and verifier, the intake).
const SIGNING_CASES: u32 = 1000;
/// Cases per HTTP property (each case is a signed request to a running gateway).
const HTTP_CASES: u32 = 300;

/// The largest integer canonical JSON allows (2^53 - 1).
const MAX_SAFE: i64 = 9_007_199_254_740_991;

fn env_cases(name: &str) -> Option<u32> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn config(default: u32) -> ProptestConfig {
    // No regression files written into the tree: a failure prints its shrunk input, and a
    // case worth keeping becomes an explicit test below.
    ProptestConfig {
        cases: env_cases("PEEKGATE_PROPTEST_CASES").unwrap_or(default),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn http_config() -> ProptestConfig {
    let scaled = env_cases("PEEKGATE_PROPTEST_CASES").map(|n| (n / 20).max(HTTP_CASES));
    let cases = env_cases("PEEKGATE_PROPTEST_HTTP_CASES").or(scaled).unwrap_or(HTTP_CASES);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Runs `test` over `strategy` with `config`; a failing case (or a panic in one) fails the test
/// with proptest's shrunk input.
fn check<S: Strategy>(
    name: &str,
    config: ProptestConfig,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: Debug,
{
    let mut config = config;
    // A seed of our own unless PROPTEST_RNG_SEED fixes one, so that a failure says how to replay it.
    let seed = match config.rng_seed {
        RngSeed::Fixed(seed) => seed,
        RngSeed::Random => rand::random(),
    };
    config.rng_seed = RngSeed::Fixed(seed);
    let mut runner = TestRunner::new(config);
    if let Err(failure) = runner.run(&strategy, test) {
        panic!("property {name} failed (replay with PROPTEST_RNG_SEED={seed}): {failure}");
    }
}

/// Polls a future that never waits (the verifier with an in-memory key store) to completion.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the in-memory key store never waits"),
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies

fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z_.]{0,8}",
        2 => any::<String>(),
        2 => "\\PC{0,12}",
        1 => "[\\x00-\\x1f\"\\\\/\u{7f}\u{2028}\u{fffd}]{0,6}",
        1 => "[@!$#][a-z]{1,6}:[a-z.]{1,8}",
    ]
}

/// Integers around the edges of the canonical range (±(2^53 - 1)) and of i64.
fn edge_integer() -> impl Strategy<Value = i64> {
    prop_oneof![
        (any::<bool>(), 0i64..4).prop_map(|(negative, d)| {
            let v = MAX_SAFE - 1 + d;
            if negative {
                -v
            } else {
                v
            }
        }),
        Just(i64::MAX),
        Just(i64::MIN),
        Just(0),
        -1000i64..1000,
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        edge_integer().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        json_string().prop_map(Value::String),
    ]
}

/// Arbitrary JSON: nested objects and arrays, unicode, integers in and out of the canonical
/// range, floats.
fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(json_string(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON that is canonical-JSON-valid: no floats, integers within ±(2^53 - 1).
fn canonical_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-MAX_SAFE..=MAX_SAFE).prop_map(Value::from),
        json_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(json_string(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn canonical_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(json_string(), canonical_value(), 0..5)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// Whether every number in `value` is an integer canonical JSON allows (the oracle).
fn numbers_canonical(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.as_i64().is_some_and(|i| (-MAX_SAFE..=MAX_SAFE).contains(&i)),
        Value::Array(items) => items.iter().all(numbers_canonical),
        Value::Object(map) => map.values().all(numbers_canonical),
        _ => true,
    }
}

/// Server names as the grammar allows them: DNS names, IPv4 and IPv6 literals, with ports.
fn server_name() -> impl Strategy<Value = String> {
    let host = prop_oneof![
        4 => "[a-z][a-z0-9-]{0,8}(\\.[a-z][a-z0-9-]{0,8}){0,2}",
        1 => (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        1 => any::<[u16; 8]>().prop_map(|s| format!("[{}]", std::net::Ipv6Addr::from(s))),
    ];
    (host, prop::option::of(1u16..=65535)).prop_map(|(host, port)| match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

// ---------------------------------------------------------------------------------------------
// X-Matrix

/// One origin's one key, in memory: what `keys::RemoteKeys` answers once it has fetched it.
struct OneKey {
    origin: String,
    key_id: String,
    public: [u8; 32],
}

#[async_trait::async_trait]
impl RequestKeys for OneKey {
    async fn request_key(&self, server: &ServerName, key_id: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
        if server.as_str() == self.origin && key_id == self.key_id {
            ed25519_dalek::VerifyingKey::from_bytes(&self.public).map_err(|e| e.to_string())
        } else {
            Err(format!("no key {key_id} of {server}"))
        }
    }
}

/// A request an origin signs for a destination.
#[derive(Debug, Clone)]
struct SignedCase {
    origin: String,
    destination: String,
    key_version: String,
    seed: [u8; 32],
    method: &'static str,
    uri: String,
    body: Option<Value>,
}

impl SignedCase {
    fn key(&self) -> SigningKey {
        SigningKey::from_seed(&self.key_version, self.seed)
    }

    fn canonical_body(&self) -> Option<String> {
        self.body.as_ref().map(|b| encode(&CanonicalJsonValue::try_from(b.clone()).expect("canonical by construction")))
    }

    fn header(&self, key: &SigningKey) -> String {
        xmatrix::authorization_header(
            key,
            &self.origin,
            &self.destination,
            self.method,
            &self.uri,
            self.canonical_body().as_deref(),
        )
    }

    fn keys(&self, key: &SigningKey) -> OneKey {
        OneKey { origin: self.origin.clone(), key_id: key.key_id(), public: key.public_key() }
    }

    /// Verifies `header` as the destination would, for this request.
    fn verify(&self, keys: &OneKey, header: &str) -> Result<String, xmatrix::HeaderFailure> {
        let body = self.canonical_body();
        let request = Inbound { method: self.method, uri: &self.uri, canonical_content: body.as_deref() };
        ready(xmatrix::verify(keys, &self.destination, &[header], &request)).map(|o| o.to_string())
    }
}

fn signed_case() -> impl Strategy<Value = SignedCase> {
    (
        server_name(),
        server_name(),
        "[a-zA-Z0-9_]{1,8}",
        any::<[u8; 32]>(),
        prop::sample::select(vec!["GET", "PUT", "POST", "DELETE"]),
        "(/[a-zA-Z0-9%!:$_.~=-]{0,12}){1,4}(\\?[a-z]{1,4}=[a-zA-Z0-9%]{0,6}(&[a-z]{1,4}=[a-z0-9]{0,4}){0,2})?",
        prop::option::of(canonical_object()),
    )
        .prop_map(|(origin, destination, key_version, seed, method, path, body)| SignedCase {
            origin,
            destination,
            key_version,
            seed,
            method,
            uri: format!("/_matrix/federation/v1{path}"),
            body,
        })
}

/// One edit of a string: replace, insert or delete the character at a position.
#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, char),
    Insert(usize, char),
    Delete(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let c = prop_oneof![
        6 => prop::char::range(' ', '~'),
        1 => Just('\\'),
        1 => Just('"'),
        1 => any::<char>(),
    ];
    prop_oneof![
        (any::<usize>(), c.clone()).prop_map(|(i, c)| Edit::Replace(i, c)),
        (any::<usize>(), c).prop_map(|(i, c)| Edit::Insert(i, c)),
        any::<usize>().prop_map(Edit::Delete),
    ]
}

fn apply_edit(text: &str, edit: &Edit) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    match *edit {
        Edit::Replace(i, c) if !chars.is_empty() => {
            let i = i % chars.len();
            chars[i] = c;
        }
        Edit::Insert(i, c) => chars.insert(i % (chars.len() + 1), c),
        Edit::Delete(i) if !chars.is_empty() => {
            chars.remove(i % chars.len());
        }
        _ => {}
    }
    chars.into_iter().collect()
}

/// Header-like text: a scheme and name=value parameters, quoted or bare, with escapes,
/// duplicates, odd spacing and unknown names.
fn header_like() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![Just("X-Matrix"), Just("x-matrix"), Just("X-MATRIX"), Just("Bearer"), Just("")];
    let name = prop_oneof![
        prop::sample::select(vec!["origin", "destination", "key", "sig", "signature", "Origin", "KEY", "SIG"])
            .prop_map(str::to_owned),
        "[a-zA-Z]{0,6}",
    ];
    let value = prop_oneof![
        prop::sample::select(vec![
            "a.test",
            "b.test:8448",
            "[::1]:80",
            "ed25519:k1",
            "ed25519:",
            "curve25519:x",
            "AAAA",
            "c2lnbmF0dXJl",
        ])
        .prop_map(str::to_owned),
        "[ -~]{0,12}",
        "\\PC{0,6}",
    ];
    let param = (name, value, 0u8..3, "[ \t]{0,2}");
    (scheme, "[ \t]{0,2}", prop::collection::vec(param, 0..7)).prop_map(|(scheme, gap, params)| {
        let params: Vec<String> = params
            .into_iter()
            .map(|(name, value, quoting, space)| match quoting {
                0 => format!("{space}{name}={value}"),
                1 => format!("{space}{name}=\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\"")),
                _ => format!("{space}{name}=\"{value}\""),
            })
            .collect();
        format!("{scheme}{gap}{}", params.join(","))
    })
}

/// Whether `header` parses to what `original` says: same origin, key and signature bytes, and
/// the same destination or none (a missing destination means "us").
fn says_the_same(header: &str, original: &XMatrix) -> bool {
    match XMatrix::parse(header) {
        Ok(x) => {
            x.origin == original.origin
                && x.key == original.key
                && x.sig.as_bytes() == original.sig.as_bytes()
                && (x.destination.is_none() || x.destination == original.destination)
        }
        Err(_) => false,
    }
}

/// #11 property tests: arbitrary strings never panic the parser or the verifier, and are refused.
#[test]
fn xmatrix_arbitrary_headers_are_refused_without_panic() {
    let strategy = (prop_oneof![any::<String>(), header_like()], signed_case());
    check("xmatrix_arbitrary_headers", config(PURE_CASES), strategy, |(header, case)| {
        let _ = XMatrix::parse(&header);
        prop_assert!(
            case.verify(&case.keys(&case.key()), &header).is_err(),
            "an unsigned header was accepted: {header:?}"
        );
        Ok(())
    });
}

/// #11 property tests: a header made by the signer parses back to its origin, destination, key
/// and signature, the signature covers the spec's request object (checked with ed25519-dalek,
/// not peekgate's code), and the verifier accepts it (H17: only the origin's current key).
#[test]
fn xmatrix_signed_headers_round_trip() {
    check("xmatrix_round_trip", config(SIGNING_CASES), signed_case(), |case| {
        let key = case.key();
        let header = case.header(&key);
        let parsed = XMatrix::parse(&header).map_err(|e| TestCaseError::fail(format!("{header}: {e}")))?;
        prop_assert_eq!(parsed.origin.as_str(), case.origin.as_str());
        prop_assert_eq!(parsed.destination.as_ref().map(|d| d.as_str()), Some(case.destination.as_str()));
        prop_assert_eq!(parsed.key.as_str(), key.key_id());

        let mut object = json!({
            "method": case.method, "uri": case.uri, "origin": case.origin, "destination": case.destination,
        });
        if let Some(body) = &case.body {
            object["content"] = body.clone();
        }
        let public = ed25519_dalek::VerifyingKey::from_bytes(&key.public_key()).unwrap();
        let sig = ed25519_dalek::Signature::from_slice(parsed.sig.as_bytes()).unwrap();
        prop_assert!(public.verify_strict(&signing_bytes(&object), &sig).is_ok(), "signature over another object");

        match case.verify(&case.keys(&key), &header) {
            Ok(origin) => {
                prop_assert_ne!(&case.origin, &case.destination);
                prop_assert_eq!(origin, case.origin.clone());
            }
            Err((failure, _, _)) => {
                // A server does not accept requests claiming to come from itself.
                prop_assert_eq!(failure, AuthFailure::OwnOrigin);
                prop_assert_eq!(&case.origin, &case.destination);
            }
        }
        Ok(())
    });
}

/// #11 property tests: a signed header with one character replaced, inserted or deleted is
/// refused unless it still names the same origin, destination, key and signature bytes (e.g. a
/// parameter name's case, or a space after a comma).
#[test]
fn xmatrix_mutated_headers_are_refused() {
    let strategy = (signed_case(), edit()).prop_filter("origin is not us", |(c, _)| c.origin != c.destination);
    check("xmatrix_mutated_headers", config(SIGNING_CASES), strategy, |(case, edit)| {
        let key = case.key();
        let header = case.header(&key);
        let original = XMatrix::parse(&header).unwrap();
        let mutated = apply_edit(&header, &edit);
        let result = case.verify(&case.keys(&key), &mutated);
        if says_the_same(&mutated, &original) {
            prop_assert_eq!(result.map_err(|f| f.0), Ok(case.origin.clone()), "{}", mutated);
        } else {
            prop_assert!(result.is_err(), "mutated header accepted: {mutated}");
        }
        Ok(())
    });
}

/// #11 property tests: the signature covers the method, the URI and the body: a valid header on
/// a request that differs in any of them is a bad signature.
#[test]
fn xmatrix_headers_do_not_cover_other_requests() {
    let strategy = (signed_case(), 0u8..3, edit(), prop::option::of(canonical_object()))
        .prop_filter("origin is not us", |(c, ..)| c.origin != c.destination);
    check("xmatrix_other_requests", config(SIGNING_CASES), strategy, |(case, what, edit, body)| {
        let key = case.key();
        let header = case.header(&key);
        let mut other = case.clone();
        match what {
            0 => other.method = if case.method == "PUT" { "POST" } else { "PUT" },
            1 => other.uri = apply_edit(&case.uri, &edit),
            _ => other.body = body,
        }
        let changed =
            other.method != case.method || other.uri != case.uri || other.canonical_body() != case.canonical_body();
        prop_assume!(changed);
        let result = other.verify(&case.keys(&key), &header);
        prop_assert_eq!(result.map_err(|f| f.0), Err(AuthFailure::BadSignature));
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Canonical JSON

/// Checks that every object in JSON text lists its keys in strictly increasing code point order
/// (read with serde's visitor, so the order is the text's, not a map's).
struct SortedKeys;

impl<'de> serde::de::DeserializeSeed<'de> for SortedKeys {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(SortedKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for SortedKeys {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<(), E> {
        Err(E::custom(format!("float {f} in canonical JSON")))
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(SortedKeys)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut last: Option<String> = None;
        while let Some(key) = map.next_key::<String>()? {
            if let Some(last) = &last {
                if *last >= key {
                    return Err(serde::de::Error::custom(format!("key {key:?} after {last:?}")));
                }
            }
            map.next_value_seed(SortedKeys)?;
            last = Some(key);
        }
        Ok(())
    }
}

fn keys_sorted(text: &str) -> Result<(), String> {
    use serde::de::DeserializeSeed;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    SortedKeys.deserialize(&mut deserializer).map_err(|e| e.to_string())?;
    deserializer.end().map_err(|e| e.to_string())
}

/// #11 property tests: any JSON value converts to canonical JSON exactly when its numbers are
/// integers in ±(2^53 - 1); the encoding never panics, sorts keys by code point, equals the
/// tests' own spec encoder (`support::verify::canonical`), and parsing it back gives the same
/// value (so encode ∘ parse is idempotent).
#[test]
fn canonical_json_encodes_arbitrary_values() {
    check("canonical_json_encode", config(PURE_CASES), json_value(), |value| {
        match CanonicalJsonValue::try_from(value.clone()) {
            Ok(canonical) => {
                prop_assert!(numbers_canonical(&value), "accepted a non-canonical number");
                let text = encode(&canonical);
                prop_assert_eq!(&text, &String::from_utf8(verify::canonical(&value)).unwrap());
                keys_sorted(&text).map_err(TestCaseError::fail)?;
                let reparsed = parse_lenient(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&reparsed, &canonical);
                prop_assert_eq!(encode(&reparsed), text);
            }
            Err(_) => prop_assert!(!numbers_canonical(&value), "refused a canonical value"),
        }
        Ok(())
    });
}

/// Number literals in the forms the spec's examples use: fractions, exponents, `-0`, and
/// integers near and beyond the canonical range.
fn number_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?(0|[1-9][0-9]{0,18})(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,3})?",
        edge_integer().prop_map(|i| i.to_string()),
        edge_integer().prop_map(|i| format!("{i}.0")),
        Just("-0".to_owned()),
        Just("1e400".to_owned()),
    ]
}

/// Text that is JSON, nearly JSON, or not JSON at all.
fn json_like_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => any::<String>(),
        2 => json_value().prop_map(|v| v.to_string()),
        2 => (json_value(), edit()).prop_map(|(v, e)| apply_edit(&v.to_string(), &e)),
        1 => json_value().prop_map(|v| serde_json::to_string_pretty(&v).unwrap()),
        2 => prop::collection::vec(("[a-z]{0,3}", number_literal()), 0..4).prop_map(|fields| {
            let fields: Vec<String> = fields.iter().map(|(k, n)| format!("\"{k}\" : {n}")).collect();
            format!("{{ {} }}", fields.join(" , "))
        }),
    ]
}

/// #11 property tests: `parse_lenient` never panics on any text; what it accepts encodes to a
/// fixed point (parse(encode(x)) = x, encode(parse(encode(x))) = encode(x)) with sorted keys.
#[test]
fn canonical_json_parse_lenient_never_panics() {
    check("canonical_json_parse_lenient", config(PURE_CASES), json_like_text(), |text| {
        if let Ok(value) = parse_lenient(&text) {
            let encoded = encode(&value);
            keys_sorted(&encoded).map_err(TestCaseError::fail)?;
            let again = parse_lenient(&encoded).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&again, &value);
            prop_assert_eq!(encode(&again), encoded);
        }
        Ok(())
    });
}

/// #11 property tests: a number read leniently is an integer in ±(2^53 - 1) with the value the
/// literal denotes, or an error; never a silent change of value.
#[test]
fn canonical_json_lenient_numbers_keep_their_value() {
    check("canonical_json_lenient_numbers", config(PURE_CASES), number_literal(), |literal| {
        match parse_lenient(&literal) {
            Ok(CanonicalJsonValue::Integer(i)) => {
                let i = i64::from(i);
                prop_assert!((-MAX_SAFE..=MAX_SAFE).contains(&i));
                prop_assert_eq!(i as f64, literal.parse::<f64>().unwrap(), "{} read as {}", literal, i);
            }
            Ok(other) => prop_assert!(false, "{literal} read as {other:?}"),
            Err(_) => {
                let f = literal.parse::<f64>().unwrap();
                prop_assert!(
                    f.fract() != 0.0
                        || f.abs() > MAX_SAFE as f64
                        || !f.is_finite()
                        || literal.parse::<i64>().is_ok_and(|i| i.abs() > MAX_SAFE),
                    "{} refused",
                    literal
                );
            }
        }
        Ok(())
    });
}

/// Text for the fast canonical check: canonical encodings, the same with a character or two
/// changed, JSON-like text, token soup, and string literals with every kind of escape.
fn canonical_candidates() -> impl Strategy<Value = String> {
    let canonical = || canonical_value().prop_map(|v| encode(&CanonicalJsonValue::try_from(v).unwrap()));
    prop_oneof![
        3 => canonical(),
        3 => (canonical(), prop::collection::vec(edit(), 1..3))
            .prop_map(|(text, edits)| edits.iter().fold(text, |text, edit| apply_edit(&text, edit))),
        2 => json_like_text(),
        2 => "[\\[\\]{}\":,0-9a-fA-FuEe.\\- \\\\bnrtl]{0,16}",
        2 => ("[a-zé]{0,12}", escape_token(), "[a-z]{0,12}").prop_map(|(a, e, b)| format!("[\"{a}{e}{b}\"]")),
        2 => number_literal().prop_map(|n| format!("[{n}]")),
        2 => "\\[\"([a-z]|\\\\[\"\\\\/bfnrtu]|\\\\u00[0-9a-fA-F]{2}|\\\\u[0-9a-f]{4}|[\\x00-\\x1f\u{7f}é])*\"\\]",
    ]
}

/// One escape sequence (canonical or not) or raw control character in a string literal.
fn escape_token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\u{1f}".to_owned()),
        Just("\\u001f".to_owned()),
        Just("\\u001F".to_owned()),
        Just("\\u0020".to_owned()),
        "\\\\[\"\\\\/bfnrtux]",
        "\\\\u00[0-2][0-9a-fA-F]",
        "\\\\u[0-9a-fA-F]{4}",
        "[\\x00-\\x1f\u{7f}]",
    ]
}

/// Whether some object key in `value` holds a character the encoder escapes.
fn has_escaped_key(value: &Value) -> bool {
    match value {
        Value::Array(items) => items.iter().any(has_escaped_key),
        Value::Object(map) => {
            map.keys().any(|k| k.chars().any(|c| c < ' ' || c == '"' || c == '\\')) || map.values().any(has_escaped_key)
        }
        _ => false,
    }
}

/// The fast path of request authentication: `already_canonical` takes a text as its own
/// canonical form only when strict parsing and encoding give back exactly that text, and it
/// takes every such text except those with an escaped object key (which it leaves, by design,
/// to the full parser).
#[test]
fn canonical_json_already_canonical_agrees_with_the_encoder() {
    check("canonical_json_already_canonical", config(PURE_CASES), canonical_candidates(), |text| {
        let parsed = serde_json::from_str::<Value>(&text).ok();
        let strict = parsed.clone().and_then(|v| CanonicalJsonValue::try_from(v).ok()).map(|c| encode(&c));
        let is_canonical = strict.as_deref() == Some(text.as_str());
        match already_canonical(text.as_bytes()) {
            Some(taken) => {
                prop_assert_eq!(taken, text.as_str());
                prop_assert!(is_canonical, "took {:?}, whose canonical form is {:?}", text, strict);
            }
            None => prop_assert!(
                !is_canonical || parsed.as_ref().is_some_and(has_escaped_key),
                "missed the canonical text {:?}",
                text
            ),
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Mutating JSON documents (PDUs, transactions)

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn paths(value: &Value, prefix: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    out.push(prefix.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                prefix.push(Seg::Key(k.clone()));
                paths(v, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                prefix.push(Seg::Index(i));
                paths(v, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(value: &'a mut Value, path: &[Seg]) -> &'a mut Value {
    path.iter().fold(value, |v, seg| match seg {
        Seg::Key(k) => &mut v[k.as_str()],
        Seg::Index(i) => &mut v[*i],
    })
}

/// One change somewhere in a JSON document; the node is picked by index among all nodes.
#[derive(Debug, Clone)]
enum Mutation {
    Remove(usize),
    Replace(usize, Value),
    Insert(usize, String, Value),
    /// Edits a string value, or the key a non-string value is stored under.
    Text(usize, Edit),
    AddToInteger(usize, i64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => any::<usize>().prop_map(Mutation::Remove),
        1 => (any::<usize>(), json_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        1 => (any::<usize>(), json_string(), json_value()).prop_map(|(i, k, v)| Mutation::Insert(i, k, v)),
        3 => (any::<usize>(), edit()).prop_map(|(i, e)| Mutation::Text(i, e)),
        1 => (any::<usize>(), prop_oneof![-2i64..=2, any::<i64>()]).prop_map(|(i, d)| Mutation::AddToInteger(i, d)),
    ]
}

fn mutate(document: &Value, mutation: &Mutation) -> Value {
    let mut value = document.clone();
    let mut all = Vec::new();
    paths(&value, &mut Vec::new(), &mut all);
    let pick = |i: usize| all[i % all.len()].clone();
    match mutation {
        Mutation::Remove(i) => {
            let path = pick(*i);
            if let Some((last, parent)) = path.split_last() {
                match (node_mut(&mut value, parent), last) {
                    (Value::Object(map), Seg::Key(k)) => {
                        map.remove(k);
                    }
                    (Value::Array(items), Seg::Index(i)) => {
                        items.remove(*i);
                    }
                    _ => {}
                }
            }
        }
        Mutation::Replace(i, new) => *node_mut(&mut value, &pick(*i)) = new.clone(),
        Mutation::Insert(i, key, new) => match node_mut(&mut value, &pick(*i)) {
            Value::Object(map) => {
                map.insert(key.clone(), new.clone());
            }
            Value::Array(items) => items.push(new.clone()),
            other => *other = json!({ key.clone(): new.clone() }),
        },
        Mutation::Text(i, edit) => {
            let path = pick(*i);
            let node = node_mut(&mut value, &path);
            if let Value::String(s) = node {
                *s = apply_edit(s, edit);
            } else if let Some((Seg::Key(k), parent)) = path.split_last() {
                if let Value::Object(map) = node_mut(&mut value, parent) {
                    let moved = map.remove(k).unwrap();
                    map.insert(apply_edit(k, edit), moved);
                }
            }
        }
        Mutation::AddToInteger(i, delta) => {
            let node = node_mut(&mut value, &pick(*i));
            if let Some(n) = node.as_i64() {
                *node = Value::from(n.wrapping_add(*delta));
            }
        }
    }
    value
}

/// A PDU without what its signatures and hashes do not cover (`signatures`, `unsigned`).
fn signed_part(pdu: &Value) -> Value {
    let mut pdu = pdu.clone();
    if let Some(object) = pdu.as_object_mut() {
        object.remove("signatures");
        object.remove("unsigned");
    }
    pdu
}

// ---------------------------------------------------------------------------------------------
// Fixtures: one gateway (SQLite) and one hostile peer per test

const GATE: &str = "gate.test";
const PEER: &str = "peer.test";

struct Fixture {
    runtime: tokio::runtime::Runtime,
    gate: TestServer,
    peer: TestPeer,
    /// alice's world-readable room (v10) on the gateway.
    room: String,
    http: reqwest::Client,
}

impl Fixture {
    fn start() -> Fixture {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (gate, peer, room) = runtime.block_on(async {
            let peer = TestPeer::start(PEER, KeyMode::Good);
            let gate = ServerSpec::new(GATE, DbKind::Sqlite)
                .destination(PEER, &peer.url)
                .configure(support::gateways::open_registration)
                .configure(|c| {
                    // Keys of servers that mutations invent fail fast (no DNS here anyway).
                    c.federation.connect_timeout_ms = 1_000;
                    c.federation.request_timeout_ms = 2_000;
                })
                .start()
                .await;
            peer.trust(GATE, &gate.base);
            let alice = Client::register(&gate.base, "alice").await;
            let room = alice.create_world_readable_room("lobby", "10").await;
            (gate, peer, room)
        });
        Fixture { runtime, gate, peer, room, http: support::client::http() }
    }

    fn stop(self) {
        let Fixture { runtime, gate, peer, .. } = self;
        runtime.block_on(async {
            gate.stop().await;
            peer.stop().await;
        });
        drop(runtime);
        peekgate::db::settle_connects(std::time::Duration::from_secs(15));
    }

    /// Signed PDUs by `@mallory:peer.test` in `room_id`: a message, a state event and a join,
    /// each with made-up auth and prev events.
    fn pdus(&self, version: &str, room_id: &str) -> Vec<(Value, String)> {
        let fake = |c: char| format!("${}", c.to_string().repeat(43));
        let (auth, prev) = (vec![fake('A'), fake('B')], vec![fake('C')]);
        let mallory = format!("@mallory:{PEER}");
        vec![
            self.peer.build_pdu(
                version,
                room_id,
                "mallory",
                "m.room.message",
                None,
                json!({ "msgtype": "m.text", "body": "hello \u{e9}\u{1f600}", "n": 42 }),
                &auth,
                &prev,
                7,
            ),
            self.peer.build_pdu(
                version,
                room_id,
                "mallory",
                "m.room.topic",
                Some(""),
                json!({ "topic": "props" }),
                &auth,
                &prev,
                8,
            ),
            self.peer.build_pdu(
                version,
                room_id,
                "mallory",
                "m.room.member",
                Some(&mallory),
                json!({ "membership": "join", "displayname": "M" }),
                &auth,
                &prev,
                9,
            ),
        ]
    }
}

fn version_of(v: &str) -> RoomVersion {
    RoomVersion::parse(v).unwrap()
}

// ---------------------------------------------------------------------------------------------
// PDU intake

/// What intake of one PDU gave: the event ID and JSON on success, the typed error otherwise.
fn intake(
    fixture: &Fixture,
    room_id: &str,
    version: &str,
    raw: Value,
    hashes: Hashes,
) -> Result<(String, Value), IntakeError> {
    let room_id = RoomId::parse(room_id).unwrap();
    let keys = &*fixture.gate.state().keys;
    fixture
        .runtime
        .block_on(intake::check_raw(keys, &room_id, version_of(version), raw, hashes))
        .map(|pdu| (pdu.event_id.to_string(), serde_json::to_value(&pdu.json).unwrap()))
        .map_err(|refused| refused.reason)
}

/// #11 property tests (intake): arbitrary JSON values and PDU-shaped objects never panic the
/// intake and are refused with a typed error (none of them is signed).
#[test]
fn intake_refuses_arbitrary_json() {
    let fixture = Fixture::start();
    let room_id = format!("!prop:{PEER}");
    let template = fixture.pdus("10", &room_id)[0].0.clone();
    let template = signed_part(&template);
    let strategy = (
        prop_oneof![
            json_value(),
            // A PDU shape with several fields replaced and no valid signature.
            prop::collection::vec(mutation(), 1..5)
                .prop_map(move |ms| ms.iter().fold(template.clone(), |v, m| mutate(&v, m))),
        ],
        prop::sample::select(vec!["10", "11"]),
        any::<bool>(),
    );
    check("intake_arbitrary_json", config(SIGNING_CASES), strategy, |(raw, version, strict)| {
        let hashes = if strict { Hashes::Strict } else { Hashes::Redact };
        let result = intake(&fixture, &room_id, version, raw.clone(), hashes);
        prop_assert!(result.is_err(), "an unsigned PDU was accepted: {raw}");
        Ok(())
    });
    fixture.stop();
}

/// #11 property tests (intake): a validly signed PDU (v10 and v11, message, state and member
/// events) with arbitrary changes never panics the intake; it is accepted only when what the
/// signatures and hashes cover is unchanged (strict hashes, as for peek answers), or, with
/// redaction on hash mismatch (as for `/send`), only as the original or its redaction, under the
/// original event ID. A PDU changed only in `unsigned` is accepted (so the fixture works).
#[test]
fn intake_accepts_mutated_pdus_only_when_unchanged() {
    let fixture = Fixture::start();
    let room_id = format!("!prop:{PEER}");
    let pool: Vec<(&str, Value, String)> = ["10", "11"]
        .into_iter()
        .flat_map(|v| fixture.pdus(v, &room_id).into_iter().map(move |(pdu, id)| (v, pdu, id)))
        .collect();
    let strategy = (0..pool.len(), prop::collection::vec(mutation(), 0..3), any::<bool>());
    check("intake_mutated_pdus", config(SIGNING_CASES), strategy, |(which, mutations, strict)| {
        let (version, original, original_id) = &pool[which];
        let mutated = mutations.iter().fold(original.clone(), |v, m| mutate(&v, m));
        let hashes = if strict { Hashes::Strict } else { Hashes::Redact };
        let result = intake(&fixture, &room_id, version, mutated.clone(), hashes);
        let without_unsigned = |v: &Value| {
            let mut v = v.clone();
            v.as_object_mut().map(|o| o.remove("unsigned"));
            v
        };
        if without_unsigned(&mutated) == without_unsigned(original) {
            let (event_id, _) = result.map_err(|e| TestCaseError::fail(format!("unchanged PDU refused: {e}")))?;
            prop_assert_eq!(&event_id, original_id);
            return Ok(());
        }
        if let Ok((event_id, json)) = result {
            prop_assert_eq!(&event_id, original_id, "accepted under another event ID: {}", mutated);
            if strict {
                prop_assert!(signed_part(&mutated) == signed_part(original), "strict intake accepted {mutated}");
            }
            let redacted = verify::redact(original, version);
            prop_assert!(
                signed_part(&json) == signed_part(&redacted) || signed_part(&json) == signed_part(original),
                "accepted as neither the original nor its redaction: {json}"
            );
        }
        Ok(())
    });
    fixture.stop();
}

/// A change to one character of a string (or a key) inside a PDU's `content`.
#[derive(Debug, Clone)]
struct ContentEdit {
    pdu: usize,
    leaf: usize,
    position: usize,
    replacement: char,
    in_key: bool,
}

fn edit_content(pdu: &Value, edit: &ContentEdit) -> Value {
    let mut pdu = pdu.clone();
    let content = pdu["content"].as_object_mut().unwrap();
    let keys: Vec<String> = content.keys().cloned().collect();
    let key = &keys[edit.leaf % keys.len()];
    let change = |s: &str| {
        let mut chars: Vec<char> = s.chars().collect();
        let i = edit.position % chars.len();
        chars[i] = if chars[i] == edit.replacement { 'Z' } else { edit.replacement };
        if chars[i] == s.chars().nth(i).unwrap() {
            chars[i] = 'Y';
        }
        chars.into_iter().collect::<String>()
    };
    if edit.in_key || !content[key].is_string() {
        let value = content.remove(key).unwrap();
        content.insert(change(key), value);
    } else {
        let changed = change(content[key].as_str().unwrap());
        content.insert(key.clone(), Value::String(changed));
    }
    pdu
}

/// #11 property tests (intake): a validly signed PDU with any character of its `content`
/// changed is refused as a hash mismatch under strict hashes; under redaction it is kept only
/// as its redacted form (same event ID), or refused when the change touched content the
/// redaction keeps (a member event's `membership`: the signature fails, or the key is gone).
#[test]
fn intake_refuses_pdus_with_changed_content() {
    let fixture = Fixture::start();
    let room_id = format!("!prop:{PEER}");
    let pool: Vec<(&str, Value, String)> = ["10", "11"]
        .into_iter()
        .flat_map(|v| fixture.pdus(v, &room_id).into_iter().map(move |(pdu, id)| (v, pdu, id)))
        .collect();
    let strategy = (0..pool.len(), any::<usize>(), any::<usize>(), any::<char>(), any::<bool>()).prop_map(
        |(pdu, leaf, position, replacement, in_key)| ContentEdit { pdu, leaf, position, replacement, in_key },
    );
    check("intake_changed_content", config(SIGNING_CASES), strategy, |edit| {
        let (version, original, original_id) = &pool[edit.pdu];
        let mutated = edit_content(original, &edit);
        prop_assert_ne!(&mutated["content"], &original["content"]);
        let strict = intake(&fixture, &room_id, version, mutated.clone(), Hashes::Strict);
        prop_assert!(matches!(strict, Err(IntakeError::HashMismatch)), "strict: {:?}", strict.map(|r| r.0));
        match intake(&fixture, &room_id, version, mutated.clone(), Hashes::Redact) {
            Ok((event_id, json)) => {
                prop_assert_eq!(&event_id, original_id);
                prop_assert_eq!(&json["content"], &verify::redact(original, version)["content"]);
            }
            Err(IntakeError::Event(EventError::Signature(_) | EventError::Malformed(_))) => {
                // Only content the redaction keeps is covered by the signature (and a member
                // event needs its `membership`).
                let redacted_original = verify::redact(original, version);
                let redacted_mutated = verify::redact(&mutated, version);
                prop_assert_ne!(&redacted_mutated["content"], &redacted_original["content"]);
            }
            Err(other) => prop_assert!(false, "unexpected refusal: {other}"),
        }
        Ok(())
    });
    fixture.stop();
}

// ---------------------------------------------------------------------------------------------
// `/send` and `/peek` through the HTTP edge

/// A body as sent on the wire.
#[derive(Debug, Clone)]
enum Body {
    None,
    Bytes(Vec<u8>),
    Json(Value),
}

/// How the request is authenticated.
#[derive(Debug, Clone)]
enum Auth {
    Signed,
    Mutated(Edit),
    Arbitrary(String),
    Missing,
}

#[derive(Debug, Clone)]
struct HttpCase {
    method: &'static str,
    path: String,
    body: Body,
    auth: Auth,
}

fn auth() -> impl Strategy<Value = Auth> {
    prop_oneof![
        12 => Just(Auth::Signed),
        1 => edit().prop_map(Auth::Mutated),
        1 => prop_oneof![header_like(), "[ -~]{0,40}"].prop_map(Auth::Arbitrary),
        1 => Just(Auth::Missing),
    ]
}

fn raw_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        1 => Just(Body::None),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Body::Bytes),
        1 => json_like_text().prop_map(|t| Body::Bytes(t.into_bytes())),
        2 => json_value().prop_map(Body::Json),
    ]
}

/// Path segments: plain, arbitrary, or shaped like IDs; always percent-encoded as sent.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z0-9._=-]{1,8}", "\\PC{0,12}", "[!$@#][a-z]{0,6}:[a-z.:0-9]{0,10}", Just(String::new())]
}

/// #11 property tests (`/send`): arbitrary and mutated transaction bodies, arbitrary
/// transaction IDs, PDUs that are arbitrary or mutated from validly signed ones, and now and
/// then a broken header, get 200 or a 4xx Matrix error, never a 5xx or a dropped connection;
/// the gateway answers `/health` afterwards.
#[test]
fn send_bodies_never_fail_the_server() {
    let fixture = Fixture::start();
    let mut pool = fixture.pdus("10", &fixture.room);
    pool.extend(fixture.pdus("10", &format!("!unknown:{GATE}")));
    pool.extend(fixture.pdus("11", &format!("!elsewhere:{PEER}")));
    let pool: Vec<Value> = pool.into_iter().map(|(pdu, _)| pdu).collect();
    let pdu = prop_oneof![
        3 => (0..pool.len(), prop::collection::vec(mutation(), 0..3))
            .prop_map(move |(i, ms)| ms.iter().fold(pool[i].clone(), |v, m| mutate(&v, m))),
        1 => json_value(),
    ];
    let transaction = (
        prop_oneof![4 => Just(Value::from(PEER)), 1 => json_value()],
        prop_oneof![4 => Just(Value::from(1_700_000_000_000i64)), 1 => json_value()],
        prop::collection::vec(pdu, 0..4),
        prop_oneof![3 => Just(None), 1 => prop::option::of(json_value())],
        prop::collection::vec(mutation(), 0..2),
    )
        .prop_map(|(origin, ts, pdus, edus, mutations)| {
            let mut txn = json!({ "origin": origin, "origin_server_ts": ts, "pdus": pdus });
            if let Some(edus) = edus {
                txn["edus"] = edus;
            }
            Body::Json(mutations.iter().fold(txn, |v, m| mutate(&v, m)))
        });
    let strategy = (
        prop_oneof![4 => "[a-zA-Z0-9._-]{1,16}", 1 => segment()],
        prop_oneof![3 => transaction, 1 => raw_body()],
        auth(),
    )
        .prop_map(|(txn_id, body, auth)| HttpCase {
            method: "PUT",
            path: format!("/_matrix/federation/v1/send/{}", enc(&txn_id)),
            body,
            auth,
        });
    check("send_bodies", http_config(), strategy, |case| fixture.exercise(&case));
    fixture.assert_healthy();
    fixture.stop();
}

/// #11 property tests (`/peek`): `PUT`, `DELETE` and `POST .../renew` with arbitrary bodies,
/// room IDs, peek IDs and `ver` lists (FP-2, FP-3, FP-4) get 200 or a 4xx Matrix error, never a
/// 5xx or a dropped connection; the gateway answers `/health` afterwards.
#[test]
fn peek_bodies_never_fail_the_server() {
    let fixture = Fixture::start();
    let room = fixture.room.clone();
    let strategy = (
        prop::sample::select(vec!["PUT", "PUT", "PUT", "DELETE", "POST"]),
        prop_oneof![3 => Just(room), 1 => segment(), 1 => Just(format!("!nope:{GATE}"))],
        prop_oneof![3 => "[a-zA-Z0-9._=-]{1,8}", 1 => segment()],
        prop::collection::vec(prop_oneof![Just("10".to_owned()), Just("11".to_owned()), "\\PC{0,4}"], 0..4),
        prop_oneof![3 => Just(Body::Json(json!({}))), 2 => canonical_object().prop_map(Body::Json), 2 => raw_body()],
        auth(),
    )
        .prop_map(|(method, room, peek_id, vers, body, auth)| {
            let base = format!("/_matrix/federation/v1/peek/{}/{}", enc(&room), enc(&peek_id));
            let path = match method {
                "POST" => format!("{base}/renew"),
                _ if vers.is_empty() => base,
                _ => {
                    let query: Vec<String> = vers.iter().map(|v| format!("ver={}", enc(v))).collect();
                    format!("{base}?{}", query.join("&"))
                }
            };
            HttpCase { method, path, body, auth }
        });
    check("peek_bodies", http_config(), strategy, |case| fixture.exercise(&case));
    fixture.assert_healthy();
    fixture.stop();
}

impl Fixture {
    /// Sends one request as the peer and checks the answer's shape.
    fn exercise(&self, case: &HttpCase) -> Result<(), TestCaseError> {
        let (bytes, content) = match &case.body {
            Body::None => (None, None),
            Body::Bytes(bytes) => (Some(bytes.clone()), serde_json::from_slice::<Value>(bytes).ok()),
            Body::Json(value) => (Some(serde_json::to_vec(value).unwrap()), Some(value.clone())),
        };
        // The signature covers the body as the gateway will parse it (when it is JSON).
        let signed = self.peer.authorization(case.method, &case.path, GATE, content.as_ref());
        let header = match &case.auth {
            Auth::Signed => Some(signed),
            Auth::Mutated(edit) => Some(apply_edit(&signed, edit)),
            Auth::Arbitrary(text) => Some(text.clone()),
            Auth::Missing => None,
        };
        let method = Method::from_bytes(case.method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{}", self.gate.base, case.path));
        if let Some(header) = header {
            // HTTP cannot carry control characters in a header; the rest goes as it is.
            let header: String = header.chars().filter(|c| *c == '\t' || !c.is_control()).collect();
            request = request.header("Authorization", header);
        }
        if let Some(bytes) = bytes {
            request = request.header("Content-Type", "application/json").body(bytes);
        }
        let (status, body) = self.runtime.block_on(async {
            let response = request.send().await.map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
            let status = response.status().as_u16();
            let body = response.bytes().await.map_err(|e| TestCaseError::fail(format!("body cut: {e}")))?;
            Ok::<_, TestCaseError>((status, body))
        })?;
        let text = String::from_utf8_lossy(&body);
        prop_assert!(status < 500, "{} {}: {} {}", case.method, case.path, status, text);
        let json: Value = serde_json::from_slice(&body)
            .map_err(|_| TestCaseError::fail(format!("{status} with a non-JSON body: {text}")))?;
        prop_assert!(json.is_object(), "{status}: {text}");
        if status == 200 {
            if case.path.contains("/send/") {
                prop_assert!(json["pdus"].is_object(), "/send answered {text}");
            }
        } else {
            prop_assert!((400..500).contains(&status), "status {status}: {text}");
            let errcode = json["errcode"].as_str().unwrap_or("");
            prop_assert!(errcode.starts_with("M_"), "{status} without a Matrix errcode: {text}");
            prop_assert!(json["error"].is_string(), "{status} without an error text: {text}");
        }
        Ok(())
    }

    /// The gateway still answers `/health`, and a correctly signed empty transaction.
    fn assert_healthy(&self) {
        self.runtime.block_on(async {
            let health = self.http.get(format!("{}/health", self.gate.base)).send().await.unwrap();
            assert_eq!(health.status().as_u16(), 200);
            let (status, body) = self.peer.send_transaction(&self.gate.base, GATE, Vec::new()).await;
            assert_eq!((status, body), (200, json!({ "pdus": {} })));
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The helpers the properties rely on.

/// A mutation that changes nothing leaves the document as it was (the intake property asserts
/// such a PDU is still accepted); the others change it.
#[test]
fn mutation_helpers_change_what_they_say() {
    let document = json!({ "a": [1, "x"], "b": { "c": null } });
    assert_eq!(mutate(&document, &Mutation::AddToInteger(2, 0)), document);
    assert_ne!(mutate(&document, &Mutation::AddToInteger(2, 1)), document);
    assert_eq!(mutate(&document, &Mutation::Remove(0)), document, "the root is not removed");
    assert_eq!(apply_edit("ab", &Edit::Delete(3)), "a");
    assert_eq!(apply_edit("", &Edit::Replace(3, 'x')), "");
    assert_eq!(apply_edit("", &Edit::Insert(3, 'x')), "x");
}
