//! Log output: tracing events on stderr, prefixed `[pg-password-sync]` so operators can
//! grep them out of a container log where postgres writes too; or JSON lines.
//!
//! stdout is reserved for command results (sync and verify reports), so logging never
//! mixes with output a script may parse. No event ever carries a secret: the `Secret`
//! type renders as `[redacted]`, and call sites log role and file names only.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::cli::LogFormat;

/// The prefix of every text log line.
pub const PREFIX: &str = "[pg-password-sync]";

/// Installs the global subscriber. `RUST_LOG` (default `info`) filters events.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Container logs are files, not terminals: no colour escapes in field names.
        .with_ansi(false);
    // A second init (only possible in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.event_format(Prefixed).try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
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
