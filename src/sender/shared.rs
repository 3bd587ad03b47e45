//! The types the sender's manager, queue and workers share: the context handed over at
//! start-up, the shared state of one running sender, and a prepared transaction body.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, OnceCell};

use crate::clock::now_ms;
use crate::config::Settings;
use crate::db::Db;
use crate::federation::client::FederationClient;
use crate::metrics::Metrics;
use crate::rooms::Rooms;
use crate::xmatrix::SharedBodyAuthorization;

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
    /// Nothing for the destination lies in `(quiet_from, from]`: a worker anywhere in that span
    /// may take this body (the fan-out passed over events it has no part in without a message).
    pub quiet_from: i64,
    /// Where the body starts, and the worker's cursor after it.
    pub from: i64,
    pub to: i64,
    /// `None`: nothing for this destination between `from` and `to`; just move the cursor.
    pub body: Option<BodyFor>,
}

/// A shared body and the receiving destination's place in its audience.
pub(crate) struct BodyFor {
    pub body: Arc<PreparedBody>,
    pub slot: usize,
}

/// How many destinations' headers are signed together: enough that one field inversion serves
/// them all (see `PrefixSigner::sign_many`), few enough that the first `/send`s of a fan-out
/// are not held up by signing for the last ones (a batch is about half a millisecond).
pub const SIGNING_BATCH: usize = 32;

pub(crate) struct PreparedBody {
    /// `/_matrix/federation/v1/send/{txn_id}`
    pub path: String,
    /// The body's canonical JSON text: what is sent, and what the signature covers.
    pub json: Bytes,
    pub pdus: usize,
    /// Makes the X-Matrix headers, hashing the body once for all of them.
    authorization: SharedBodyAuthorization,
    /// The destinations the body is handed to; a worker's slot indexes this.
    audience: Vec<String>,
    /// The audience's headers, [`SIGNING_BATCH`] to a cell, each signed by the first worker of
    /// its batch that needs it (workers on both threads sign different batches meanwhile).
    headers: Vec<OnceCell<Vec<String>>>,
}

impl PreparedBody {
    pub fn new(
        path: String,
        json: Bytes,
        pdus: usize,
        authorization: SharedBodyAuthorization,
        audience: Vec<String>,
    ) -> Self {
        let headers = (0..audience.len().div_ceil(SIGNING_BATCH)).map(|_| OnceCell::new()).collect();
        PreparedBody { path, json, pdus, authorization, audience, headers }
    }

    /// The `Authorization` header for the destination in `slot` of the audience.
    pub async fn header(&self, slot: usize) -> &str {
        let batch = slot / SIGNING_BATCH;
        let signed = self.headers[batch]
            .get_or_init(|| async {
                let end = self.audience.len().min((batch + 1) * SIGNING_BATCH);
                self.authorization.headers(&self.audience[batch * SIGNING_BATCH..end])
            })
            .await;
        &signed[slot % SIGNING_BATCH]
    }
}

pub(crate) struct Shared {
    pub state: SenderContext,
    pub instance: String,
    pub txn_counter: AtomicU64,
    pub started_ms: i64,
    pub shutdown: watch::Receiver<bool>,
    /// Cursor moves to persist in bulk.
    pub progress: mpsc::UnboundedSender<(String, i64)>,
    /// `federation.sender_lease_ms`: how long a destination's lease lasts unless renewed.
    pub lease_ms: i64,
    /// `federation.sender_idle_ms`: a worker with nothing to send stops after this long.
    pub worker_idle: std::time::Duration,
}

/// A `/send` transaction of ours, ready to sign and send.
pub(crate) struct Transaction {
    /// `/_matrix/federation/v1/send/{txnId}` with a fresh ID.
    pub path: String,
    /// The body's canonical JSON text: what is sent, and what the signature covers.
    pub canonical: String,
    pub pdus: usize,
}

impl Shared {
    pub fn next_txn_id(&self) -> String {
        format!("{}-{}", self.started_ms, self.txn_counter.fetch_add(1, Ordering::Relaxed))
    }

