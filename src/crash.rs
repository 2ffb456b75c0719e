//! Crash points and mutations for the crash-safety harness (`tests/crash.rs`).
//!
//! In debug builds only, and only when asked through the environment:
//! - `PHASEGATE_CRASH_AT=n` makes the process kill itself (SIGKILL) when it reaches its n-th
//!   crash point; `PHASEGATE_CRASH_TRACE=file` appends every point reached to `file`;
//! - `PHASEGATE_MUTATION=name` switches on a deliberate bug, so the harness can prove that it
//!   notices one (`confirm-before-act`, `skip-flush`).
//!
//! Release builds compile all of this to nothing.

/// Marks a place where a crash must be survivable.
#[inline]
pub fn point(name: &'static str) {
    #[cfg(debug_assertions)]
    imp::point(name);
    #[cfg(not(debug_assertions))]
    let _ = name;
}

/// Whether a deliberate bug is switched on (never in release builds).
#[inline]
pub fn mutation(name: &str) -> bool {
    #[cfg(debug_assertions)]
    return imp::mutation(name);
    #[cfg(not(debug_assertions))]
    {
        let _ = name;
        false
    }
}

#[cfg(debug_assertions)]
mod imp {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};

    struct Config {
        at: Option<u64>,
        trace: Option<Mutex<std::fs::File>>,
        mutation: Option<String>,
    }

    static CONFIG: OnceLock<Config> = OnceLock::new();
    static REACHED: AtomicU64 = AtomicU64::new(0);

    fn config() -> &'static Config {
        CONFIG.get_or_init(|| Config {
            at: std::env::var("PHASEGATE_CRASH_AT")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0),
            trace: std::env::var("PHASEGATE_CRASH_TRACE")
                .ok()
                .and_then(|path| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .ok()
                        .map(Mutex::new)
                }),
            mutation: std::env::var("PHASEGATE_MUTATION").ok(),
        })
    }

    pub fn point(name: &'static str) {
        let config = config();
        if config.at.is_none() && config.trace.is_none() {
            return;
        }
        let n = REACHED.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(trace) = &config.trace {
            let mut file = trace.lock().expect("trace lock");
            let _ = writeln!(file, "{n} {name}");
            let _ = file.flush();
        }
        if config.at == Some(n) {
            // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }

    pub fn mutation(name: &str) -> bool {
        config().mutation.as_deref() == Some(name)
    }
}
