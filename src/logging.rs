//! Structured logs through tracing: plain or JSON lines on stderr. Request spans come from
//! tracing-actix-web; no handler logs a token, password or key.

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Installs the global subscriber once; later calls (tests) are ignored.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if config.format == "json" { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}
