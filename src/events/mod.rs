//! Events (PDUs): room versions, content hashes and event signatures. Hashing, redaction and
//! signing are ruma's; this module picks the room version's rules so callers cannot mix them.

use ruma::room_version_rules::RoomVersionRules;
use ruma::CanonicalJsonObject;

use crate::keys::SigningKey;

/// The room versions peekgate supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomVersion {
    V10,
    V11,
}

impl RoomVersion {
    pub const SUPPORTED: [RoomVersion; 2] = [RoomVersion::V10, RoomVersion::V11];

    pub fn parse(id: &str) -> Option<RoomVersion> {
        match id {
            "10" => Some(RoomVersion::V10),
            "11" => Some(RoomVersion::V11),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RoomVersion::V10 => "10",
            RoomVersion::V11 => "11",
        }
    }

    pub fn rules(self) -> RoomVersionRules {
        match self {
            RoomVersion::V10 => RoomVersionRules::V10,
            RoomVersion::V11 => RoomVersionRules::V11,
        }
    }
}

/// Adds `hashes.sha256` and our signature over the version's redacted form.
pub fn hash_and_sign(
    key: &SigningKey,
    server_name: &str,
    event: &mut CanonicalJsonObject,
    version: RoomVersion,
) -> Result<(), ruma::signatures::JsonError> {
    ruma::signatures::hash_and_sign_event(
        server_name,
        key.pair(),
        event,
        &version.rules().redaction,
    )
}

/// The unpadded base64 SHA-256 content hash of an event.
pub fn content_hash(event: &CanonicalJsonObject) -> Result<String, ruma::signatures::JsonError> {
    Ok(ruma::signatures::content_hash(event)?.encode())
}
