//! Matrix error bodies at the HTTP edge.
//!
//! Library modules return their own typed errors (`thiserror`, each beside its module); this
//! module is the one place that maps them to a [`MatrixError`] (the `From` impls below), which
//! renders as `{"errcode": ..., "error": ...}` with the right status. Internal error text is
//! logged, never sent to a remote server. Only the HTTP edge imports this module.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::{Map, Value};

#[derive(Debug, Clone)]
pub struct MatrixError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub error: String,
    /// Code-specific fields such as `retry_after_ms` or `room_version`.
    pub extra: Map<String, Value>,
    /// Set when whoever created the error already logged it with more context.
    pub logged: bool,
}

impl MatrixError {
    pub fn new(status: StatusCode, errcode: &'static str, error: impl Into<String>) -> Self {
        MatrixError { status, errcode, error: error.into(), extra: Map::new(), logged: false }
    }

    pub fn with_field(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// Marks the error as logged by its creator, so the HTTP edge does not log it again.
    pub fn already_logged(mut self) -> Self {
        self.logged = true;
        self
    }

    pub fn unauthorized(error: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", error)
    }

    pub fn forbidden(error: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", error)
    }

    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", error)
    }

    pub fn unrecognized(status: StatusCode, error: impl Into<String>) -> Self {
        Self::new(status, "M_UNRECOGNIZED", error)
    }

    pub fn bad_json(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", error)
    }

    pub fn not_json(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", error)
    }

    /// 400 `M_MISSING_PARAM` for a required parameter `name`.
    pub fn missing_param(name: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", format!("{name} is required"))
    }

    pub fn invalid_param(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", error)
    }

    /// 429 `M_LIMIT_EXCEEDED`, with when to try again.
    pub fn limit_exceeded(error: impl Into<String>, retry_after_ms: u64) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED", error).with_field("retry_after_ms", retry_after_ms)
    }

    pub fn too_large(error: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", error)
    }

    /// A failure we do not explain to the caller; the cause is logged by whoever maps it.
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", "Internal server error")
    }

    pub fn body(&self) -> Value {
        let mut body = self.extra.clone();
        body.insert("errcode".to_owned(), Value::from(self.errcode));
        body.insert("error".to_owned(), Value::from(self.error.clone()));
        Value::Object(body)
    }
}

impl std::fmt::Display for MatrixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.errcode, self.error)
    }
}

impl ResponseError for MatrixError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        // Every refused request is logged exactly once: here, unless its creator already did.
        if !self.logged {
            tracing::info!(status = self.status.as_u16(), errcode = self.errcode, error = %self.error, "request refused");
        }
        HttpResponse::build(self.status).json(self.body())
    }
}

/// Logs an unexpected internal failure once and turns it into an opaque 500.
pub fn internal_error(context: &str, err: impl std::fmt::Display) -> MatrixError {
    tracing::error!(error = %err, "{context}");
    MatrixError::internal().already_logged()
}

/// Parses a request body: not JSON → `M_NOT_JSON`, JSON of the wrong shape → `M_BAD_JSON`.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, MatrixError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| MatrixError::not_json(format!("Body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(MatrixError::bad_json("Body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| MatrixError::bad_json(e.to_string()))
}

impl From<crate::rooms::RoomError> for MatrixError {
    fn from(e: crate::rooms::RoomError) -> Self {
        use crate::rooms::RoomError as E;
        match e {
            E::NotFound => MatrixError::not_found("Room not found"),
            E::EventNotFound => MatrixError::not_found("Event not found"),
            E::Forbidden(reason) => MatrixError::forbidden(reason),
            E::BadEvent(reason) => MatrixError::bad_json(reason),
            E::MissingPrevEvents(ids) => MatrixError::bad_json(format!("Unknown prev events {ids:?}")),
            E::AliasInUse => MatrixError::new(StatusCode::BAD_REQUEST, "M_ROOM_IN_USE", "Room alias already taken"),
            E::InvalidParam(reason) => MatrixError::invalid_param(reason),
            E::UnsupportedVersion(v) => MatrixError::new(
                StatusCode::BAD_REQUEST,
                "M_UNSUPPORTED_ROOM_VERSION",
                format!("Room version {v} is not supported"),
            ),
            other @ (E::Internal(_) | E::Db(_)) => internal_error("room operation failed", other),
        }
    }
}

impl From<crate::membership::MembershipError> for MatrixError {
    fn from(e: crate::membership::MembershipError) -> Self {
        use crate::membership::MembershipError as E;
        match e {
            E::UnknownRoom => MatrixError::not_found("Unknown room"),
            E::IncompatibleVersion(version) => MatrixError::new(
                StatusCode::BAD_REQUEST,
                "M_INCOMPATIBLE_ROOM_VERSION",
                format!("The room's version {version} is not among those your server offered"),
            )
            .with_field("room_version", version),
            E::Forbidden(reason) => MatrixError::forbidden(reason),
            E::BadEvent(reason) => MatrixError::bad_json(reason),
            E::NotFound(reason) => MatrixError::not_found(reason),
            E::NoJoinServer => MatrixError::not_found("No server to join the room through: give one with `via`"),
            E::JoinFailed(reason) => MatrixError::not_found(format!("No server could join you to the room: {reason}")),
            E::Room(e) => e.into(),
        }
    }
}

