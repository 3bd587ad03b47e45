//! The room versions we support, with ruma's rules for each, and the error of event checks.

use ruma::room_version_rules::RoomVersionRules;

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("malformed event: {0}")]
    Malformed(String),
    #[error("bad signature: {0}")]
    Signature(String),
    #[error("not authorised: {0}")]
    Unauthorized(String),
}

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

    pub fn id(self) -> ruma::RoomVersionId {
        match self {
            RoomVersion::V10 => ruma::RoomVersionId::V10,
            RoomVersion::V11 => ruma::RoomVersionId::V11,
        }
    }

    pub fn rules(self) -> RoomVersionRules {
        match self {
            RoomVersion::V10 => RoomVersionRules::V10,
            RoomVersion::V11 => RoomVersionRules::V11,
        }
    }
}
