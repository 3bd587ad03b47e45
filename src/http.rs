//! HTTP plumbing shared by every route module: Matrix-shaped 404/405 answers, health and
//! readiness, and the metrics listener's routes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse, Resource, ResponseError};
use bytes::Bytes;
use futures_util::Stream;
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

/// H18: the longest a client may take to send a request body (`http.body_read_timeout_ms`).
/// actix bounds the wait for a request's head, not its body: a client trickling a body byte
/// by byte held a connection and a handler for as long as it liked. After the deadline the body
/// stream fails, the handler gives up reading, and the answer is 408 `M_UNKNOWN`.
pub async fn body_read_deadline(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let timeout = req
        .app_data::<web::Data<AppState>>()
        .map(|state| Duration::from_millis(state.settings.raw.http.body_read_timeout_ms))
        .unwrap_or(Duration::from_secs(30));
    let expired = Arc::new(AtomicBool::new(false));
    let (http_req, payload) = req.into_parts();
    if matches!(payload, Payload::None) {
        // No body (most reads): nothing to time.
        let req = ServiceRequest::from_parts(http_req, payload);
        return Ok(next.call(req).await?.map_into_left_body());
    }
    let deadline = DeadlineBody {
        inner: payload,
        sleep: Box::pin(tokio::time::sleep(timeout)),
        expired: expired.clone(),
        done: false,
    };
    let stream: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> = Box::pin(deadline);
    let req = ServiceRequest::from_parts(http_req, Payload::from(stream));
    let response = next.call(req).await?;
    if !expired.load(Ordering::Acquire) {
        return Ok(response.map_into_left_body());
    }
    tracing::info!(path = response.request().path(), timeout_ms = timeout.as_millis() as u64, "request body too slow");
    let error = MatrixError::new(StatusCode::REQUEST_TIMEOUT, "M_UNKNOWN", "The request body took too long to arrive")
        .already_logged();
    let (http_req, _) = response.into_parts();
    Ok(ServiceResponse::new(http_req, error.error_response()).map_into_right_body())
}

/// A request body that fails once its deadline passes (see [`body_read_deadline`]).
struct DeadlineBody {
    inner: Payload,
    sleep: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
    done: bool,
}

impl Stream for DeadlineBody {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = Pin::new(&mut self.inner).poll_next(cx) {
            self.done = item.is_none();
            return Poll::Ready(item);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.done = true;
            self.expired.store(true, Ordering::Release);
            let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "request body deadline passed");
            return Poll::Ready(Some(Err(PayloadError::Io(timed_out))));
        }
        Poll::Pending
    }
}
