//! Logging setup. `RUST_LOG` selects levels (default `info`); `CHATVAULT_LOG_FORMAT=json` is reserved for
//! structured logs (issue: telemetry) and falls back to text for now.

use tracing_subscriber::EnvFilter;

pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,h2=warn,hyper=warn,tower=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        // Logs go to stderr so that command output (transcripts, exported keys, JSON) stays clean on stdout.
        .with_writer(std::io::stderr)
        .try_init();
}
