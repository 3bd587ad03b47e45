//! What every request handler and background task shares, built once at start-up.

use std::sync::Arc;

use crate::accounts::Accounts;
use crate::config::Settings;
use crate::db::Db;
use crate::federation::client::FederationClient;
use crate::keys::{RemoteKeys, SigningKey};
use crate::metrics::Metrics;
use crate::peeks::devices::DevicePeeks;
use crate::peeks::inbound::InboundPeeks;
use crate::rooms::Rooms;

pub struct AppState {
    /// This process among the instances sharing the database (leases and claims name it).
    pub instance_id: String,
    pub settings: Settings,
    pub db: Db,
    pub key: Arc<SigningKey>,
    pub keys: RemoteKeys,
    pub federation: Arc<FederationClient>,
    pub metrics: Arc<Metrics>,
    pub rooms: Arc<Rooms>,
    pub accounts: Accounts,
    pub inbound: InboundPeeks,
    pub device_peeks: DevicePeeks,
    pub outbound_locks: crate::peeks::outbound::RoomLocks,
    /// Bumped when an admin resets a destination: backing-off sender workers re-check at once.
    pub destination_resets: tokio::sync::watch::Sender<u64>,
    /// Scheduled jobs whose loop is running (`/ready` wants all of them).
    pub scheduler_jobs: std::sync::atomic::AtomicUsize,
}
