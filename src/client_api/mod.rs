//! The client-server API for local users, under `/_matrix/client/v3` and `/_matrix/client/r0`.

mod account;
pub mod auth;
mod peek;
pub mod rooms;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::http::resource;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/_matrix/client/versions").route(web::get().to(versions)));
    // MSC2753's unstable prefix carries only the peek routes.
    cfg.service(web::scope("/_matrix/client/unstable/org.matrix.msc2753").configure(peek_routes));
    for prefix in ["/_matrix/client/v3", "/_matrix/client/r0"] {
        cfg.service(web::scope(prefix).configure(scoped_routes).configure(peek_routes));
    }
}

fn peek_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/peek/{room_id_or_alias}").route(web::post().to(peek::peek)))
        .service(resource("/rooms/{room_id}/unpeek").route(web::post().to(peek::unpeek)));
}

fn scoped_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/register").route(web::post().to(account::register)))
        .service(resource("/login").route(web::get().to(account::login_flows)).route(web::post().to(account::login)))
        .service(resource("/account/whoami").route(web::get().to(account::whoami)))
        .service(resource("/logout").route(web::post().to(account::logout)))
        .service(resource("/createRoom").route(web::post().to(rooms::create_room)))
        .service(resource("/rooms/{room_id}/send/{event_type}/{txn_id}").route(web::put().to(rooms::send_event)))
        .service(resource("/rooms/{room_id}/redact/{event_id}/{txn_id}").route(web::put().to(rooms::redact)))
        .service(
            resource("/rooms/{room_id}/state/{event_type}/{state_key:[^/]*}")
                .route(web::put().to(rooms::put_state))
                .route(web::get().to(rooms::get_state)),
        )
        .service(
            resource("/rooms/{room_id}/state/{event_type}")
                .route(web::put().to(rooms::put_state_empty_key))
                .route(web::get().to(rooms::get_state_empty_key)),
        )
        .service(resource("/rooms/{room_id}/state").route(web::get().to(rooms::get_full_state)))
        .service(resource("/join/{room_id_or_alias}").route(web::post().to(rooms::join_by_id_or_alias)))
        .service(resource("/rooms/{room_id}/join").route(web::post().to(rooms::join_by_id)))
        .service(resource("/rooms/{room_id}/leave").route(web::post().to(rooms::leave)))
        .service(resource("/rooms/{room_id}/invite").route(web::post().to(rooms::invite)))
        .service(resource("/rooms/{room_id}/messages").route(web::get().to(rooms::messages)))
        .service(resource("/directory/room/{alias}").route(web::get().to(rooms::directory_lookup)))
        .service(resource("/sync").route(web::get().to(peek::sync)));
}

async fn versions() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "versions": ["r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6"],
        "unstable_features": { "org.matrix.msc2753": true },
    }))
}
