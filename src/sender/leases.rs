//! H4: the destination leases this instance holds, renewed together.
//!
//! The manager takes the leases of the workers it starts, together, and registers each here; one
//! task renews every registered lease each third of the lease length, in one statement per 1,000
//! destinations; the manager releases them together too, when it sees their workers stopped.
//! Each worker used to renew its own: with 1,000 workers started together that was a burst of
//! 1,000 committed `UPDATE`s every 10 s, hundreds of blocking-pool threads waiting for eight
//! connections, and a stall of every fan-out round and append that fell into it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::queue;
use super::shared::Shared;

/// The leases held, each with the signal that stops its worker.
#[derive(Default)]
pub(crate) struct Leases {
    inner: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    /// Per destination: which registration this is, and its worker's stop signal.
    stops: HashMap<String, (u64, watch::Sender<bool>)>,
    registrations: u64,
    /// Shutting down: nothing is renewed any more, and a lease registered now stops at once.
    closed: bool,
}

impl Leases {
    /// Registers a lease this instance just took. The receiver turns `true` when the worker must
    /// stop: at shutdown, and when the lease is lost (another instance holds it, or it could not
    /// be renewed before running out).
    pub fn hold(&self, destination: &str) -> watch::Receiver<bool> {
        let mut held = self.inner.lock().expect("leases lock");
        let (stop, stopped) = watch::channel(held.closed);
        if !held.closed {
            held.registrations += 1;
            let registration = held.registrations;
            held.stops.insert(destination.to_owned(), (registration, stop));
        }
        stopped
    }

    /// The worker is done with the lease (the manager releases it in the database once the
    /// worker has stopped).
    pub fn forget(&self, destination: &str) {
        self.inner.lock().expect("leases lock").stops.remove(destination);
    }

    /// The leases held now, each with its registration.
    fn snapshot(&self) -> Vec<(String, u64)> {
        self.inner.lock().expect("leases lock").stops.iter().map(|(d, (r, _))| (d.clone(), *r)).collect()
    }

    /// Stops the workers of `lost`, unless a new worker registered its destination since (its
    /// lease was taken after the renewal that missed the old one).
    fn stop(&self, lost: &[&(String, u64)]) {
        let mut held = self.inner.lock().expect("leases lock");
        for (destination, registration) in lost {
            if held.stops.get(destination).is_some_and(|(r, _)| r == registration) {
                if let Some((_, stop)) = held.stops.remove(destination) {
                    let _ = stop.send(true);
                }
            }
        }
    }

    fn stop_all(&self, close: bool) {
        let mut held = self.inner.lock().expect("leases lock");
        held.closed |= close;
        for (_, (_, stop)) in held.stops.drain() {
            let _ = stop.send(true);
        }
    }
}

/// Renews the registered leases every third of their length until shutdown, then stops every
/// worker. A lease that is not renewed (another instance took it) stops its worker; when
/// renewing fails for two periods in a row, every lease may be running out, so every worker
/// stops. A stopped worker's cursor stays where its last acknowledged transaction left it.
pub(super) async fn keep(shared: Arc<Shared>, leases: Arc<Leases>) {
    let mut shutdown = shared.shutdown.clone();
    let every = Duration::from_millis(shared.lease_ms as u64 / 3);
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => break,
        }
        let held = leases.snapshot();
        if held.is_empty() {
            renewed = Instant::now();
            continue;
        }
        let names = held.iter().map(|(destination, _)| destination.clone()).collect();
        match queue::renew_leases(&shared, names).await {
            Ok(kept) => {
                renewed = Instant::now();
                let lost: Vec<&(String, u64)> = held.iter().filter(|(d, _)| !kept.contains(d)).collect();
                if !lost.is_empty() {
                    tracing::warn!(destinations = lost.len(), first = %lost[0].0, "sender: another instance took these destinations; stopping their workers");
                    leases.stop(&lost);
                }
            }
            Err(e) if renewed.elapsed() >= every * 2 => {
                tracing::warn!(error = %e, destinations = held.len(), "sender: cannot renew the destinations' leases before they run out; stopping their workers");
                leases.stop_all(false);
                // Leases taken from now on are fresh: they get two periods again.
                renewed = Instant::now();
            }
            Err(e) => tracing::info!(error = %e, "sender: cannot renew the destinations' leases; trying again"),
        }
    }
    leases.stop_all(true);
}

#[cfg(test)]
mod tests {
    use crate::sender::leases::Leases;

    #[test]
    fn a_lost_lease_stops_only_the_worker_that_held_it() {
        let leases = Leases::default();
        let old = leases.hold("a.test");
        let other = leases.hold("b.test");
        let seen = leases.snapshot();
        // a.test's worker ends and a new one takes the lease after the snapshot was renewed.
        leases.forget("a.test");
        let new = leases.hold("a.test");
        let lost: Vec<&(String, u64)> = seen.iter().filter(|(d, _)| d == "a.test").collect();
        leases.stop(&lost);
        assert!(!*new.borrow(), "the new registration keeps running");
        assert!(!*old.borrow() && !*other.borrow());
        let lost: Vec<&(String, u64)> = seen.iter().filter(|(d, _)| d == "b.test").collect();
        leases.stop(&lost);
        assert!(*other.borrow(), "the holder of a lost lease stops");
    }

    #[test]
    fn after_shutdown_a_new_lease_stops_at_once() {
        let leases = Leases::default();
        let running = leases.hold("a.test");
        leases.stop_all(true);
        assert!(*running.borrow());
        assert!(*leases.hold("b.test").borrow());
        assert!(leases.snapshot().is_empty());
    }
}
