//! `/_peekgate/admin/v1/`: the admin views over HTTP, for access tokens of admin users only
//! (`peekgate user create ... --admin`).

use actix_web::{web, HttpResponse};
use ruma::RoomId;
use serde_json::{json, Value};

use crate::client_api::auth::Authed;
use crate::clock::now_ms;
use crate::error::{internal_error, MatrixError};
use crate::http::resource;
use crate::peeks::{devices, outbound};
use crate::state::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/_peekgate/admin/v1")
            .service(resource("/peeks").route(web::get().to(list_peeks)))
            .service(resource("/peeks/inbound/{origin}/{room_id}/{peek_id}").route(web::delete().to(end_inbound)))
            .service(resource("/peeks/outbound/{room_id}").route(web::delete().to(end_outbound)))
            .service(resource("/peeks/device/{user_id}/{device_id}/{room_id}").route(web::delete().to(end_device)))
            .service(resource("/destinations").route(web::get().to(list_destinations)))
            .service(resource("/destinations/{server}/reset").route(web::post().to(reset_destination))),
    );
}

/// A request from an admin user.
struct Admin;

fn require_admin(authed: Authed) -> Result<Admin, MatrixError> {
    if authed.0.is_admin {
        Ok(Admin)
    } else {
        Err(MatrixError::forbidden("This endpoint is for server admins"))
    }
}

async fn list_peeks(state: web::Data<AppState>, authed: Authed) -> Result<HttpResponse, MatrixError> {
    require_admin(authed)?;
    let report = super::peeks(&state.db).await.map_err(|e| internal_error("listing peeks", e))?;
    Ok(HttpResponse::Ok().json(report))
}

async fn list_destinations(state: web::Data<AppState>, authed: Authed) -> Result<HttpResponse, MatrixError> {
    require_admin(authed)?;
    let now = now_ms();
    let list = super::destinations(&state.db).await.map_err(|e| internal_error("listing destinations", e))?;
    let rows: Vec<Value> = list
        .iter()
        .map(|d| {
            let mut row = serde_json::to_value(d).expect("serialisable");
            row["backing_off"] = Value::from(d.backing_off(now));
            row
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "destinations": rows })))
}

/// Clears the back-off and wakes this instance's sender for the destination at once.
async fn reset_destination(
    state: web::Data<AppState>,
    authed: Authed,
    path: web::Path<String>,
) -> Result<HttpResponse, MatrixError> {
    require_admin(authed)?;
    let server = path.into_inner();
    if !super::reset_destination(&state.db, &server).await.map_err(|e| internal_error("resetting a destination", e))? {
        return Err(MatrixError::not_found("Unknown destination"));
    }
    state.destination_resets.send_modify(|count| *count += 1);
    tracing::info!(destination = %server, "destination back-off reset by an admin");
    Ok(HttpResponse::Ok().json(json!({})))
}

async fn end_inbound(
    state: web::Data<AppState>,
    authed: Authed,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, MatrixError> {
    require_admin(authed)?;
    let (origin, room, peek_id) = path.into_inner();
    let ended = crate::peeks::inbound::end_now(&state.db, &origin, &room, &peek_id)
        .await
        .map_err(|e| internal_error("ending an inbound peek", e))?;
    if !ended {
        return Err(MatrixError::not_found("No such live inbound peek"));
    }
    // The next eviction run deletes it and tells the peeker (PE-7).
    Ok(HttpResponse::Ok().json(json!({})))
}

async fn end_outbound(
    state: web::Data<AppState>,
    authed: Authed,
    path: web::Path<String>,
) -> Result<HttpResponse, MatrixError> {
    require_admin(authed)?;
    let room_id = RoomId::parse(path.as_str()).map_err(|_| MatrixError::invalid_param("Invalid room ID"))?;
    if outbound::get(&state.outbound, &room_id).await?.is_none_or(|p| p.ended_ts.is_some()) {
        return Err(MatrixError::not_found("No live outbound peek on this room"));
    }
    outbound::cancel(&state.outbound, &room_id).await?;
    Ok(HttpResponse::Ok().json(json!({})))
}

async fn end_device(
    state: web::Data<AppState>,
    authed: Authed,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, MatrixError> {
    require_admin(authed)?;
    let (user, device, room) = path.into_inner();
    let room_id = RoomId::parse(&room).map_err(|_| MatrixError::invalid_param("Invalid room ID"))?;
    if !state.device_peeks.end(&user, &device, &room, devices::END_ADMIN).await? {
        return Err(MatrixError::not_found("No such device peek"));
    }
    outbound::release_if_unwatched(&state.outbound, &room_id).await?;
    Ok(HttpResponse::Ok().json(json!({})))
}
