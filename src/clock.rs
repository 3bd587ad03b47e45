//! Wall-clock time as Matrix counts it: milliseconds since the Unix epoch.

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
