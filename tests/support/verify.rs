//! Independent checks of events peekgate produces, written from the spec's text (not with
//! peekgate's or ruma's event code): redaction per room version, content hash, reference hash
//! (event ID) and the server's signature.

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Canonical JSON bytes (sorted keys, compact); our test events hold no floats.
pub fn canonical(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_sorted(value, &mut out);
    out
}

fn write_sorted(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(k).unwrap());
                out.push(b':');
                write_sorted(&map[*k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted(item, out);
            }
            out.push(b']');
        }
        other => out.extend(serde_json::to_vec(other).unwrap()),
    }
}

/// The redaction algorithm of room versions 10 and 11 (federation-essentials §6.5).
pub fn redact(event: &Value, version: &str) -> Value {
    let mut top: Vec<&str> = vec![
        "event_id",
        "type",
        "room_id",
        "sender",
        "state_key",
        "content",
        "hashes",
        "signatures",
        "depth",
        "prev_events",
        "auth_events",
        "origin_server_ts",
    ];
    if version == "10" {
        top.extend(["origin", "membership", "prev_state"]);
    }
    let kind = event["type"].as_str().unwrap_or_default();
    let content_keys: Option<Vec<&str>> = match (kind, version) {
        ("m.room.member", "10") => Some(vec!["membership", "join_authorised_via_users_server"]),
        ("m.room.member", _) => Some(vec!["membership", "join_authorised_via_users_server", "third_party_invite"]),
        ("m.room.create", "10") => Some(vec!["creator"]),
        ("m.room.create", _) => None, // v11 keeps all of it
        ("m.room.join_rules", _) => Some(vec!["join_rule", "allow"]),
        ("m.room.power_levels", "10") => {
            Some(vec!["ban", "events", "events_default", "kick", "redact", "state_default", "users", "users_default"])
        }
        ("m.room.power_levels", _) => Some(vec![
            "ban",
            "events",
            "events_default",
            "invite",
            "kick",
            "redact",
            "state_default",
            "users",
            "users_default",
        ]),
        ("m.room.history_visibility", _) => Some(vec!["history_visibility"]),
        ("m.room.redaction", "10") => Some(vec![]),
        ("m.room.redaction", _) => Some(vec!["redacts"]),
        _ => Some(vec![]),
    };
    let mut out = Map::new();
    for key in top {
        if let Some(v) = event.get(key) {
            out.insert(key.to_owned(), v.clone());
        }
    }
    let content = event["content"].as_object().cloned().unwrap_or_default();
    let kept: Map<String, Value> = match content_keys {
        None => content,
        Some(keys) => content.into_iter().filter(|(k, _)| keys.contains(&k.as_str())).collect(),
    };
    let mut kept = kept;
    if kind == "m.room.member" && version != "10" {
        // v11 keeps only `signed` inside third_party_invite.
        if let Some(Value::Object(tpi)) = kept.get("third_party_invite").cloned() {
            let signed: Map<String, Value> = tpi.into_iter().filter(|(k, _)| k == "signed").collect();
            kept.insert("third_party_invite".into(), Value::Object(signed));
        }
    }
    out.insert("content".into(), Value::Object(kept));
    Value::Object(out)
}

fn without(event: &Value, keys: &[&str]) -> Value {
    let mut copy = event.clone();
    for key in keys {
        copy.as_object_mut().unwrap().remove(*key);
    }
    copy
}

pub fn content_hash(event: &Value) -> String {
    STANDARD_NO_PAD.encode(Sha256::digest(canonical(&without(event, &["unsigned", "signatures", "hashes"]))))
}

pub fn event_id(event: &Value, version: &str) -> String {
    let redacted = without(&redact(event, version), &["signatures", "unsigned"]);
    format!("${}", URL_SAFE_NO_PAD.encode(Sha256::digest(canonical(&redacted))))
}

/// Checks hash, signature and (when given) the event ID of a PDU from `server`. An event in its
/// redacted form needs no matching content hash (its signature and ID still must match).
pub fn check_event(
    event: &Value,
    version: &str,
    server: &str,
    public_keys: &[(String, String)],
    expected_id: Option<&str>,
) -> Result<(), String> {
    let hash = event["hashes"]["sha256"].as_str().ok_or("no content hash")?;
    // A redacted event fails its content hash by design; the spec has receivers keep it in
    // its redacted form, so an event that already is its own redaction passes (H19).
    let already_redacted = without(&redact(event, version), &["unsigned"]) == without(event, &["unsigned"]);
    if hash != content_hash(event) && !already_redacted {
        return Err("content hash mismatch".into());
    }
    let signed = without(&redact(event, version), &["signatures", "unsigned"]);
    let bytes = canonical(&signed);
    let sigs = event["signatures"][server].as_object().ok_or("not signed by the server")?;
    let mut verified = false;
    for (key_id, public_key) in public_keys {
        let Some(sig) = sigs.get(key_id).and_then(Value::as_str) else {
            continue;
        };
        let key: [u8; 32] = STANDARD_NO_PAD.decode(public_key).unwrap().try_into().unwrap();
        let sig: [u8; 64] =
            STANDARD_NO_PAD.decode(sig).map_err(|e| e.to_string())?.try_into().map_err(|_| "sig length")?;
        ed25519_dalek::VerifyingKey::from_bytes(&key)
            .unwrap()
            .verify_strict(&bytes, &ed25519_dalek::Signature::from_bytes(&sig))
            .map_err(|e| format!("bad signature: {e}"))?;
        verified = true;
    }
    if !verified {
        return Err("no signature by a known key".into());
    }
    if let Some(expected) = expected_id {
        if event_id(event, version) != expected {
            return Err(format!("event ID {} does not match {expected}", event_id(event, version)));
        }
    }
    Ok(())
}
