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
use crate::peeks::outbound::OutboundPeeks;
use crate::rooms::Rooms;
use crate::schedule::ScheduleContext;
use crate::sender::SenderContext;
use crate::sync::SyncContext;
use crate::transactions::Inbox;

pub struct AppState {
    /// This process among the instances sharing the database (leases and claims name it).
    pub instance_id: String,
    pub settings: Settings,
    pub db: Db,
    pub key: Arc<SigningKey>,
    pub keys: Arc<RemoteKeys>,
    pub federation: Arc<FederationClient>,
    pub metrics: Arc<Metrics>,
    pub rooms: Arc<Rooms>,
    pub accounts: Accounts,
    pub inbound: Arc<InboundPeeks>,
    pub device_peeks: DevicePeeks,
    pub outbound: OutboundPeeks,
    /// Bumped when an admin resets a destination: backing-off sender workers re-check at once.
    pub destination_resets: tokio::sync::watch::Sender<u64>,
    /// Scheduled jobs whose loop is running (`/ready` wants all of them).
    pub scheduler_jobs: Arc<std::sync::atomic::AtomicUsize>,
}

impl AppState {
    /// What receiving one `/send` transaction borrows.
    pub fn inbox(&self) -> Inbox<'_> {
        Inbox { db: &self.db, rooms: &self.rooms, keys: &self.keys, outbound: &self.outbound, metrics: &self.metrics }
    }

    /// What one `/sync` reads.
    pub fn sync_context(&self) -> SyncContext<'_> {
        SyncContext {
            settings: &self.settings,
            rooms: &self.rooms,
            db: &self.db,
            device_peeks: &self.device_peeks,
            outbound: &self.outbound,
        }
    }

    /// What the sender gets: the parts of the state it delivers with.
    pub fn sender_context(&self) -> SenderContext {
        SenderContext {
            instance_id: self.instance_id.clone(),
            settings: self.settings.clone(),
            db: self.db.clone(),
            rooms: self.rooms.clone(),
            federation: self.federation.clone(),
            metrics: self.metrics.clone(),
            destination_resets: self.destination_resets.subscribe(),
        }
    }

    /// What the scheduled jobs get (also for running a job by hand, as tests and benches do).
    pub fn jobs(&self) -> ScheduleContext {
        ScheduleContext {
            settings: self.settings.clone(),
            db: self.db.clone(),
            metrics: self.metrics.clone(),
            inbound: self.inbound.clone(),
            outbound: self.outbound.clone(),
            jobs_alive: self.scheduler_jobs.clone(),
        }
    }
}
