//! OP-1: which servers to ask, in order: the client's, the alias's server and its directory
//! answer, the room ID's server; and the paths of a peek on one of them.

use super::*;

/// Candidate targets tried for one room (H16): each costs up to a request timeout, and the
/// lists come from clients and directory answers.
pub const MAX_CANDIDATES: usize = 10;

/// OP-1: the ordered, de-duplicated candidate targets, without our own name, at most
/// [`MAX_CANDIDATES`].
pub fn candidates<'a>(ours: &ServerName, lists: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for server in lists {
        if out.len() == MAX_CANDIDATES {
            break;
        }
        let valid = ServerName::parse(server).is_ok();
        if valid && server != ours.as_str() && !out.iter().any(|s| s == server) {
            out.push(server.to_owned());
        }
    }
    out
}

pub(super) fn enc(segment: &str) -> String {
    crate::ids::path_segment(segment)
}

pub(super) fn peek_path(room_id: &str, peek_id: &str, with_versions: bool) -> String {
    let mut path = format!("/_matrix/federation/v1/peek/{}/{}", enc(room_id), enc(peek_id));
    if with_versions {
        let versions: Vec<String> = RoomVersion::SUPPORTED.iter().map(|v| format!("ver={}", v.as_str())).collect();
        path = format!("{path}?{}", versions.join("&"));
    }
    path
}

pub(super) fn server(name: &str) -> Result<OwnedServerName, OutboundError> {
    ServerName::parse(name).map_err(|_| OutboundError::NotFound(format!("invalid server name {name:?}")))
}

/// Resolves an alias of another server through its `/query/directory` (CP-2, OP-1.2): the room
/// and the servers the directory suggests.
pub async fn resolve_alias(
    state: &OutboundPeeks,
    alias: &RoomAliasId,
) -> Result<(OwnedRoomId, Vec<String>), OutboundError> {
    let path = format!("/_matrix/federation/v1/query/directory?room_alias={}", enc(alias.as_str()));
    let answer = match state.federation.get(alias.server_name(), &path).await {
        Ok(answer) => answer,
        Err(e) if e.status() == Some(404) => return Err(OutboundError::NotFound("Room alias not found".into())),
        Err(e) => {
            tracing::info!(%alias, error = %e, "directory query failed");
            return Err(OutboundError::NotFound(format!("Cannot resolve the alias: {}", alias.server_name())));
        }
    };
    let room_id = answer["room_id"]
        .as_str()
        .and_then(|r| RoomId::parse(r).ok())
        .ok_or_else(|| OutboundError::NotFound("The directory answer has no valid room_id".into()))?;
    let servers = answer["servers"]
        .as_array()
        .map(|s| s.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    Ok((room_id, servers))
}

/// Candidates for re-establishing a room's peek: those remembered, else the room ID's server.
pub async fn remembered_candidates(state: &OutboundPeeks, room_id: &RoomId) -> Result<Vec<String>, RoomError> {
    let mut list = get(state, room_id).await?.map(|p| p.candidates()).unwrap_or_default();
    if let Some(server) = room_id.server_name() {
        list.push(server.to_string());
    }
    Ok(candidates(&state.settings.server_name, list.iter().map(String::as_str)))
}
