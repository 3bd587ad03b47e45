//! The `/_matrix/federation/*` routes. Every route except `version` authenticates the caller
//! with the [`SignedRequest`] extractor before the handler runs.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::auth::SignedRequest;
use super::{membership, peek, reads, send};
use crate::http::resource;

pub fn routes(cfg: &mut web::ServiceConfig) {
    // One scope, so other requests skip these routes after a prefix check; inside it the hot
    // routes (peek renewals, transactions) come first, as actix tries them in order.
    cfg.service(
        web::scope("/_matrix/federation/v1")
            .service(
                resource("/peek/{room_id}/{peek_id}")
                    .route(web::put().to(peek::put))
                    .route(web::delete().to(peek::delete)),
            )
            .service(resource("/send/{txn_id}").route(web::put().to(send::send)))
            .service(resource("/event/{event_id}").route(web::get().to(reads::event)))
            .service(resource("/peek/{room_id}/{peek_id}/renew").route(web::post().to(peek::renew)))
            .service(resource("/version").route(web::get().to(version)))
            .service(resource("/state/{room_id}").route(web::get().to(reads::room_state)))
            .service(resource("/state_ids/{room_id}").route(web::get().to(reads::room_state_ids)))
            .service(resource("/backfill/{room_id}").route(web::get().to(reads::backfill)))
            .service(resource("/event_auth/{room_id}/{event_id}").route(web::get().to(reads::event_auth)))
            .service(resource("/get_missing_events/{room_id}").route(web::post().to(reads::get_missing_events)))
            .service(resource("/query/directory").route(web::get().to(reads::query_directory)))
            .service(resource("/make_join/{room_id}/{user_id}").route(web::get().to(membership::make_join)))
            .service(resource("/send_join/{room_id}/{event_id}").route(web::put().to(membership::send_join_v1)))
            .service(resource("/make_leave/{room_id}/{user_id}").route(web::get().to(membership::make_leave)))
            .service(resource("/send_leave/{room_id}/{event_id}").route(web::put().to(membership::send_leave_v1))),
    )
    .service(
        web::scope("/_matrix/federation/v2")
            .service(resource("/send_join/{room_id}/{event_id}").route(web::put().to(membership::send_join_v2)))
            .service(resource("/send_leave/{room_id}/{event_id}").route(web::put().to(membership::send_leave_v2)))
            .service(resource("/invite/{room_id}/{event_id}").route(web::put().to(membership::invite_v2))),
    )
    .service(resource("/_peekgate/federation/v1/whoami").route(web::get().to(whoami)).route(web::post().to(whoami)));
}

/// Unauthenticated, as the spec says.
async fn version() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "server": { "name": "peekgate", "version": env!("CARGO_PKG_VERSION") }
    }))
}

/// Diagnostic: tells an authenticated caller who we think it is (another peekgate's operator can
/// use it to see that we fetch their keys and accept their signatures).
async fn whoami(request: SignedRequest) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "origin": request.origin.as_str(),
        "content": request.body,
    }))
}
