//! Log output: human-readable lines by default, one JSON object per line with
//! `LOCUS_LOG_FORMAT=json` (for log shippers).
//!
//! Why a span per region: `locus dev` runs three regions in one process, and a production process
//! of one region is read next to its peers' logs; every line must say which region wrote it. Each
//! region's workers and requests run inside a `locus{region=…}` span ([`region_span`]), so the
//! label is on every line without each call site repeating it. Resolver calls add a
//! `resolver{name, collection, key}` span, so a module's own log lines say what it was resolving.

use tracing_subscriber::EnvFilter;

/// What `RUST_LOG` is when unset: the region's own events, and only the warnings of the
/// libraries beneath it.
const DEFAULT_FILTER: &str = "info,sqlx=warn,async_nats=warn";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// `text` (the default) or `json`.
    pub fn parse(value: &str) -> Result<LogFormat, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "LOCUS_LOG_FORMAT is {other:?}; it must be \"text\" or \"json\""
            )),
        }
    }
}

/// Install the process's log output, to standard error, in the format `LOCUS_LOG_FORMAT` names.
pub fn init() -> Result<(), String> {
    let format = LogFormat::parse(&std::env::var("LOCUS_LOG_FORMAT").unwrap_or_default())?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_FILTER.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    Ok(())
}

/// The span every task and request of one region runs in. At `error` level so that no filter
/// drops it: a span filtered out labels nothing, and `RUST_LOG=warn` must still say which region
/// warned.
pub fn region_span(region: &str) -> tracing::Span {
    tracing::error_span!("locus", region = %region)
}

/// An error and its causes on one line (`outer: cause: root cause`): an HTTP client's error says
/// only "error sending request" itself, and its causes say why (refused, a certificate).
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_a_wrong_one_is_named() {
        assert_eq!(LogFormat::parse(""), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse("JSON"), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Ok(LogFormat::Text));
        let error = LogFormat::parse("yaml").unwrap_err();
        assert!(error.contains("\"yaml\""), "{error}");
    }

    #[test]
    fn a_chain_names_every_cause_once() {
        #[derive(Debug)]
        struct Failure(&'static str, Option<Box<Failure>>);
        impl std::fmt::Display for Failure {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Failure {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let root = Failure("invalid peer certificate: Expired", None);
        let repeated = Failure(
            "connect: invalid peer certificate: Expired",
            Some(Box::new(root)),
        );
        let outer = Failure("error sending request", Some(Box::new(repeated)));
        assert_eq!(
            super::chain(&outer),
            "error sending request: connect: invalid peer certificate: Expired"
        );
    }
}