    /// The transaction carrying `pdus` and, for receivers that understand it, the PE-7
    /// `expired_peeks` of `notices` (others ignore unknown keys). Both paths build it here.
    pub fn transaction(&self, pdus: Vec<Value>, notices: &[(String, String)]) -> Result<Transaction, String> {
        let count = pdus.len();
        let mut body = json!({
            "origin": self.state.settings.server_name.as_str(),
            "origin_server_ts": now_ms(),
            "pdus": pdus,
            "edus": [],
        });
        if !notices.is_empty() {
            body["expired_peeks"] =
                notices.iter().map(|(room, peek)| json!({ "room_id": room, "peek_id": peek })).collect();
        }
        let canonical = crate::canonical_json::encode_value(body).map_err(|e| e.to_string())?;
        Ok(Transaction { path: format!("/_matrix/federation/v1/send/{}", self.next_txn_id()), canonical, pdus: count })
    }
}

/// A send running longer than this makes its worker *stalled* (see [`WorkerStatus::stalled`]).
pub(crate) const STALLED_AFTER_MS: i64 = 1_000;

/// What a worker tells the manager about itself, without a round trip.
#[derive(Default)]
pub(crate) struct WorkerStatus {
    /// The cursor in memory (ahead of the database by at most one flush); -1 until read.
    pub cursor: AtomicI64,
    /// When the transaction now being sent was started (0: not sending).
    pub sending_since_ms: AtomicI64,
    /// The last attempt failed and the worker is retrying or backing off.
    pub failing: AtomicBool,
    /// The worker reads its own batches (or is starting): bodies handed to it now would wait.
    pub on_queue_path: AtomicBool,
}

impl WorkerStatus {
    /// A worker starting at its stored `cursor`; `on_queue_path` when it begins with its own
    /// queue (a back-off to wait out).
    pub fn starting_at(cursor: i64, on_queue_path: bool) -> WorkerStatus {
        WorkerStatus {
            cursor: AtomicI64::new(cursor),
            on_queue_path: AtomicBool::new(on_queue_path),
            ..WorkerStatus::default()
        }
    }

    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    pub fn on_queue_path(&self) -> bool {
        self.on_queue_path.load(Ordering::Acquire)
    }

    pub fn cursor(&self) -> i64 {
        self.cursor.load(Ordering::Acquire)
    }

    /// H5: a worker whose peer fails or has kept one transaction waiting for over
    /// [`STALLED_AFTER_MS`] is handed no more bodies and is not waited for: a dead peer must
    /// not slow down the healthy ones. It catches up from the queue once its peer answers.
    pub fn stalled(&self, now: i64) -> bool {
        let since = self.sending_since_ms.load(Ordering::Acquire);
        self.failing() || (since > 0 && now - since > STALLED_AFTER_MS)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::keys::SigningKey;
    use crate::sender::shared::{PreparedBody, SIGNING_BATCH};
    use crate::xmatrix::SharedBodyAuthorization;

    /// Every destination of a body gets the header signed for it alone, whichever batch its
    /// slot falls in and whichever worker signs that batch, in whatever order they ask.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_slot_gets_its_own_destinations_header() {
        let key = SigningKey::generate();
        let (path, json) = ("/_matrix/federation/v1/send/1-2", r#"{"edus":[],"origin":"a.test","pdus":[]}"#);
        let audience: Vec<String> = (0..2 * SIGNING_BATCH + 5).map(|i| format!("d{i}.test")).collect();
        let authorization = || SharedBodyAuthorization::new(&key, "a.test", "PUT", path, json);
        let body = Arc::new(PreparedBody::new(path.into(), json.into(), 0, authorization(), audience.clone()));
        let asks = (0..audience.len()).rev().map(|slot| {
            let body = body.clone();
            tokio::spawn(async move { (slot, body.header(slot).await.to_owned()) })
        });
        let single = authorization();
        for ask in asks.collect::<Vec<_>>() {
            let (slot, header) = ask.await.unwrap();
            assert_eq!(header, single.header(&audience[slot]), "slot {slot}");
        }
    }
}
