//! Prometheus metrics (the names are part of the contract, design.md §8). Each server instance
//! has its own recorder, so several in-process servers (as in the tests) never mix figures; it
//! is served on `metrics.bind`. Every label takes values from a closed set.

use std::time::Duration;

use metrics::Recorder;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::xmatrix::AuthFailure;

pub const INBOUND_PEEKS: &str = "peekgate_inbound_peeks";
pub const OUTBOUND_PEEKS: &str = "peekgate_outbound_peeks";
pub const DEVICE_PEEKS: &str = "peekgate_device_peeks";
pub const PEEK_RENEWALS: &str = "peekgate_peek_renewals_total";
pub const PEEK_EVICTIONS: &str = "peekgate_peek_evictions_total";
pub const RENEWAL_LAG: &str = "peekgate_renewal_lag_seconds";
pub const SENT_TRANSACTIONS: &str = "peekgate_federation_sent_transactions_total";
pub const SENT_PDUS: &str = "peekgate_federation_sent_pdus_total";
pub const SEND_DURATION: &str = "peekgate_federation_send_duration_seconds";
pub const DESTINATIONS_BACKING_OFF: &str = "peekgate_federation_destinations_backing_off";
pub const RECEIVED_PDUS: &str = "peekgate_federation_received_pdus_total";
pub const XMATRIX_AUTH_FAILURES: &str = "peekgate_xmatrix_auth_failures_total";
pub const SCHEDULE_RUNS: &str = "peekgate_schedule_runs_total";
/// Beyond design.md's list (#13): how often delivery fell back to a destination's own queue.
pub const QUEUE_TRANSACTIONS: &str = "peekgate_federation_queue_transactions_total";

/// Every metric name of the contract.
pub const CONTRACT: [&str; 13] = [
    INBOUND_PEEKS,
    OUTBOUND_PEEKS,
    DEVICE_PEEKS,
    PEEK_RENEWALS,
    PEEK_EVICTIONS,
    RENEWAL_LAG,
    SENT_TRANSACTIONS,
    SENT_PDUS,
    SEND_DURATION,
    DESTINATIONS_BACKING_OFF,
    RECEIVED_PDUS,
    XMATRIX_AUTH_FAILURES,
    SCHEDULE_RUNS,
];

