//! Durable delivery to peeking servers (design.md §4), after Lemmy's federation queue: the
//! events table is the queue; each destination keeps one persisted cursor (`last_sent_pos`) that
//! moves only over transactions answered 200; one task per destination sends at most 50 PDUs per
//! signed `/send`, retries the same transaction ID until it succeeds, and backs off with jitter,
//! so a slow or dead peer never delays another. Delivery is at-least-once: after a restart a
//! destination resends from its last persisted cursor.
//!
//! Two paths feed the workers:
//! - the fan-out path: when new events arrive, the manager reads them and the peeks on their
//!   rooms once, serialises each distinct transaction body once, and hands it to every worker
//!   that is caught up; workers a little behind are caught up the same way, one chunk per
//!   position where some wait; cursor moves are then persisted in bulk (one statement per
//!   position);
//! - the queue path: a worker that is far behind, backing off, or has `expired_peeks` notices
//!   reads its own batches from the database, and catches up.
//!
//! Workers start at their stored cursors, their leases taken together by the manager, and wait
//! for the fan-out to catch them up.

pub mod destinations;
mod fan_out;
mod leases;
mod manager;
mod queue;
mod shared;
mod subscriptions;
mod worker;

pub use manager::{start, SenderHandle};
pub use queue::backoff;
pub use shared::{SenderContext, SIGNING_BATCH};
