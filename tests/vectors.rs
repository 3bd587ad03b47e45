//! The Matrix specification's test vectors (copied into tests/vectors/ from the spec's
//! appendices): canonical JSON, JSON signing and event signing, run through peekgate's code.

use peekgate::canonical_json;
use peekgate::events::{self, RoomVersion};
use peekgate::keys::{decode_base64, SigningKey};
use ruma::{CanonicalJsonObject, CanonicalJsonValue};
use serde_json::Value;

fn vector(name: &str) -> Value {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The spec's signing key: seed from `signing_key.json`, server `domain`, key id `ed25519:1`.
fn spec_key() -> SigningKey {
    let v = vector("signing_key.json");
    let seed = decode_base64(v["signing_key_seed_unpadded_base64"].as_str().unwrap()).unwrap();
    assert_eq!(seed.len(), 32, "the seed decodes to exactly 32 bytes");
    let key = SigningKey::from_seed("1", seed.try_into().unwrap());
    assert_eq!(key.key_id(), v["key_id"].as_str().unwrap());
    assert_eq!(
        key.public_key_base64(),
        v["derived_not_in_spec"]["ed25519_public_key_unpadded_base64"].as_str().unwrap()
    );
    key
}

fn object(value: &Value) -> CanonicalJsonObject {
    match CanonicalJsonValue::try_from(value.clone()).unwrap() {
        CanonicalJsonValue::Object(o) => o,
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn canonical_json_vectors() {
    let v = vector("canonical_json.json");
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for case in cases {
        let input = case["input"].as_str().unwrap();
        let expected = case["expected_canonical"].as_str().unwrap();
        let parsed = canonical_json::parse_lenient(input).unwrap();
        assert_eq!(canonical_json::encode(&parsed), expected, "{input}");
        // Request authentication's fast path takes the canonical text as it is, and only that.
        assert_eq!(canonical_json::already_canonical(expected.as_bytes()), Some(expected), "{expected}");
        let taken = canonical_json::already_canonical(input.as_bytes());
        assert_eq!(taken, (input == expected).then_some(input), "{input}");
    }
}

#[test]
fn json_signing_vectors() {
    let key = spec_key();
    for case in vector("json_signing.json")["cases"].as_array().unwrap() {
        let mut signed = object(&case["input"]);
        key.sign_json("domain", &mut signed);
        let got = serde_json::to_value(&signed).unwrap();
        assert_eq!(got, case["expected_signed"], "{}", case["name"]);

        // The expected object verifies, and flipping one byte of a value breaks it.
        let public_key = ruma::serde::Base64::new(key.public_key().to_vec());
        let keys = [("domain".to_owned(), [("ed25519:1".to_owned(), public_key)].into())].into();
        ruma::signatures::verify_json(&keys, &object(&case["expected_signed"])).unwrap();
        if case["input"].as_object().unwrap().is_empty() {
            continue;
        }
        let mut tampered = case["expected_signed"].clone();
        tampered["two"] = Value::from("Twp");
        assert!(ruma::signatures::verify_json(&keys, &object(&tampered)).is_err());
    }
}

/// The fan-out's signer (one nonce hash over a shared prefix, the nonce points compressed in
/// one batch) makes the spec's JSON-signing signatures: both cases signed together, as the
/// continuations of their common first byte.
#[test]
fn batched_prefix_signatures_match_the_json_signing_vectors() {
    let key = spec_key();
    let cases = vector("json_signing.json")["cases"].as_array().unwrap().clone();
    let texts: Vec<String> =
        cases.iter().map(|case| canonical_json::encode(&CanonicalJsonValue::Object(object(&case["input"])))).collect();
    let suffixes: Vec<&[u8]> = texts.iter().map(|text| &text.as_bytes()[1..]).collect();
    let signatures = key.prefix_signer(b"{".to_vec()).sign_many(&suffixes);
    for (case, signature) in cases.iter().zip(signatures) {
        assert_eq!(
            signature,
            case["expected_signed"]["signatures"]["domain"]["ed25519:1"].as_str().unwrap(),
            "{}",
            case["name"]
        );
    }
}

#[test]
fn event_signing_vectors_use_pre_v11_redaction() {
    let key = spec_key();
    for case in vector("event_signing.json")["cases"].as_array().unwrap() {
        let mut event = object(&case["input"]);
        // e2 has no `hashes` on input: the hasher must add one.
        events::hash_and_sign(&key, "domain", &mut event, RoomVersion::V10).unwrap();
        let got = serde_json::to_value(&event).unwrap();
        let expected = &case["expected_signed"];
        assert_eq!(got["hashes"], expected["hashes"], "{}", case["name"]);
        assert_eq!(got["signatures"], expected["signatures"], "{}", case["name"]);
        assert_eq!(got["unsigned"], expected["unsigned"], "unsigned is carried through untouched");
        assert_eq!(got, *expected, "{}", case["name"]);
        assert_eq!(events::content_hash(&object(expected)).unwrap(), expected["hashes"]["sha256"].as_str().unwrap());
    }
}

#[test]
fn v11_redaction_gives_different_signatures() {
    let key = spec_key();
    let official = vector("event_signing.json");
    let derived = vector("derived_v11_redaction_contrast.json");
    for (case, contrast) in official["cases"].as_array().unwrap().iter().zip(derived["cases"].as_array().unwrap()) {
        let mut v11 = object(&case["input"]);
        events::hash_and_sign(&key, "domain", &mut v11, RoomVersion::V11).unwrap();
        let v11 = serde_json::to_value(&v11).unwrap();
        assert_eq!(v11["hashes"]["sha256"], contrast["sha256_content_hash"]);
        assert_eq!(v11["signatures"]["domain"]["ed25519:1"], contrast["signature_if_v11_redaction_used"]);
        assert_ne!(v11["signatures"], case["expected_signed"]["signatures"]);
    }
}
