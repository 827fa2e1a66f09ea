//! NDJSON on standard output: one payload per line.

use std::{io, sync::Arc};

use tokio::io::AsyncWriteExt as _;

use super::PayloadQueue;

const BATCH: usize = 1024;

/// Writes payloads until the queue is closed and empty; returns how many were written.
pub async fn run(queue: Arc<PayloadQueue>) -> io::Result<u64> {
    let mut stdout = tokio::io::stdout();
    let mut written = 0;
    let mut lines = Vec::new();
    while let Some(batch) = queue.pop(BATCH, usize::MAX).await {
        lines.clear();
        for payload in &batch {
            serde_json::to_writer(&mut lines, payload)?;
            lines.push(b'\n');
        }
        stdout.write_all(&lines).await?;
        stdout.flush().await?;
        written += batch.len() as u64;
    }
    Ok(written)
}
