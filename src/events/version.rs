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
    /// MSC4289, MSC4291, MSC4297: the room ID is the create event's reference hash (the create
    /// event has no `room_id` and is in no event's `auth_events`); the creators have unlimited
    /// power; state resolution v2.1.
    V12,
}

impl RoomVersion {
    pub const SUPPORTED: [RoomVersion; 3] = [RoomVersion::V10, RoomVersion::V11, RoomVersion::V12];

    pub fn parse(id: &str) -> Option<RoomVersion> {
        match id {
            "10" => Some(RoomVersion::V10),
            "11" => Some(RoomVersion::V11),
            "12" => Some(RoomVersion::V12),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RoomVersion::V10 => "10",
            RoomVersion::V11 => "11",
            RoomVersion::V12 => "12",
        }
    }

    pub fn id(self) -> ruma::RoomVersionId {
        match self {
            RoomVersion::V10 => ruma::RoomVersionId::V10,
            RoomVersion::V11 => ruma::RoomVersionId::V11,
            RoomVersion::V12 => ruma::RoomVersionId::V12,
        }
    }

    pub fn rules(self) -> RoomVersionRules {
        match self {
            RoomVersion::V10 => RoomVersionRules::V10,
            RoomVersion::V11 => RoomVersionRules::V11,
            RoomVersion::V12 => RoomVersionRules::V12,
        }
    }

    /// Room version 12 on: the room ID is `!` and the create event's reference hash, and the
    /// create event carries no `room_id`.
    pub fn room_id_is_create_hash(self) -> bool {
        self.rules().authorization.room_create_event_id_as_room_id
    }
}
