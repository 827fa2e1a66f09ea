//! NDJSON on standard output: one payload per line. The lines are written on the capture
//! thread (see [`super::json`]); this sink only copies bytes out.

use std::{
    io::{self, Write as _},
    sync::Arc,
};

use tokio::runtime::Handle;

use super::json::LineQueue;

/// Chunks of lines taken from the queue at once, then flushed.
const BATCH_BYTES: usize = 1024 * 1024;

/// Writes lines until the queue is closed and empty; returns how many payloads were written.
/// It holds a blocking-pool thread for as long as it runs and writes with blocking calls:
/// tokio's stdout would hand every write to its blocking pool, one more thread switch per chunk.
pub fn run(queue: Arc<LineQueue>, runtime: &Handle) -> io::Result<u64> {
    let _batch = BatchThread::enter();
    let mut stdout = io::stdout().lock();
    let mut written = 0;
    // Reused: one allocation for every batch.
    let mut batch = Vec::new();
    while runtime.block_on(queue.pop_into(&mut batch, usize::MAX, BATCH_BYTES)) {
        // Each chunk's buffer goes back to capture as it is dropped here.
        for lines in batch.drain(..) {
            stdout.write_all(&lines.json)?;
            written += lines.payloads;
        }
        stdout.flush()?;
    }
    Ok(written)
}

/// This thread as a batch thread while it lives, which the scheduler never lets preempt the
/// thread that wakes it: capture queues lines at every drain, and this thread, woken then, would
/// stop it mid-drain (about one drain in two at 1k req/s, with its caches lost). Woken as a
/// batch thread it runs on an idle core, or once capture sleeps or its time slice ends. Dropped,
/// it makes the thread normal again: it goes back to tokio's blocking pool.
struct BatchThread;

impl BatchThread {
    fn enter() -> Self {
        if let Err(error) = set_policy(libc::SCHED_BATCH) {
            tracing::debug!(%error, "stdout thread stays a normal thread");
        }
        Self
    }
}

impl Drop for BatchThread {
    fn drop(&mut self) {
        let _ = set_policy(libc::SCHED_OTHER);
    }
}

fn set_policy(policy: libc::c_int) -> io::Result<()> {
    let normal_priority = libc::sched_param { sched_priority: 0 };
    // SAFETY: `normal_priority` is a valid sched_param for the call; pid 0 is this thread, and
    // moving between the normal and batch policies needs no privilege.
    if unsafe { libc::sched_setscheduler(0, policy, &normal_priority) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
