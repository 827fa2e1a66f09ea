//! `--record` and `replay`: the kernel events of a live capture, one JSON object per line, and
//! the same events fed back through the pipeline without root.

use std::{
    fs::File,
    io::{BufRead, BufReader, BufWriter, Write},
    path::Path,
};

use anyhow::Context as _;

use crate::{
    config::CaptureArgs,
    pipeline::{
        Pipeline,
        events::Event,
        profile::{ProcessProfile, Profiles, SdkType},
    },
};

/// Writes every event the capture loop handles to the `--record` file.
pub struct Recorder(BufWriter<File>);

impl Recorder {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let file =
            File::create(path).with_context(|| format!("creating recording {}", path.display()))?;
        Ok(Self(BufWriter::new(file)))
    }

    pub fn write(&mut self, event: &Event) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.0, event)?;
        self.0.write_all(b"\n")?;
        Ok(())
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.0.flush().context("writing the recording")
    }
}

/// Replays a recording through the pipeline, writing payloads as NDJSON to `out`.
pub fn replay(file: &Path, args: &CaptureArgs, mut out: impl Write) -> anyhow::Result<u64> {
    let reader = BufReader::new(
        File::open(file).with_context(|| format!("opening recording {}", file.display()))?,
    );
    // The recorded processes are gone: nothing to read from /proc.
    let profile = ProcessProfile::new(args.sdk_type.unwrap_or(SdkType::SDKUnknown), true);
    let mut pipeline = Pipeline::new(
        super::payload_settings(args),
        super::capture_scope(args),
        super::redactor(args)?,
        Profiles::Everyone(profile),
    );
    let mut written = 0;
    for (index, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a recorded event", file.display(), index + 1))?;
        for payload in pipeline.feed(event).payloads {
            serde_json::to_writer(&mut out, &payload)?;
            out.write_all(b"\n")?;
            written += 1;
        }
    }
    out.flush()?;
    tracing::info!(stats = ?pipeline.stats(), "replay finished");
    Ok(written)
}
