//! The one way in for every PDU another server sends us: `/send` transactions, peek answers,
//! `get_missing_events` and `/backfill` answers (and next, `send_join` answers). The checks run
//! cheapest first, so hostile input costs bounded work whatever it lists:
//! 1. format limits (ruma's `check_pdu_format`: 64 KiB canonical size, field lengths, at most 20
//!    `prev_events` and 10 `auth_events`), and at most [`MAX_SIGNATURE_ENTRIES`] signature
//!    entries, before any key is looked up;
//! 2. the room: `room_id` must be the room the PDU arrived for;
//! 3. signatures by the servers the room version requires (keys fetched and cached);
//! 4. the content hash: a mismatch keeps the redacted form, as the spec says, unless the caller
//!    asks for [`Hashes::Strict`] (a peek answer is a room's starting point);
//! 5. the event ID, computed from the reference hash.
//!
//! The auth rules come after intake, where the event's state is known: in the append path for
//! one event, or over the whole answer for a peek answer's state and auth chain.

use ruma::{CanonicalJsonObject, CanonicalJsonValue, RoomId};
use serde_json::Value;

use super::{content_hash, verify_received, EventError, Pdu, RoomVersion};
use crate::keys::RemoteKeys;

/// Signature entries (key IDs over all servers) a PDU may carry; each costs a key lookup.
pub const MAX_SIGNATURE_ENTRIES: usize = 16;

/// How a content hash mismatch is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hashes {
    /// The event is refused: a peek answer is the room's starting point, and a target that
    /// serves altered events is not trusted for any of it.
    Strict,
    /// The redacted form is kept, as for any received PDU.
    Redact,
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("PDU is not a canonical JSON object")]
    NotAnObject,
    #[error("malformed PDU: {0}")]
    Format(String),
    #[error("room_id {0:?} is not the room it was sent for")]
    WrongRoom(String),
    #[error("content hash mismatch")]
    HashMismatch,
    #[error(transparent)]
    Event(#[from] EventError),
}

/// A PDU that failed intake, with the event ID it would have had (for per-PDU answers and logs).
#[derive(Debug, thiserror::Error)]
#[error("event {event_id}: {reason}")]
pub struct Refused {
    pub event_id: String,
    pub reason: IntakeError,
}

/// A received PDU as canonical JSON (the first step of intake).
pub fn parse(raw: Value) -> Result<CanonicalJsonObject, IntakeError> {
    match CanonicalJsonValue::try_from(raw) {
        Ok(CanonicalJsonValue::Object(object)) => Ok(object),
        _ => Err(IntakeError::NotAnObject),
    }
}

/// The event ID of a PDU in a room of `version` (empty when it cannot be computed).
pub fn event_id(object: &CanonicalJsonObject, version: RoomVersion) -> String {
    ruma::signatures::reference_hash(object, &version.rules()).map(|h| format!("${h}")).unwrap_or_default()
}

/// Every check of intake on one PDU for `room_id`, in the order above.
pub async fn check(
    keys: &RemoteKeys,
    room_id: &RoomId,
    version: RoomVersion,
    object: CanonicalJsonObject,
    hashes: Hashes,
) -> Result<Pdu, IntakeError> {
    check_format(&object, version)?;
    let claimed = match object.get("room_id") {
        Some(CanonicalJsonValue::String(claimed)) => claimed.to_owned(),
        // v12: a create event names no room; the room's ID is its reference hash.
        None if version.room_id_is_create_hash()
            && object.get("type") == Some(&CanonicalJsonValue::String("m.room.create".into())) =>
        {
            format!("!{}", event_id(&object, version).trim_start_matches('$'))
        }
        _ => String::new(),
    };
    if claimed != room_id.as_str() {
        return Err(IntakeError::WrongRoom(claimed));
    }
    if hashes == Hashes::Strict {
        let expected = match object.get("hashes") {
            Some(CanonicalJsonValue::Object(h)) => match h.get("sha256") {
                Some(CanonicalJsonValue::String(s)) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        };
        let actual = content_hash(&object).map_err(|e| IntakeError::Format(e.to_string()))?;
        if expected.as_deref() != Some(actual.as_str()) {
            return Err(IntakeError::HashMismatch);
        }
    }
    let verified = verify_received(keys, object, version).await?;
    Ok(Pdu::from_federation(verified, version)?)
}

/// [`parse`], [`event_id`] and [`check`] for a PDU as it arrived.
pub async fn check_raw(
    keys: &RemoteKeys,
    room_id: &RoomId,
    version: RoomVersion,
    raw: Value,
    hashes: Hashes,
) -> Result<Pdu, Refused> {
    let object = parse(raw).map_err(|reason| Refused { event_id: String::new(), reason })?;
    let event_id = event_id(&object, version);
    check(keys, room_id, version, object, hashes).await.map_err(|reason| Refused { event_id, reason })
}

/// Step 1: the version's format rules and the signature-entry cap, before any key lookup.
fn check_format(object: &CanonicalJsonObject, version: RoomVersion) -> Result<(), IntakeError> {
    ruma::state_res::check_pdu_format(object, &version.rules().event_format).map_err(IntakeError::Format)?;
    let entries = match object.get("signatures") {
        Some(CanonicalJsonValue::Object(by_server)) => by_server
            .values()
            .map(|keys| match keys {
                CanonicalJsonValue::Object(keys) => keys.len(),
                _ => 1,
            })
            .sum(),
        _ => 0,
    };
    if entries > MAX_SIGNATURE_ENTRIES {
        return Err(IntakeError::Format(format!("{entries} signature entries (at most {MAX_SIGNATURE_ENTRIES})")));
    }
    Ok(())
}