impl From<crate::ids::IdError> for MatrixError {
    fn from(e: crate::ids::IdError) -> Self {
        MatrixError::invalid_param(e.to_string())
    }
}

impl From<crate::accounts::AccountError> for MatrixError {
    fn from(e: crate::accounts::AccountError) -> Self {
        use crate::accounts::AccountError as E;
        match e {
            E::UserInUse => MatrixError::new(StatusCode::BAD_REQUEST, "M_USER_IN_USE", "User ID already taken"),
            E::InvalidUsername(reason) => MatrixError::new(StatusCode::BAD_REQUEST, "M_INVALID_USERNAME", reason),
            E::BadCredentials => MatrixError::forbidden("Invalid username or password"),
            E::UnknownToken => MatrixError::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "Unknown access token"),
            E::LimitExceeded { retry_after_ms } => MatrixError::limit_exceeded("Too many attempts", retry_after_ms),
            other @ (E::Hash(_) | E::Db(_)) => internal_error("account operation failed", other),
        }
    }
}

impl From<crate::peeks::inbound::PeekError> for MatrixError {
    fn from(e: crate::peeks::inbound::PeekError) -> Self {
        match e {
            crate::peeks::inbound::PeekError::Acl(_) => MatrixError::forbidden("Server ACL forbids this server"),
            crate::peeks::inbound::PeekError::UnknownRoom => MatrixError::not_found("Unknown room"),
            crate::peeks::inbound::PeekError::InvalidPeekId => {
                MatrixError::unrecognized(StatusCode::BAD_REQUEST, "Invalid peek ID")
            }
            crate::peeks::inbound::PeekError::IncompatibleVersion(version) => MatrixError::new(
                StatusCode::BAD_REQUEST,
                "M_INCOMPATIBLE_ROOM_VERSION",
                "Peeking server does not support this room version",
            )
            .with_field("room_version", version),
            crate::peeks::inbound::PeekError::NotPeekable(why) => MatrixError::forbidden(why),
            crate::peeks::inbound::PeekError::LimitExceeded { retry_after_ms } => {
                MatrixError::limit_exceeded("Too many peeks", retry_after_ms)
            }
            crate::peeks::inbound::PeekError::StillEnding => MatrixError::limit_exceeded(
                "The previous peek with this ID is still delivering its last events; retry shortly",
                crate::peeks::inbound::STILL_ENDING_RETRY_MS,
            ),
            crate::peeks::inbound::PeekError::NoSuchPeek => MatrixError::not_found("Unknown peek"),
            crate::peeks::inbound::PeekError::Room(room) => room.into(),
        }
    }
}

impl From<crate::peeks::outbound::OutboundError> for MatrixError {
    fn from(e: crate::peeks::outbound::OutboundError) -> Self {
        match e {
            crate::peeks::outbound::OutboundError::IncompatibleVersion(version) => MatrixError::new(
                StatusCode::BAD_REQUEST,
                "M_INCOMPATIBLE_ROOM_VERSION",
                format!("The room's version {version} is not supported by this server"),
            )
            .with_field("room_version", version),
            crate::peeks::outbound::OutboundError::Forbidden(reason) => MatrixError::forbidden(reason),
            crate::peeks::outbound::OutboundError::NotFound(reason) => MatrixError::not_found(reason),
            crate::peeks::outbound::OutboundError::Room(e) => e.into(),
        }
    }
}

impl From<crate::transactions::TransactionError> for MatrixError {
    fn from(e: crate::transactions::TransactionError) -> Self {
        use crate::transactions::TransactionError as E;
        match e {
            E::WrongOrigin | E::TooLarge => MatrixError::bad_json(e.to_string()),
            E::Db(e) => internal_error("receiving a transaction", e),
        }
    }
}

impl From<crate::peeks::local::LocalPeekError> for MatrixError {
    fn from(e: crate::peeks::local::LocalPeekError) -> Self {
        use crate::peeks::local::{LocalPeekError as E, AT_CAP_RETRY_MS};
        match e {
            E::NotFound(what) => MatrixError::not_found(what),
            E::NotPeekable(why) => MatrixError::forbidden(why),
            E::Joined | E::NotPeeking => MatrixError::new(StatusCode::BAD_REQUEST, "M_BAD_STATE", e.to_string()),
            E::AtCap => MatrixError::limit_exceeded(e.to_string(), AT_CAP_RETRY_MS),
            E::Id(e) => e.into(),
            E::Outbound(e) => e.into(),
            E::Room(e) => e.into(),
        }
    }
}
