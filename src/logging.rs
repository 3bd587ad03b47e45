//! Structured logs through tracing: plain or JSON lines on stderr. Request spans come from
//! tracing-actix-web with access tokens redacted from the target; no handler logs a token,
//! password or key (a test checks the logs of a running server).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Installs the global subscriber once; later calls (tests) are ignored.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.filter));
    // Colour only on a terminal: journald and log files get plain text (H20).
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if config.format == "json" { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}

/// Request spans like tracing-actix-web's default, except that `http.target` never carries an
/// access token (clients may still send `?access_token=`, which the default would log).
pub struct RedactingRootSpan;

impl tracing_actix_web::RootSpanBuilder for RedactingRootSpan {
    fn on_request_start(request: &actix_web::dev::ServiceRequest) -> tracing::Span {
        use actix_web::HttpMessage;
        let target = redact_target(request.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""));
        let route = request.match_pattern().unwrap_or_else(|| "default".to_owned());
        let request_id = request.extensions().get::<tracing_actix_web::RequestId>().copied();
        tracing::info_span!(
            "HTTP request",
            http.method = %request.method(),
            http.route = %route,
            http.target = %target,
            http.client_ip = %request.connection_info().realip_remote_addr().unwrap_or(""),
            http.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            exception.message = tracing::field::Empty,
            exception.details = tracing::field::Empty,
            request_id = %request_id.map(|id| id.to_string()).unwrap_or_default(),
        )
    }

    fn on_request_end<B: actix_web::body::MessageBody>(
        span: tracing::Span,
        outcome: &Result<actix_web::dev::ServiceResponse<B>, actix_web::Error>,
    ) {
        tracing_actix_web::DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}

/// The path and query with the value of every `access_token` parameter replaced. Keys are
/// compared decoded, as the token extractor reads them (`access%5Ftoken` is `access_token`, H18).
pub fn redact_target(target: &str) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let is_token =
        |key: &str| url::form_urlencoded::parse(key.as_bytes()).next().is_some_and(|(k, _)| k == "access_token");
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_token(key) => format!("{key}=<redacted>"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::redact_target;

    #[test]
    fn access_tokens_are_redacted_from_request_targets() {
        assert_eq!(
            redact_target("/sync?since=s1_0&access_token=secret&timeout=5"),
            "/sync?since=s1_0&access_token=<redacted>&timeout=5"
        );
        assert_eq!(
            redact_target("/sync?access%5Ftoken=secret&access%5ftoken=secret2"),
            "/sync?access%5Ftoken=<redacted>&access%5ftoken=<redacted>",
            "H18: an encoded key is still the token"
        );
        assert_eq!(redact_target("/health"), "/health");
        assert_eq!(redact_target("/x?a=1"), "/x?a=1");
    }
}
