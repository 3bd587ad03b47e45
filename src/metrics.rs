//! Prometheus metrics. Each server instance has its own recorder (so several in-process
//! servers, as in the tests, never mix their figures); it is served on `metrics.bind`.

use metrics::Recorder;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::xmatrix::AuthFailure;

pub const XMATRIX_AUTH_FAILURES: &str = "peekgate_xmatrix_auth_failures_total";

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let metrics = Metrics { recorder, handle };
        metrics.describe();
        metrics
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder as &dyn Recorder, f)
    }

    /// Help texts, and every label value of the closed label sets registered at zero so that
    /// dashboards and alerts see the series before the first event.
    fn describe(&self) {
        self.with(|| {
            metrics::describe_counter!(
                XMATRIX_AUTH_FAILURES,
                "Inbound federation requests refused by X-Matrix authentication, by reason"
            );
            for failure in AuthFailure::ALL {
                metrics::counter!(XMATRIX_AUTH_FAILURES, "reason" => failure.label()).absolute(0);
            }
        });
    }

    pub fn xmatrix_auth_failure(&self, reason: &'static str) {
        self.with(|| metrics::counter!(XMATRIX_AUTH_FAILURES, "reason" => reason).increment(1));
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
