//! Key routes: our publication (`/_matrix/key/v2/server`) and the notary query endpoints.
//! None of them needs authentication.

use std::collections::BTreeMap;

use actix_web::{web, HttpResponse};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedServerName};
use serde::Deserialize;

use crate::clock::now_ms;
use crate::error::{internal_error, parse_json, MatrixError};
use crate::state::AppState;

/// Servers one notary query may name.
const MAX_SERVERS_PER_QUERY: usize = 100;
/// Servers one (unauthenticated) notary query may make us fetch from (H14); the others are
/// answered from the cache.
pub const MAX_FETCHES_PER_QUERY: usize = 5;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/_matrix/key/v2/server", web::get().to(own_keys))
        .route("/_matrix/key/v2/query", web::post().to(query_post))
        .route("/_matrix/key/v2/query/{server_name}", web::get().to(query_get));
}

/// Our key response, signed now, valid for `signing.key_validity_ms`.
pub fn own_publication(state: &AppState) -> CanonicalJsonObject {
    let settings = &state.settings;
    let valid_until = now_ms() + settings.raw.signing.key_validity_ms as i64;
    state.key.publication(settings.server_name.as_str(), valid_until, &settings.raw.signing.old_keys)
}

async fn own_keys(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(own_publication(&state))
}

#[derive(Deserialize)]
struct QueryBody {
    server_keys: BTreeMap<String, BTreeMap<String, KeyCriteria>>,
}

#[derive(Deserialize, Default)]
struct KeyCriteria {
    minimum_valid_until_ts: Option<i64>,
}

async fn query_post(state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, MatrixError> {
    let query: QueryBody = parse_json(&body)?;
    if query.server_keys.len() > MAX_SERVERS_PER_QUERY {
        return Err(MatrixError::invalid_param(format!("At most {MAX_SERVERS_PER_QUERY} servers per query")));
    }
    let mut wanted = Vec::new();
    for (server, criteria) in query.server_keys {
        let server = OwnedServerName::try_from(server.as_str())
            .map_err(|_| MatrixError::invalid_param(format!("Invalid server name {server:?}")))?;
        let minimum = criteria.values().filter_map(|c| c.minimum_valid_until_ts).max();
        wanted.push((server, minimum));
    }
    notary_answer(&state, wanted).await
}

#[derive(Deserialize)]
struct QueryParams {
    minimum_valid_until_ts: Option<i64>,
}

async fn query_get(
    state: web::Data<AppState>,
    path: web::Path<String>,
    params: web::Query<QueryParams>,
) -> Result<HttpResponse, MatrixError> {
    let server =
        OwnedServerName::try_from(path.as_str()).map_err(|_| MatrixError::invalid_param("Invalid server name"))?;
    notary_answer(&state, vec![(server, params.minimum_valid_until_ts)]).await
}

/// Each known response, counter-signed by us. Servers we cannot get keys for are left out.
async fn notary_answer(
    state: &web::Data<AppState>,
    wanted: Vec<(OwnedServerName, Option<i64>)>,
) -> Result<HttpResponse, MatrixError> {
    let mut server_keys = Vec::new();
    let mut fetch_budget = MAX_FETCHES_PER_QUERY;
    for (server, minimum) in wanted {
        let minimum = minimum.unwrap_or_else(now_ms);
        let found = state
            .keys
            .notary_lookup(&server, minimum, &mut fetch_budget, || own_publication(state))
            .await
            .map_err(|e| internal_error("notary lookup", e))?;
        if let Some(mut object) = found {
            state.key.sign_json(state.settings.server_name.as_str(), &mut object);
            server_keys.push(CanonicalJsonValue::Object(object));
        }
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "server_keys": server_keys })))
}
