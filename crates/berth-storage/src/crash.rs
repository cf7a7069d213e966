//! Crash points for crash-safety tests.
//!
//! `BERTH_CRASH_AT=create_volume.after_backend,node_stage.after_mount` makes the process
//! SIGKILL itself when it reaches one of the named points, exactly as an operator's `kill -9`
//! would at the worst moment. Unset (always, in production) it costs one load of an empty list.

use std::sync::OnceLock;

static POINTS: OnceLock<Vec<String>> = OnceLock::new();

/// Kills the process with SIGKILL if `point` was named in `BERTH_CRASH_AT`.
pub fn point(point: &str) {
    let points = POINTS.get_or_init(|| {
        std::env::var("BERTH_CRASH_AT")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    });
    if points.iter().any(|p| p == point) {
        tracing::warn!(point, "BERTH_CRASH_AT reached: killing this process with SIGKILL");
        // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
