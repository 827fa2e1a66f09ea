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
/// It runs on a thread of its own and writes with blocking calls: tokio's stdout would hand
/// every write to its blocking pool, one more thread switch per chunk.
pub fn run(queue: Arc<LineQueue>, runtime: &Handle) -> io::Result<u64> {
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
