//! MSC2753 for local devices: `POST /peek/{roomIdOrAlias}`, `POST /rooms/{roomId}/unpeek`
//! (CP-1..7, CP-14) and `GET /sync` (CP-8..12, in [`crate::sync`]).

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Authed;
use crate::accounts::Session;
use crate::clock::now_ms;
use crate::error::{parse_json, MatrixError};
use crate::ids;
use crate::peeks::local;
use crate::state::AppState;
use crate::sync::{self, RoomFilter, SyncParams, Token};

/// CP-16: the lifetime we announce; every `/sync` of the device renews it implicitly (TBD-1).
const PEEK_LIFETIME_MS: i64 = 24 * 3_600_000;

#[derive(Deserialize, Default)]
struct PeekBody {
    /// Revision B's candidate servers.
    #[serde(default)]
    servers: Vec<String>,
}

fn rate_limit(state: &AppState, session: &Session) -> Result<(), MatrixError> {
    state
        .device_peeks
        .check_rate(session.user_id.as_str())
        .map_err(|retry_after_ms| MatrixError::limit_exceeded("Too many peek requests", retry_after_ms))
}

/// An empty body counts as `{}`; anything else must be a JSON object.
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, MatrixError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_json(body)
}

/// `POST /peek/{roomIdOrAlias}` (CP-1..5, OP-1, OP-2); the work is in [`local::start`].
pub async fn peek(
    state: web::Data<AppState>,
    Authed(session): Authed,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, MatrixError> {
    rate_limit(&state, &session)?;
    let target = req.match_info().get("room_id_or_alias").unwrap_or_default();
    let request: PeekBody = optional_body(&body)?;
    let mut servers: Vec<String> = url::form_urlencoded::parse(req.query_string().as_bytes())
        .filter(|(k, _)| k == "server_name")
        .map(|(_, v)| v.into_owned())
        .collect();
    servers.extend(request.servers);
    let room_id = local::start(&state.outbound, &session.user_id, &session.device_id, target, servers).await?;
    Ok(HttpResponse::Ok().json(json!({ "room_id": room_id, "peek_expiry_ts": now_ms() + PEEK_LIFETIME_MS })))
}

/// `POST /rooms/{roomId}/unpeek` (CP-6, CP-7, OP-8); the work is in [`local::stop`].
pub async fn unpeek(
    state: web::Data<AppState>,
    Authed(session): Authed,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, MatrixError> {
    rate_limit(&state, &session)?;
    let room_id = ids::room_id(&path)?;
    let _: Value = parse_json(if body.is_empty() { b"{}" } else { &body })?;
    local::stop(&state.outbound, &session.user_id, &session.device_id, &room_id).await?;
    Ok(HttpResponse::Ok().json(json!({})))
}

#[derive(Deserialize)]
pub struct SyncQuery {
    since: Option<String>,
    timeout: Option<u64>,
    filter: Option<String>,
}

/// Timeline events per room when the filter does not say.
const DEFAULT_TIMELINE_LIMIT: i64 = 20;
const MAX_TIMELINE_LIMIT: i64 = 1000;

/// `GET /sync`. An inline JSON filter's `room.timeline.limit` and
/// `room.state.lazy_load_members` are honoured; other filter fields and stored filter IDs are
/// ignored.
pub async fn sync(
    state: web::Data<AppState>,
    Authed(session): Authed,
    query: web::Query<SyncQuery>,
) -> Result<HttpResponse, MatrixError> {
    let since = match &query.since {
        Some(raw) => {
            Some(Token::parse(raw).ok_or_else(|| MatrixError::invalid_param(format!("Invalid since token {raw:?}")))?)
        }
        None => None,
    };
    let filter = query.filter.as_deref().and_then(|f| serde_json::from_str::<Value>(f).ok()).unwrap_or_default();
    let filter = RoomFilter {
        limit: filter["room"]["timeline"]["limit"]
            .as_i64()
            .unwrap_or(DEFAULT_TIMELINE_LIMIT)
            .clamp(1, MAX_TIMELINE_LIMIT),
        lazy_members: filter["room"]["state"]["lazy_load_members"] == true,
    };
    let params = SyncParams { since, timeout: Duration::from_millis(query.timeout.unwrap_or(0)), filter };
    Ok(HttpResponse::Ok().json(sync::sync(&state.sync_context(), &session, params).await?))
}
