//! What can go wrong with a room operation; `error` maps it to Matrix errors at the HTTP edge.

use crate::db::DbError;

#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    #[error("room not found")]
    NotFound,
    #[error("event not found")]
    EventNotFound,
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("bad event: {0}")]
    BadEvent(String),
    #[error("prev events unknown: {0:?}")]
    MissingPrevEvents(Vec<String>),
    #[error("alias already in use")]
    AliasInUse,
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    #[error("unsupported room version {0}")]
    UnsupportedVersion(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for RoomError {
    fn from(e: diesel::result::Error) -> Self {
        RoomError::Db(DbError::Query(e))
    }
}
