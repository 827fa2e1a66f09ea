//! NDJSON on standard output: one payload per line.

use std::{
    io::{self, BufWriter, Write},
    thread::JoinHandle,
};

use super::SinkReceiver;

/// Writes payloads until every sender is gone, flushing after each batch so a reader sees each
/// line promptly.
pub fn spawn(receiver: SinkReceiver) -> io::Result<JoinHandle<io::Result<u64>>> {
    std::thread::Builder::new()
        .name("stdout-sink".into())
        .spawn(move || {
            let stdout = io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            let mut written = 0;
            while let Some(batch) = receiver.recv() {
                for payload in batch {
                    serde_json::to_writer(&mut out, &payload)?;
                    out.write_all(b"\n")?;
                    written += 1;
                }
                out.flush()?;
            }
            out.flush()?;
            Ok(written)
        })
}
