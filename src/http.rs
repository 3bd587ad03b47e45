//! HTTP plumbing shared by every route module: Matrix-shaped 404/405 answers, health and
//! readiness, and the metrics listener's routes.

use actix_web::{web, HttpResponse, Resource};
use serde_json::json;

use crate::error::MatrixError;
use crate::state::AppState;

/// A resource whose unsupported methods answer 405 `M_UNRECOGNIZED`, as the spec says.
pub fn resource(path: &str) -> Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

async fn method_not_allowed() -> Result<HttpResponse, MatrixError> {
    Err(MatrixError::unrecognized(actix_web::http::StatusCode::METHOD_NOT_ALLOWED, "Unsupported method"))
}

/// Query strings that do not fit a handler's parameters answer 400 `M_INVALID_PARAM` (actix
/// would answer plain text).
pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default()
        .error_handler(|err, _| MatrixError::invalid_param(format!("Invalid query parameter: {err}")).into())
}

/// Path segments that do not fit a handler's parameters answer 400 `M_INVALID_PARAM`.
pub fn path_config() -> web::PathConfig {
    web::PathConfig::default()
        .error_handler(|err, _| MatrixError::invalid_param(format!("Invalid path parameter: {err}")).into())
}

/// Unknown endpoints answer 404 `M_UNRECOGNIZED`.
pub async fn not_found() -> Result<HttpResponse, MatrixError> {
    Err(MatrixError::unrecognized(actix_web::http::StatusCode::NOT_FOUND, "Unrecognized request"))
}

pub fn health_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/health").route(web::get().to(health)))
        .service(resource("/ready").route(web::get().to(ready)))
        .service(resource("/.well-known/matrix/server").route(web::get().to(well_known)));
}

/// Liveness: the process answers.
async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Readiness: the database answers a query and every scheduled job is running (the key is
/// loaded before we listen at all).
async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let jobs = state.scheduler_jobs.load(std::sync::atomic::Ordering::Acquire);
    let scheduler = if jobs >= crate::schedule::JOBS { "running" } else { "stopped" };
    match state.db.ping().await {
        Ok(()) if scheduler == "running" => HttpResponse::Ok()
            .json(json!({ "status": "ready", "database": "ok", "signing_key": "loaded", "scheduler": scheduler })),
        Ok(()) => {
            tracing::warn!(jobs, "readiness check failed: the scheduler is not running");
            HttpResponse::ServiceUnavailable()
                .json(json!({ "status": "not ready", "database": "ok", "scheduler": scheduler }))
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            HttpResponse::ServiceUnavailable()
                .json(json!({ "status": "not ready", "database": "unreachable", "scheduler": scheduler }))
        }
    }
}

/// `/.well-known/matrix/server`, only when `http.well_known_server` is configured.
async fn well_known(state: web::Data<AppState>) -> Result<HttpResponse, MatrixError> {
    match &state.settings.raw.http.well_known_server {
        Some(server) => Ok(HttpResponse::Ok().json(json!({ "m.server": server }))),
        None => Err(MatrixError::not_found("No delegation configured")),
    }
}

pub async fn metrics_text(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(state.metrics.render())
}
