//! The access-token extractor for client routes: `Authorization: Bearer <token>` or the
//! deprecated `?access_token=` query parameter.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header::AUTHORIZATION;
use actix_web::http::StatusCode;
use actix_web::{web, FromRequest, HttpRequest};

use crate::accounts::Session;
use crate::error::MatrixError;
use crate::state::AppState;

/// A request from a logged-in local user.
pub struct Authed(pub Session);

fn token(req: &HttpRequest) -> Option<String> {
    if let Some(header) = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return header.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    url::form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.into_owned())
}

impl FromRequest for Authed {
    type Error = MatrixError;
    type Future = Pin<Box<dyn Future<Output = Result<Authed, MatrixError>>>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let token = token(req);
        Box::pin(async move {
            let state = state.ok_or_else(MatrixError::internal)?;
            let token = token
                .ok_or_else(|| MatrixError::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "Missing access token"))?;
            Ok(Authed(state.accounts.authenticate(&token).await?))
        })
    }
}
