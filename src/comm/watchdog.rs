//! Time limit on a process's collectives. MPI's and NCCL's collectives block for ever on
//! a peer that hangs (one that dies, the launcher reports itself); a watchdog thread
//! names the collective and the group, runs the backend's abort, and ends the process
//! non-zero, so the launcher stops the others.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What this process is waiting for: each collective in flight (the rank's own, and the
/// gradient sums' worker's beside it), by id, with its name and group, and since when.
struct Waiting {
    what: Mutex<Vec<(u64, String, Instant)>>,
    timeout: Mutex<Duration>,
    /// Run before exiting (NCCL: abort the communicators so the GPU is released).
    abort: Mutex<Option<fn()>>,
}

static WAITING: OnceLock<Waiting> = OnceLock::new();

/// This process's rank as its launcher numbered it, for the message.
fn launcher_rank() -> String {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK", "SLURM_PROCID"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .unwrap_or_else(|| "?".into())
}

/// Aborts the process when one collective takes longer than `timeout`. Idempotent: a
/// later call changes the limit.
pub fn set_collective_timeout(timeout: Duration) {
    waiting()
        .timeout
        .lock()
        .expect("watchdog")
        .clone_from(&timeout);
}

/// Runs `abort` before the watchdog ends the process (NCCL: abort the communicators).
pub fn set_abort_hook(abort: fn()) {
    *waiting().abort.lock().expect("watchdog") = Some(abort);
}

fn waiting() -> &'static Waiting {
    WAITING.get_or_init(|| {
        std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_millis(200));
                let w = WAITING.get().expect("set before the thread starts");
                let limit = *w.timeout.lock().expect("watchdog");
                let late = w
                    .what
                    .lock()
                    .expect("watchdog")
                    .iter()
                    .find(|(_, _, since)| since.elapsed() > limit)
                    .map(|(_, what, _)| what.clone());
                if let Some(what) = late {
                    eprintln!(
                        "mmpipe: rank {}: {what} did not complete within {:.0} s: a peer is stuck \
                         (or gone without exiting); aborting the run",
                        launcher_rank(),
                        limit.as_secs_f64()
                    );
                    if let Some(abort) = *w.abort.lock().expect("watchdog") {
                        abort();
                    }
                    std::process::exit(3);
                }
            })
            .expect("spawn the collective watchdog");
        Waiting {
            what: Mutex::new(Vec::new()),
            // Until set: a collective waits as long as it takes.
            timeout: Mutex::new(Duration::MAX),
            abort: Mutex::new(None),
        }
    })
}

/// Marks a collective as in flight for the watchdog until dropped. Without
/// [`set_collective_timeout`] it does nothing.
pub struct InFlight(u64);

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl InFlight {
    pub fn start(op: &str, group: &str) -> InFlight {
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(w) = WAITING.get() {
            w.what.lock().expect("watchdog").push((
                id,
                format!("collective `{op}` in group `{group}`"),
                Instant::now(),
            ));
        }
        InFlight(id)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(w) = WAITING.get() {
            w.what
                .lock()
                .expect("watchdog")
                .retain(|(id, _, _)| *id != self.0);
        }
    }
}
