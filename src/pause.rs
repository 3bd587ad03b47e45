//! Pause points: named places in a race window where a test can stop one task, change the world
//! from outside, and let the task go on. Races that need a precise interleaving (issue #11:
//! H1, H2, H3, H9) are forced this way instead of hoped for.
//!
//! A point is armed for one *subject* (a room ID, a user ID: whatever the test made unique), so
//! tests running side by side in one process never stop each other's tasks. An armed point stops
//! the first task that reaches it, once. With nothing armed, a point costs one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::Duration;

/// Named places in the code where a task can be stopped. Each names the race it sits in.
pub mod points {
    /// H1, H9: an inbound peek PUT has passed its checks and is about to record the peek.
    pub const INBOUND_PEEK_RECORD: &str = "inbound_peek.record";
    /// H1: a device `/peek` has checked peekability and is about to record the device's peek.
    pub const DEVICE_PEEK_RECORD: &str = "device_peek.record";
    /// H2: a device-peek log entry is written and its transaction is about to commit.
    pub const DEVICE_PEEK_LOG_COMMIT: &str = "device_peek_log.commit";
    /// H3: an outbound renewal has claimed its peek and is about to re-PUT it.
    pub const OUTBOUND_RENEWAL_PUT: &str = "outbound_renewal.put";
    /// A sender worker's idle time ran out and it is about to stop (subject: the destination).
    pub const SENDER_WORKER_IDLE: &str = "sender.worker_idle";
    /// The fan-out has just handed a body to a destination's worker (subject: the destination).
    pub const SENDER_BODY_HANDED: &str = "sender.body_handed";
}

/// One armed point for one subject.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    reached: bool,
    released: bool,
}

/// How often the async side looks at a gate (test-only path; a blocking wait would stall the
/// runtime thread).
const POLL: Duration = Duration::from_millis(5);

/// `(point, subject)`: where and for whom a gate is armed.
type GateKey = (&'static str, String);

/// How long [`Held::reached`] waits for a task.
const REACH_LIMIT: Duration = Duration::from_secs(60);

static ARMED: AtomicUsize = AtomicUsize::new(0);
static GATES: LazyLock<Mutex<HashMap<GateKey, Arc<Gate>>>> = LazyLock::new(Default::default);

/// Takes the gate armed at `point` for `subject`, if any; the first task to ask gets it.
fn take(point: &'static str, subject: &str) -> Option<Arc<Gate>> {
    if ARMED.load(Ordering::Acquire) == 0 {
        return None;
    }
    let gate = GATES.lock().unwrap().remove(&(point, subject.to_owned()))?;
    ARMED.fetch_sub(1, Ordering::AcqRel);
    gate.state.lock().unwrap().reached = true;
    gate.changed.notify_all();
    Some(gate)
}

/// In async code: stops here while a test holds this point for `subject`.
pub async fn point(point: &'static str, subject: &str) {
    let Some(gate) = take(point, subject) else { return };
    while !gate.state.lock().unwrap().released {
        tokio::time::sleep(POLL).await;
    }
}

/// In blocking code (inside a database transaction): stops here while a test holds this point.
pub fn point_blocking(point: &'static str, subject: &str) {
    let Some(gate) = take(point, subject) else { return };
    let mut state = gate.state.lock().unwrap();
    while !state.released {
        state = gate.changed.wait(state).unwrap();
    }
}

/// A test's hold on one point: [`Held::reached`] waits for a task to stop there, dropping the
/// hold (or [`Held::release`]) lets it go on.
pub struct Held {
    gate: Arc<Gate>,
    key: GateKey,
}

/// Arms `point` for `subject`: the next task reaching it stops until the returned hold is
/// released or dropped.
pub fn hold(point: &'static str, subject: &str) -> Held {
    let gate = Arc::new(Gate::default());
    let key = (point, subject.to_owned());
    if GATES.lock().unwrap().insert(key.clone(), gate.clone()).is_none() {
        ARMED.fetch_add(1, Ordering::AcqRel);
    }
    Held { gate, key }
}

impl Held {
    /// Waits until a task stops at the point; panics after [`REACH_LIMIT`] (a test whose task
    /// never gets there fails instead of hanging).
    pub async fn reached(&self) {
        let deadline = std::time::Instant::now() + REACH_LIMIT;
        while !self.gate.state.lock().unwrap().reached {
            assert!(std::time::Instant::now() < deadline, "no task reached the pause point {}", self.key.0);
            tokio::time::sleep(POLL).await;
        }
    }

    /// Lets the stopped task (if any) go on.
    pub fn release(self) {}
}

impl Drop for Held {
    fn drop(&mut self) {
        // Disarm if nobody reached it, then let a stopped task go.
        if GATES.lock().unwrap().remove(&self.key).is_some() {
            ARMED.fetch_sub(1, Ordering::AcqRel);
        }
        self.gate.state.lock().unwrap().released = true;
        self.gate.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_point_stops_one_task_until_released() {
        let held = hold(points::INBOUND_PEEK_RECORD, "subject-a");
        let task = tokio::spawn(async { point(points::INBOUND_PEEK_RECORD, "subject-a").await });
        held.reached().await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!task.is_finished(), "the task waits at the point");
        // Another subject passes straight through.
        point(points::INBOUND_PEEK_RECORD, "subject-b").await;
        held.release();
        task.await.unwrap();
        // Once only: the next task passes.
        point(points::INBOUND_PEEK_RECORD, "subject-a").await;
    }

    #[tokio::test]
    async fn a_blocking_point_waits_on_its_thread() {
        let held = hold(points::DEVICE_PEEK_LOG_COMMIT, "subject-c");
        let task = tokio::task::spawn_blocking(|| point_blocking(points::DEVICE_PEEK_LOG_COMMIT, "subject-c"));
        held.reached().await;
        assert!(!task.is_finished());
        drop(held);
        task.await.unwrap();
    }
}
