//! `PUT /_matrix/federation/v1/send/{txnId}`: the route; the work is in [`crate::transactions`].

use actix_web::{web, HttpResponse};

use crate::error::MatrixError;
use crate::federation::auth::SignedRequest;
use crate::state::AppState;
use crate::transactions::{self, Transaction};

pub use crate::transactions::{MAX_EDUS, MAX_PDUS};

pub async fn send(
    state: web::Data<AppState>,
    request: SignedRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, MatrixError> {
    if request.body.is_none() {
        return Err(MatrixError::not_json("A transaction body is required"));
    }
    let txn: Transaction = request.json()?;
    let answer = transactions::receive(&state.inbox(), &request.origin, &path, txn).await?;
    Ok(HttpResponse::Ok().json(answer))
}
