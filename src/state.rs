//! What every request handler and background task shares, built once at start-up.

use std::sync::Arc;

use crate::accounts::Accounts;
use crate::config::Settings;
use crate::db::Db;
use crate::federation::client::FederationClient;
use crate::keys::{RemoteKeys, SigningKey};
use crate::metrics::Metrics;
use crate::peeks::inbound::InboundPeeks;
use crate::rooms::Rooms;

pub struct AppState {
    pub settings: Settings,
    pub db: Db,
    pub key: Arc<SigningKey>,
    pub keys: RemoteKeys,
    pub federation: Arc<FederationClient>,
    pub metrics: Metrics,
    pub rooms: Rooms,
    pub accounts: Accounts,
    pub inbound: InboundPeeks,
}
