//! `--record` and `replay`: the kernel events of a live capture, one JSON object per line, and
//! the same events fed back through the pipeline without root.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, BufWriter, Write},
    os::unix::fs::OpenOptionsExt as _,
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
    /// Creates the file readable by its owner only: it holds raw traffic, secrets included.
    /// An existing file or symlink at `path` is refused, never truncated or followed.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| {
                format!(
                    "creating recording {} (an existing file is never overwritten)",
                    path.display()
                )
            })?;
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_recording_is_private_and_never_replaces_a_file_or_follows_a_link() {
        let dir = std::env::temp_dir().join(format!("apitoolkit-record-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("events.ndjson");
        Recorder::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(Recorder::create(&path).is_err(), "an existing file is kept");
        let target = dir.join("target");
        std::fs::write(&target, "keep me").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(Recorder::create(&link).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
