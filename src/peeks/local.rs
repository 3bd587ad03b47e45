//! MSC2753 for local devices: a device starts or stops peeking a room (CP-1..7, OP-1, OP-2,
//! OP-8). Our own world-readable rooms are peeked without federation; a room of another server
//! gets one federation peek shared by every local device ([`super::outbound`]).

use ruma::{OwnedRoomId, RoomAliasId, RoomId, UserId};

use super::devices::{self, Started};
use super::outbound::{self, OutboundError, OutboundPeeks};
use crate::ids::{self, IdError, RoomRef};
use crate::rooms::RoomError;

/// A device at `client.peek.max_per_device` (or its user at `max_per_user`) peeks is told to
/// retry after this long.
pub const AT_CAP_RETRY_MS: u64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum LocalPeekError {
    #[error("{0}")]
    NotFound(&'static str),
    /// CP-3: not world-readable, or encrypted.
    #[error("{0}")]
    NotPeekable(String),
    /// CP-10: a joined room is in the join section of `/sync`, not peeked.
    #[error("You are joined to this room; it is in the join section of /sync")]
    Joined,
    #[error("This device is not peeking the room")]
    NotPeeking,
    /// CP-14: the device peeks `client.peek.max_per_device` rooms already.
    #[error("This device peeks too many rooms")]
    AtCap,
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Outbound(#[from] OutboundError),
    #[error(transparent)]
    Room(#[from] RoomError),
}

/// `/peek`: resolves `target` (a room ID or alias), makes sure the room can be read (our own,
/// or through its federation peek), and records the device's peek. Returns the room ID.
pub async fn start(
    state: &OutboundPeeks,
    user_id: &UserId,
    device_id: &str,
    target: &str,
    client_servers: Vec<String>,
) -> Result<OwnedRoomId, LocalPeekError> {
    let (room_id, candidates) = resolve(state, target, client_servers).await?;
    if state.rooms.membership(&room_id, user_id).await?.as_deref() == Some("join") {
        return Err(LocalPeekError::Joined);
    }
    // A device that peeks is active: it counts as live for TBD-1 before its first sync.
    state.device_peeks.touch_device(user_id.as_str(), device_id).await?;
    let local = state.rooms.room(&room_id).await?.is_some_and(|r| r.is_local);
    // A room of another server: its federation peek, and the room's lock held until this
    // device's peek is recorded (else the renewal job could cancel the new federation peek
    // for want of a device in between).
    let mut room_guard = None;
    if !local {
        if room_id.server_name() == Some(&*state.settings.server_name) {
            return Err(LocalPeekError::NotFound("Room not found"));
        }
        let (gappy, guard) = outbound::ensure_held(state, &room_id, candidates).await?;
        room_guard = Some(guard);
        if gappy {
            // Re-established after a gap: every device still peeking gets a limited timeline.
            state.device_peeks.mark_gappy(room_id.as_str()).await?;
        }
    }
    crate::pause::point(crate::pause::points::DEVICE_PEEK_RECORD, room_id.as_str()).await;
    // CP-3 is checked in our copy of the current state (a reused federation peek may be older
    // than a visibility change) when the peek is recorded, under the append lock (H1).
    let limits = &state.settings.raw.client.peek;
    let caps = devices::Caps { per_device: limits.max_per_device.into(), per_user: limits.max_per_user.into() };
    let started = state.device_peeks.start(user_id.as_str(), device_id, room_id.as_str(), caps).await?;
    drop(room_guard);
    let refused = match started {
        Started::AtCap => Some(LocalPeekError::AtCap),
        Started::NotPeekable(why) => Some(LocalPeekError::NotPeekable(why.to_owned())),
        Started::New | Started::Already => None,
    };
    if let Some(refused) = refused {
        if !local {
            outbound::release_if_unwatched(state, &room_id).await?;
        }
        return Err(refused);
    }
    tracing::info!(room = %room_id, device = %device_id, ?started, "device peek");
    Ok(room_id)
}

/// `/unpeek`: ends the device's peek; the room's federation peek ends with its last device.
pub async fn stop(
    state: &OutboundPeeks,
    user_id: &UserId,
    device_id: &str,
    room_id: &RoomId,
) -> Result<(), LocalPeekError> {
    if state.rooms.room(room_id).await?.is_none() {
        return Err(LocalPeekError::NotFound("Room not found"));
    }
    if !state.device_peeks.end(user_id.as_str(), device_id, room_id.as_str(), devices::END_UNPEEK).await? {
        return Err(LocalPeekError::NotPeeking);
    }
    outbound::release_if_unwatched(state, room_id).await?;
    Ok(())
}

/// CP-2, OP-1: the room ID and the ordered candidate servers for a room ID or an alias (also
/// what a client's join of a room of another server goes through, JN-6).
pub async fn resolve(
    state: &OutboundPeeks,
    target: &str,
    client_servers: Vec<String>,
) -> Result<(OwnedRoomId, Vec<String>), LocalPeekError> {
    let room_id = match ids::room_id_or_alias(target)? {
        RoomRef::Id(room_id) => room_id,
        RoomRef::Alias(alias) => return resolve_alias(state, &alias, client_servers).await,
    };
    let room_server = room_id.server_name().map(|s| s.to_string());
    let lists = client_servers.iter().map(String::as_str).chain(room_server.as_deref());
    let candidates = outbound::candidates(&state.settings.server_name, lists);
    Ok((room_id, candidates))
}

/// OP-1 for an alias: ours resolve here; others through their server's directory, with the
/// alias's server and the directory's answer as candidates after the client's.
async fn resolve_alias(
    state: &OutboundPeeks,
    alias: &RoomAliasId,
    client_servers: Vec<String>,
) -> Result<(OwnedRoomId, Vec<String>), LocalPeekError> {
    let ours = &state.settings.server_name;
    if alias.server_name() == &**ours {
        let room_id = state.rooms.resolve_alias(alias.as_str()).await?;
        return Ok((room_id.ok_or(LocalPeekError::NotFound("Room alias not found"))?, Vec::new()));
    }
    let (room_id, directory) = outbound::resolve_alias(state, alias).await?;
    let alias_server = alias.server_name().to_string();
    let room_server = room_id.server_name().map(|s| s.to_string());
    let lists = client_servers
        .iter()
        .map(String::as_str)
        .chain([alias_server.as_str()])
        .chain(directory.iter().map(String::as_str))
        .chain(room_server.as_deref());
    let candidates = outbound::candidates(ours, lists);
    Ok((room_id, candidates))
}
