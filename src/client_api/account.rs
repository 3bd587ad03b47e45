//! Registration, login, whoami and logout (client-server API).

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use rand::distr::{Alphanumeric, SampleString};
use ruma::UserId;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Authed;
use crate::accounts::validate_localpart;
use crate::error::{parse_json, MatrixError};
use crate::state::AppState;

#[derive(Deserialize)]
struct RegisterBody {
    username: Option<String>,
    password: Option<String>,
    auth: Option<Value>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
}

/// The user-interactive auth answer: one flow, the `m.login.dummy` stage.
fn dummy_auth_challenge() -> HttpResponse {
    HttpResponse::build(StatusCode::UNAUTHORIZED).json(json!({
        "flows": [{ "stages": ["m.login.dummy"] }],
        "params": {},
        "session": Alphanumeric.sample_string(&mut rand::rng(), 16),
    }))
}

pub async fn register(state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, MatrixError> {
    if state.settings.raw.client.registration != "open" {
        return Err(MatrixError::forbidden("Registration is disabled on this server"));
    }
    let body: RegisterBody = parse_json(&body)?;
    // User-interactive auth with the single m.login.dummy stage.
    if body.auth.as_ref().and_then(|a| a["type"].as_str()) != Some("m.login.dummy") {
        return Ok(dummy_auth_challenge());
    }
    state.accounts.check_registration_rate()?;
    let password = body.password.filter(|p| !p.is_empty()).ok_or_else(|| MatrixError::missing_param("password"))?;
    let localpart = body
        .username
        .unwrap_or_else(|| format!("u{}", Alphanumeric.sample_string(&mut rand::rng(), 10).to_lowercase()));
    let user_id = validate_localpart(&localpart, &state.settings.server_name)?;
    state.accounts.create_user(&user_id, &password, false).await?;
    if body.inhibit_login {
        return Ok(HttpResponse::Ok().json(json!({ "user_id": user_id })));
    }
    let login = state.accounts.open_session(&user_id, body.device_id, body.initial_device_display_name).await?;
    Ok(HttpResponse::Ok().json(json!({
        "user_id": login.user_id,
        "access_token": login.access_token,
        "device_id": login.device_id,
    })))
}

pub async fn login_flows() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "flows": [{ "type": "m.login.password" }] }))
}

#[derive(Deserialize)]
struct LoginBody {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Value>,
    user: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
}

pub async fn login(state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, MatrixError> {
    let body: LoginBody = parse_json(&body)?;
    if body.kind != "m.login.password" {
        return Err(MatrixError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", "Unsupported login type"));
    }
    let user = body
        .identifier
        .as_ref()
        .and_then(|i| i["user"].as_str().map(str::to_owned))
        .or(body.user)
        .ok_or_else(|| MatrixError::missing_param("user"))?;
    let server = &state.settings.server_name;
    let user_id = if user.starts_with('@') {
        UserId::parse(&user).map_err(|_| MatrixError::forbidden("Invalid username or password"))?
    } else {
        validate_localpart(&user, server).map_err(|_| MatrixError::forbidden("Invalid username or password"))?
    };
    if user_id.server_name() != server {
        return Err(MatrixError::forbidden("Invalid username or password"));
    }
    let password = body.password.unwrap_or_default();
    let login = state.accounts.login(&user_id, &password, body.device_id, body.initial_device_display_name).await?;
    Ok(HttpResponse::Ok().json(json!({
        "user_id": login.user_id,
        "access_token": login.access_token,
        "device_id": login.device_id,
        "home_server": server.as_str(),
    })))
}

pub async fn whoami(Authed(session): Authed) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "user_id": session.user_id, "device_id": session.device_id }))
}

pub async fn logout(state: web::Data<AppState>, Authed(session): Authed) -> Result<HttpResponse, MatrixError> {
    state.accounts.logout(&session).await?;
    // CP-13: the device's peeks end with it (and federation peeks nobody else watches).
    let rooms = state
        .device_peeks
        .end_device(session.user_id.as_str(), &session.device_id, crate::peeks::devices::END_LOGOUT)
        .await?;
    for room in rooms {
        if let Ok(room_id) = ruma::RoomId::parse(&room) {
            crate::peeks::outbound::release_if_unwatched(&state.outbound, &room_id).await?;
        }
    }
    Ok(HttpResponse::Ok().json(json!({})))
}
