//! NDJSON on standard output: one payload per line.

use std::{
    io::{self, Write as _},
    sync::Arc,
};

use tokio::runtime::Handle;

use super::PayloadQueue;
use crate::pipeline::payload::write_json;

const BATCH: usize = 1024;
/// Payloads taken from the queue at once, by size: what is taken, and its JSON, are held on
/// top of the queue's bound (1024 payloads of 64 KiB bodies would be ~200 MiB with their JSON).
const BATCH_BYTES: usize = 1024 * 1024;

/// Writes payloads until the queue is closed and empty; returns how many were written. It runs
/// on a thread of its own and writes with blocking calls: tokio's stdout would hand every
/// write to its blocking pool, one more thread switch per batch.
pub fn run(queue: Arc<PayloadQueue>, runtime: &Handle) -> io::Result<u64> {
    let mut stdout = io::stdout().lock();
    let mut written = 0;
    let mut lines = Vec::new();
    // Reused: one allocation for every batch.
    let mut batch = Vec::new();
    while runtime.block_on(queue.pop_into(&mut batch, BATCH, BATCH_BYTES)) {
        lines.clear();
        for payload in &batch {
            write_json(payload, &mut lines);
            lines.push(b'\n');
        }
        written += batch.len() as u64;
        // Freed before the write, while their memory is still in cache.
        batch.clear();
        stdout.write_all(&lines)?;
        stdout.flush()?;
        // One payload can be far bigger than the rest: its buffer is not kept.
        lines.shrink_to(2 * BATCH_BYTES);
    }
    Ok(written)
}
