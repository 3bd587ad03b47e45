//! Identifiers that arrive as text (room IDs, room aliases, user IDs): parsed in one place into
//! ruma's validated types, and the one answer to "is this user from that server".

use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, ServerName, UserId};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("Invalid room ID {0:?}")]
    RoomId(String),
    #[error("Invalid room alias {0:?}")]
    RoomAlias(String),
    #[error("{0:?} is neither a room ID nor an alias")]
    NeitherIdNorAlias(String),
    #[error("Invalid user ID: {0}")]
    UserId(String),
}

/// A room named by its ID or by one of its aliases (`/join/{roomIdOrAlias}`, `/peek/...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomRef {
    Id(OwnedRoomId),
    Alias(OwnedRoomAliasId),
}

pub fn room_id(raw: &str) -> Result<OwnedRoomId, IdError> {
    RoomId::parse(raw).map_err(|_| IdError::RoomId(raw.to_owned()))
}

pub fn room_alias(raw: &str) -> Result<OwnedRoomAliasId, IdError> {
    RoomAliasId::parse(raw).map_err(|_| IdError::RoomAlias(raw.to_owned()))
}

/// `#alias:server` or `!opaque:server`, by the sigil.
pub fn room_id_or_alias(raw: &str) -> Result<RoomRef, IdError> {
    match raw.chars().next() {
        Some('#') => room_alias(raw).map(RoomRef::Alias),
        Some('!') => room_id(raw).map(RoomRef::Id),
        _ => Err(IdError::NeitherIdNorAlias(raw.to_owned())),
    }
}

/// A user ID of `server_name` with this localpart.
pub fn local_user(localpart: &str, server_name: &ServerName) -> Result<OwnedUserId, IdError> {
    UserId::parse(format!("@{localpart}:{server_name}")).map_err(|e| IdError::UserId(e.to_string()))
}

/// Whether the user ID `user` (as stored text, e.g. an event's `sender` or a membership's
/// `state_key`) belongs to `server`. A localpart cannot contain `:`, so the server name is
/// everything after the first one (ports included).
pub fn is_user_of(user: &str, server: &str) -> bool {
    user.starts_with('@') && user.split_once(':').is_some_and(|(_, name)| name == server)
}

/// A path segment percent-encoded for a federation URL (room IDs, event IDs, user IDs).
pub fn path_segment(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect::<String>().replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_belong_to_exactly_their_server() {
        assert!(is_user_of("@a:b.example", "b.example"));
        assert!(is_user_of("@a:b.example:8448", "b.example:8448"));
        assert!(!is_user_of("@a:b.example:8448", "b.example"));
        assert!(!is_user_of("@a:xb.example", "b.example"));
        assert!(!is_user_of("@a:c.b.example", "b.example"));
        assert!(!is_user_of("!a:b.example", "b.example"));
        assert!(!is_user_of("", "b.example"));
    }

    #[test]
    fn rooms_by_id_or_alias() {
        assert_eq!(room_id_or_alias("!r:s.example").unwrap(), RoomRef::Id(room_id("!r:s.example").unwrap()));
        assert!(matches!(room_id_or_alias("#a:s.example"), Ok(RoomRef::Alias(_))));
        assert!(matches!(room_id_or_alias("r:s.example"), Err(IdError::NeitherIdNorAlias(_))));
        assert!(matches!(room_id_or_alias("#"), Err(IdError::RoomAlias(_))));
    }
}
