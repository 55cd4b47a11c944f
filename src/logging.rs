//! Log output: tracing events on stderr, prefixed `[pg-password-sync]` so operators can
//! grep them out of a container log where postgres writes too; or JSON lines.
//!
//! stdout is reserved for command results (sync and verify reports), so logging never
//! mixes with output a script may parse. No event ever carries a secret: the `Secret`
//! type renders as `[redacted]`, and call sites log role and file names only.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// The prefix of every text log line.
pub const PREFIX: &str = "[pg-password-sync]";

/// Installs the global subscriber. `RUST_LOG` (default `info`) sets the level.
pub fn init(format: Format) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(level(std::env::var("RUST_LOG").ok().as_deref()))
        .with_writer(std::io::stderr)
        // Container logs are files, not terminals: no colour escapes in field names.
        .with_ansi(false)
        // A line that cannot be written (stderr a closed pipe: EPIPE) is lost, and that is
        // all: by default the subscriber reports it with `eprintln!`, which panics on the
        // same closed stderr, and a panicking PID 1 takes postgres down with it.
        .log_internal_errors(false);
    // A second init (only possible in tests) keeps the first subscriber.
    let _ = match format {
        Format::Text => builder.event_format(Prefixed).try_init(),
        Format::Json => builder.json().with_current_span(false).try_init(),
    };
}

/// The level named by `RUST_LOG`: `debug`, or the most verbose level of directives such as
/// `warn,pg_password_sync=debug`. Every event is ours (the libraries log through `log`, which
/// is not bridged), so a per-target filter and its regex engine would buy nothing.
fn level(rust_log: Option<&str>) -> LevelFilter {
    rust_log
        .and_then(|value| {
            value
                .split(',')
                .filter_map(|directive| directive.rsplit('=').next()?.trim().parse().ok())
                .max()
        })
        .unwrap_or(LevelFilter::INFO)
}

/// `[pg-password-sync] LEVEL message key=value…`: one line per event, no timestamp (the
/// container runtime adds one) and no module path (operators do not need it).
struct Prefixed;

impl<S, N> FormatEvent<S, N> for Prefixed
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "{PREFIX} {} ", event.metadata().level())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_levels() {
        assert_eq!(level(None), LevelFilter::INFO);
        assert_eq!(level(Some("debug")), LevelFilter::DEBUG);
        assert_eq!(
            level(Some("warn,pg_password_sync=trace")),
            LevelFilter::TRACE
        );
        assert_eq!(level(Some("pg_password_sync=error")), LevelFilter::ERROR);
        assert_eq!(level(Some("nonsense")), LevelFilter::INFO);
    }
}
