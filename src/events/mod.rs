//! Events (PDUs): room versions, building and signing our own events, verifying received ones,
//! and the authorisation rules. Canonical JSON, hashing, redaction, signing and the auth rules
//! are ruma's; this module picks the room version's rules so callers cannot mix them.

pub mod intake;
mod pdu;
mod version;

use std::collections::BTreeMap;

use ruma::events::{StateEventType, TimelineEventType};
use ruma::serde::Base64;
use ruma::signatures::Verified;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, Int, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId,
};
use serde_json::value::RawValue as RawJsonValue;
use serde_json::Value;

pub use pdu::{create_event_id_of, create_room_id, Pdu};
pub use version::{EventError, RoomVersion};

use crate::keys::{RemoteKeys, SigningKey};

/// Adds `hashes.sha256` and our signature over the version's redacted form.
pub fn hash_and_sign(
    key: &SigningKey,
    server_name: &str,
    event: &mut CanonicalJsonObject,
    version: RoomVersion,
) -> Result<(), ruma::signatures::JsonError> {
    ruma::signatures::hash_and_sign_event(server_name, key.pair(), event, &version.rules().redaction)
}

/// The unpadded base64 SHA-256 content hash of an event.
pub fn content_hash(event: &CanonicalJsonObject) -> Result<String, ruma::signatures::JsonError> {
    Ok(ruma::signatures::content_hash(event)?.encode())
}

/// What a local client asks for; [`build`] turns it into a signed PDU.
#[derive(Debug, Clone)]
pub struct EventDraft {
    pub room_id: OwnedRoomId,
    pub sender: OwnedUserId,
    pub kind: String,
    pub state_key: Option<String>,
    pub content: Value,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub depth: i64,
    pub origin_server_ts: i64,
}

impl EventDraft {
    /// A draft to be placed at the end of a room: `prev_events`, `auth_events` and `depth` are
    /// filled in by the append path; the timestamp is now.
    pub fn new(room_id: &RoomId, sender: &UserId, kind: &str, state_key: Option<&str>, content: Value) -> EventDraft {
        EventDraft {
            room_id: room_id.to_owned(),
            sender: sender.to_owned(),
            kind: kind.to_owned(),
            state_key: state_key.map(str::to_owned),
            content,
            prev_events: Vec::new(),
            auth_events: Vec::new(),
            depth: 0,
            origin_server_ts: crate::clock::now_ms(),
        }
    }
}

/// Builds, hashes and signs one of our own events.
pub fn build(key: &SigningKey, server_name: &str, version: RoomVersion, draft: EventDraft) -> Result<Pdu, EventError> {
    let content = match CanonicalJsonValue::try_from(draft.content) {
        Ok(CanonicalJsonValue::Object(content)) => content,
        Ok(_) => return Err(EventError::Malformed("content must be an object".into())),
        Err(e) => return Err(EventError::Malformed(format!("content: {e}"))),
    };
    let ids = |ids: Vec<OwnedEventId>| {
        CanonicalJsonValue::Array(ids.into_iter().map(|id| CanonicalJsonValue::String(id.to_string())).collect())
    };
    let mut json = CanonicalJsonObject::new();
    json.insert("auth_events".into(), ids(draft.auth_events));
    json.insert("prev_events".into(), ids(draft.prev_events));
    json.insert("content".into(), CanonicalJsonValue::Object(content));
    json.insert("depth".into(), CanonicalJsonValue::Integer(Int::new_saturating(draft.depth)));
    json.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(Int::new_saturating(draft.origin_server_ts)));
    // v12: the create event names no room (its reference hash becomes the room ID).
    if !(version.room_id_is_create_hash() && draft.kind == "m.room.create") {
        json.insert("room_id".into(), CanonicalJsonValue::String(draft.room_id.to_string()));
    }
    json.insert("sender".into(), CanonicalJsonValue::String(draft.sender.to_string()));
    json.insert("type".into(), CanonicalJsonValue::String(draft.kind));
    if let Some(state_key) = draft.state_key {
        json.insert("state_key".into(), CanonicalJsonValue::String(state_key));
    }
    if version == RoomVersion::V10 {
        // Legacy, but v10 still protects it under redaction; servers expect it.
        json.insert("origin".into(), CanonicalJsonValue::String(server_name.to_owned()));
        // v10 names the redacted event at the top level (v11 moved it into `content`).
        if json["type"] == CanonicalJsonValue::String("m.room.redaction".into()) {
            if let Some(CanonicalJsonValue::Object(content)) = json.get("content") {
                if let Some(redacts) = content.get("redacts").cloned() {
                    json.insert("redacts".into(), redacts);
                }
            }
        }
    }
    hash_and_sign(key, server_name, &mut json, version).map_err(|e| EventError::Malformed(e.to_string()))?;
    Pdu::from_federation(json, version)
}

