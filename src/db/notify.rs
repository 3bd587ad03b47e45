//! Cross-instance wake-ups (design.md §6): on PostgreSQL each instance tells the others of its
//! appends (a `NOTIFY` after commit with the newest stream position, coalesced, off the append
//! path's lock) and of its device-peek changes (a `NOTIFY` inside their transaction); one
//! listener per instance turns them into its in-process wake-ups, so a sender or a long-polling
//! `/sync` on one instance reacts to what another stored. SQLite is single-instance and needs
//! none of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection, RunQueryDsl};

use super::DbConnection;

/// Payload: the new event's stream position.
pub const EVENTS: &str = "peekgate_events";
/// Payload: the new device-peek log sequence number.
pub const DEVICE_PEEKS: &str = "peekgate_device_peeks";
/// Payload: the stream position of an event that was redacted (H19): copies held in memory
/// are stale.
pub const REDACTIONS: &str = "peekgate_redactions";

/// How often the listener reads the notifications that arrived (a local socket read, no query).
const POLL_EVERY: Duration = Duration::from_millis(20);
/// Wait before reconnecting after the listener's connection failed.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Queues a notification in the current transaction (PostgreSQL only; a no-op on SQLite).
pub fn notify(conn: &mut DbConnection, channel: &'static str, value: i64) -> diesel::QueryResult<()> {
    if let DbConnection::Postgresql(pg) = conn {
        // Both arguments are ours (a constant and an integer): formatting them in is safe.
        diesel::sql_query(format!("SELECT pg_notify('{channel}', '{value}')")).execute(pg)?;
    }
    Ok(())
}

/// A running listener; stops when dropped or on [`Listener::stop`].
pub struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Listens on both channels over its own connection and calls `on_notification(channel,
    /// value)` for each notification, reconnecting after failures.
    pub fn start(url: String, on_notification: impl Fn(&str, i64) + Send + 'static) -> Listener {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("peekgate-notify".into())
            .spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    if let Err(e) = listen(&url, &stopping, &on_notification) {
                        tracing::warn!(error = %e, "NOTIFY listener failed; reconnecting");
                        std::thread::sleep(RECONNECT_AFTER);
                    }
                }
            })
            .expect("spawn the NOTIFY listener thread");
        Listener { stop, thread: Some(thread) }
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.halt();
    }
}

fn listen(url: &str, stop: &AtomicBool, on_notification: &impl Fn(&str, i64)) -> Result<(), String> {
    let mut conn = PgConnection::establish(url).map_err(|e| e.to_string())?;
    conn.batch_execute(&format!("LISTEN {EVENTS}; LISTEN {DEVICE_PEEKS}; LISTEN {REDACTIONS};"))
        .map_err(|e| e.to_string())?;
    while !stop.load(Ordering::Acquire) {
        for notification in conn.notifications_iter() {
            let notification = notification.map_err(|e| e.to_string())?;
            if let Ok(value) = notification.payload.parse::<i64>() {
                on_notification(&notification.channel, value);
            }
        }
        std::thread::sleep(POLL_EVERY);
    }
    Ok(())
}
