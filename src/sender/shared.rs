//! The types the sender's manager, queue and workers share: the context handed over at
//! start-up, the shared state of one running sender, and a prepared transaction body.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::config::Settings;
use crate::db::Db;
use crate::federation::client::FederationClient;
use crate::metrics::Metrics;
use crate::rooms::Rooms;

/// What the sender needs from the rest of the server, handed over at start-up.
pub struct SenderContext {
    /// This process among the instances sharing the database (leases name it).
    pub instance_id: String,
    pub settings: Settings,
    pub db: Db,
    /// New events: the sender waits on the stream position and reads rooms' joined servers.
    pub rooms: Arc<Rooms>,
    pub federation: Arc<FederationClient>,
    pub metrics: Arc<Metrics>,
    /// Bumped when an operator resets a destination: backing-off workers re-check at once.
    pub destination_resets: watch::Receiver<u64>,
}

/// A transaction body serialised once for every destination that gets the same PDUs.
pub(crate) struct Prepared {
    /// The worker's cursor this body follows, and the cursor after it.
    pub from: i64,
    pub to: i64,
    /// `None`: nothing for this destination between `from` and `to`; just move the cursor.
    pub body: Option<Arc<PreparedBody>>,
}

pub(crate) struct PreparedBody {
    pub txn_id: String,
    pub json: Bytes,
    pub canonical: String,
    pub pdus: usize,
}

pub(crate) struct Shared {
    pub state: SenderContext,
    pub instance: String,
    pub txn_counter: AtomicU64,
    pub started_ms: i64,
    pub shutdown: watch::Receiver<bool>,
    /// Cursor moves to persist in bulk.
    pub progress: mpsc::UnboundedSender<(String, i64)>,
    /// Bodies handed to workers and not yet handled: under load the manager lets new events
    /// pile up into bigger transactions instead of fanning out many small ones.
    pub in_flight: AtomicUsize,
}

impl Shared {
    pub fn next_txn_id(&self) -> String {
        format!("{}-{}", self.started_ms, self.txn_counter.fetch_add(1, Ordering::Relaxed))
    }
}