const SEND_DURATION_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(SEND_DURATION.to_owned()), &SEND_DURATION_BUCKETS)
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        let metrics = Metrics { recorder, handle };
        metrics.describe();
        metrics
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder as &dyn Recorder, f)
    }

    /// Help texts, and the closed label sets registered at zero so that dashboards and alerts
    /// see every series before its first event.
    fn describe(&self) {
        self.with(|| {
            metrics::describe_gauge!(INBOUND_PEEKS, "Live inbound peeks (other servers peeking our rooms)");
            metrics::describe_gauge!(OUTBOUND_PEEKS, "Live outbound peeks (we peek rooms on other servers)");
            metrics::describe_gauge!(DEVICE_PEEKS, "Live peeks of local devices");
            metrics::describe_counter!(PEEK_RENEWALS, "Peek renewals by direction and result");
            metrics::describe_counter!(PEEK_EVICTIONS, "Inbound peeks ended by the server, by reason");
            metrics::describe_gauge!(RENEWAL_LAG, "How late the most overdue outbound renewal is, in seconds");
            metrics::describe_counter!(SENT_TRANSACTIONS, "Federation /send transactions by result");
            metrics::describe_counter!(SENT_PDUS, "PDUs delivered in successful /send transactions");
            metrics::describe_histogram!(SEND_DURATION, "Duration of /send requests, in seconds");
            metrics::describe_gauge!(DESTINATIONS_BACKING_OFF, "Destinations waiting out a retry back-off");
            metrics::describe_counter!(RECEIVED_PDUS, "PDUs received in /send transactions by result");
            metrics::describe_counter!(
                XMATRIX_AUTH_FAILURES,
                "Inbound federation requests refused by X-Matrix authentication, by reason"
            );
            metrics::describe_counter!(SCHEDULE_RUNS, "Scheduled job runs by job and result");
            metrics::describe_counter!(
                QUEUE_TRANSACTIONS,
                "Transactions a destination's worker built from its own queue read, not from a body shared by the fan-out"
            );
            for failure in AuthFailure::ALL {
                metrics::counter!(XMATRIX_AUTH_FAILURES, "reason" => failure.label()).absolute(0);
            }
            for direction in ["inbound", "outbound"] {
                for result in ["ok", "failed", "unknown"] {
                    metrics::counter!(PEEK_RENEWALS, "direction" => direction, "result" => result).absolute(0);
                }
            }
            for reason in ["lapsed", "visibility_changed", "room_left"] {
                metrics::counter!(PEEK_EVICTIONS, "reason" => reason).absolute(0);
            }
            for result in ["ok", "failed"] {
                metrics::counter!(SENT_TRANSACTIONS, "result" => result).absolute(0);
            }
            for result in ["accepted", "rejected", "duplicate"] {
                metrics::counter!(RECEIVED_PDUS, "result" => result).absolute(0);
            }
            for job in ["evict_inbound", "renew_outbound"] {
                for result in ["ok", "failed"] {
                    metrics::counter!(SCHEDULE_RUNS, "job" => job, "result" => result).absolute(0);
                }
            }
            metrics::counter!(SENT_PDUS).absolute(0);
            metrics::counter!(QUEUE_TRANSACTIONS).absolute(0);
            // Registering the histogram exposes it with empty buckets until the first send.
            let _ = metrics::histogram!(SEND_DURATION);
            metrics::gauge!(INBOUND_PEEKS).set(0.0);
            metrics::gauge!(OUTBOUND_PEEKS).set(0.0);
            metrics::gauge!(DEVICE_PEEKS).set(0.0);
            metrics::gauge!(RENEWAL_LAG).set(0.0);
            metrics::gauge!(DESTINATIONS_BACKING_OFF).set(0.0);
        });
    }

    pub fn xmatrix_auth_failure(&self, reason: &'static str) {
        self.with(|| metrics::counter!(XMATRIX_AUTH_FAILURES, "reason" => reason).increment(1));
    }

    pub fn peek_renewal(&self, direction: &'static str, result: &'static str) {
        self.with(|| metrics::counter!(PEEK_RENEWALS, "direction" => direction, "result" => result).increment(1));
    }

    pub fn peek_evictions(&self, reason: &str, count: usize) {
        let reason = match reason {
            "lapsed" => "lapsed",
            "room_left" => "room_left",
            _ => "visibility_changed",
        };
        self.with(|| metrics::counter!(PEEK_EVICTIONS, "reason" => reason).increment(count as u64));
    }

    pub fn inbound_peeks(&self, live: i64) {
        self.with(|| metrics::gauge!(INBOUND_PEEKS).set(live as f64));
    }

    pub fn outbound_peeks(&self, live: i64) {
        self.with(|| metrics::gauge!(OUTBOUND_PEEKS).set(live as f64));
    }

    pub fn device_peeks(&self, live: i64) {
        self.with(|| metrics::gauge!(DEVICE_PEEKS).set(live as f64));
    }

    pub fn renewal_lag(&self, seconds: f64) {
        self.with(|| metrics::gauge!(RENEWAL_LAG).set(seconds));
    }

    pub fn sent_transaction(&self, ok: bool, pdus: usize, took: Duration) {
        self.with(|| {
            metrics::counter!(SENT_TRANSACTIONS, "result" => if ok { "ok" } else { "failed" }).increment(1);
            metrics::histogram!(SEND_DURATION).record(took.as_secs_f64());
            if ok {
                metrics::counter!(SENT_PDUS).increment(pdus as u64);
            }
        });
    }

    /// A worker built a transaction from its own queue read (far behind, notices, a back-off).
    pub fn queue_transaction(&self) {
        self.with(|| metrics::counter!(QUEUE_TRANSACTIONS).increment(1));
    }

    pub fn destinations_backing_off(&self, count: i64) {
        self.with(|| metrics::gauge!(DESTINATIONS_BACKING_OFF).set(count as f64));
    }

    pub fn received_pdu(&self, result: &'static str) {
        self.with(|| metrics::counter!(RECEIVED_PDUS, "result" => result).increment(1));
    }

    pub fn schedule_run(&self, job: &'static str, ok: bool) {
        self.with(|| {
            metrics::counter!(SCHEDULE_RUNS, "job" => job, "result" => if ok { "ok" } else { "failed" }).increment(1)
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
