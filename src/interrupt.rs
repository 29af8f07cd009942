//! SIGINT and SIGTERM (Ctrl-C on Windows) ask a running job to stop: the schedulers finish the
//! step in flight, the results finished by then are already flushed, and the job exits non-zero
//! with a message saying how to resume. A second signal exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler (once per process; later calls do nothing).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let handler = ctrlc::set_handler(|| {
            if REQUESTED.swap(true, Ordering::SeqCst) {
                eprintln!("moegen: stopping now");
                std::process::exit(130);
            }
            eprintln!("moegen: stopping after the step in flight (signal again to stop at once)");
        });
        if let Err(e) = handler {
            log::warn!("cannot catch SIGINT/SIGTERM ({e}); an interrupted job keeps the results written so far");
        }
    });
}

/// An error once a stop was asked for: the schedulers call this between steps.
pub fn check() -> Result<()> {
    if REQUESTED.load(Ordering::SeqCst) {
        return Err(Error::invalid("the job", "interrupted by a signal (SIGINT or SIGTERM)"));
    }
    Ok(())
}
