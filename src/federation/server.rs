//! The `/_matrix/federation/*` routes. Every route except `version` authenticates the caller
//! with the [`SignedRequest`] extractor before the handler runs.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::{peek, reads, send};
use crate::http::resource;
use crate::xmatrix::SignedRequest;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/_matrix/federation/v1/version").route(web::get().to(version)))
        .service(resource("/_matrix/federation/v1/event/{event_id}").route(web::get().to(reads::event)))
        .service(resource("/_matrix/federation/v1/state/{room_id}").route(web::get().to(reads::room_state)))
        .service(resource("/_matrix/federation/v1/state_ids/{room_id}").route(web::get().to(reads::room_state_ids)))
        .service(resource("/_matrix/federation/v1/backfill/{room_id}").route(web::get().to(reads::backfill)))
        .service(
            resource("/_matrix/federation/v1/event_auth/{room_id}/{event_id}").route(web::get().to(reads::event_auth)),
        )
        .service(
            resource("/_matrix/federation/v1/get_missing_events/{room_id}")
                .route(web::post().to(reads::get_missing_events)),
        )
        .service(
            resource("/_matrix/federation/v1/peek/{room_id}/{peek_id}")
                .route(web::put().to(peek::put))
                .route(web::delete().to(peek::delete)),
        )
        .service(resource("/_matrix/federation/v1/peek/{room_id}/{peek_id}/renew").route(web::post().to(peek::renew)))
        .service(resource("/_matrix/federation/v1/send/{txn_id}").route(web::put().to(send::send)))
        .service(resource("/_matrix/federation/v1/query/directory").route(web::get().to(reads::query_directory)))
        .service(
            resource("/_peekgate/federation/v1/whoami").route(web::get().to(whoami)).route(web::post().to(whoami)),
        );
}

/// Unauthenticated, as the spec says.
async fn version() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "server": { "name": "peekgate", "version": env!("CARGO_PKG_VERSION") }
    }))
}

/// Diagnostic: tells an authenticated caller who we think it is. `check-federation` uses it
/// to prove that a remote server can fetch our keys and verify our signatures.
async fn whoami(request: SignedRequest) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "origin": request.origin.as_str(),
        "content": request.body,
    }))
}