/// The `(type, state_key)` pairs whose current events must be the new event's `auth_events`.
pub fn auth_types(
    version: RoomVersion,
    kind: &str,
    sender: &UserId,
    state_key: Option<&str>,
    content: &Value,
) -> Result<Vec<(StateEventType, String)>, EventError> {
    let raw = RawJsonValue::from_string(content.to_string()).expect("valid JSON");
    ruma::state_res::auth_types_for_event(
        &TimelineEventType::from(kind),
        sender,
        state_key,
        &raw,
        &version.rules().authorization,
    )
    .map_err(EventError::Malformed)
}

/// The authorisation rules: against the event's own `auth_events` (`fetch_event`) and then
/// against the state before it (`fetch_state`).
pub fn check_auth(
    version: RoomVersion,
    pdu: &Pdu,
    fetch_event: impl Fn(&EventId) -> Option<Pdu>,
    fetch_state: impl Fn(&StateEventType, &str) -> Option<Pdu>,
) -> Result<(), EventError> {
    let rules = version.rules().authorization;
    ruma::state_res::check_state_independent_auth_rules(&rules, pdu, fetch_event).map_err(EventError::Unauthorized)?;
    ruma::state_res::check_state_dependent_auth_rules(&rules, pdu, fetch_state).map_err(EventError::Unauthorized)
}

/// Checks a received PDU's signatures: every server that must have signed it (the sender's)
/// did, with a key valid at the event's `origin_server_ts`. Returns the PDU to store: itself, or
/// its redacted form when the content hash does not match (spec: "checks on receipt of a PDU").
pub async fn verify_received(
    keys: &RemoteKeys,
    json: CanonicalJsonObject,
    version: RoomVersion,
) -> Result<CanonicalJsonObject, EventError> {
    let rules = version.rules();
    let servers = ruma::signatures::required_server_signatures_to_verify_event(&json, &rules.signatures)
        .map_err(|e| EventError::Malformed(e.to_string()))?;
    let ts = match json.get("origin_server_ts") {
        Some(CanonicalJsonValue::Integer(ts)) => i64::from(*ts),
        _ => return Err(EventError::Malformed("origin_server_ts is not an integer".into())),
    };
    let mut public_keys: ruma::signatures::PublicKeyMap = BTreeMap::new();
    for server in servers {
        let Some(CanonicalJsonValue::Object(all)) = json.get("signatures") else {
            return Err(EventError::Signature("no signatures".into()));
        };
        let Some(CanonicalJsonValue::Object(by_server)) = all.get(server.as_str()) else {
            return Err(EventError::Signature(format!("not signed by {server}")));
        };
        let mut set = BTreeMap::new();
        for key_id in by_server.keys().filter(|id| id.starts_with("ed25519:")) {
            // Unknown or invalid keys are skipped; verification fails if none is left.
            if let Ok(key) = keys.verify_key(&server, key_id, ts).await {
                set.insert(key_id.clone(), Base64::new(key.to_vec()));
            }
        }
        public_keys.insert(server.to_string(), set);
    }
    match ruma::signatures::verify_event(&public_keys, &json, &rules) {
        Ok(Verified::All) => Ok(json),
        Ok(Verified::Signatures) => {
            ruma::canonical_json::redact(json, &rules.redaction, None).map_err(|e| EventError::Malformed(e.to_string()))
        }
        Err(e) => Err(EventError::Signature(e.to_string())),
    }
}
