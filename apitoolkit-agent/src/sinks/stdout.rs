//! NDJSON on standard output: one payload per line.

use std::{
    io::{self, BufWriter, Write},
    sync::mpsc::Receiver,
    thread::JoinHandle,
};

use crate::payload::Payload;

/// Writes payloads until every sender is gone, flushing whenever the queue runs dry so a reader
/// sees each line promptly.
pub fn spawn(receiver: Receiver<Payload>) -> io::Result<JoinHandle<io::Result<u64>>> {
    std::thread::Builder::new()
        .name("stdout-sink".into())
        .spawn(move || {
            let stdout = io::stdout();
            let mut out = BufWriter::new(stdout.lock());
            let mut written = 0;
            while let Ok(payload) = receiver.recv() {
                let mut next = Some(payload);
                while let Some(payload) = next {
                    serde_json::to_writer(&mut out, &payload)?;
                    out.write_all(b"\n")?;
                    written += 1;
                    next = receiver.try_recv().ok();
                }
                out.flush()?;
            }
            out.flush()?;
            Ok(written)
        })
}
