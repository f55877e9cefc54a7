//! Logs to stderr at `RUST_LOG` (default `info`); `TESSERA_LOG_FORMAT=json` for JSON lines.

use tracing_subscriber::EnvFilter;

/// Initialise logging once.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if std::env::var("TESSERA_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// In a Kubernetes container, the reason for exiting goes to the termination message file
/// (the operator shows its first line in the ModelDeployment's status); with
/// `FallbackToLogsOnError` alone the message would be the log's tail, whose first line is
/// seldom the error.
pub fn write_termination_message(message: &str) {
    let path = std::path::Path::new("/dev/termination-log");
    if path.exists() {
        // At most 4096 bytes are kept by the kubelet; cut at a character boundary.
        let mut end = message.len().min(4000);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let _ = std::fs::write(path, &message[..end]);
    }
}
