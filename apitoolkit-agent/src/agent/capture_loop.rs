//! The capture thread: drains the ring buffer, feeds each event through the pipeline (handing
//! in process profiles it asks for), batches payloads to the sinks, and once a second reports
//! metrics and discovers new processes.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use bytes::BytesMut;

use super::{
    StopReason,
    discovery::{Discovered, Discovery},
    recording::Recorder,
};
use crate::{
    allocator,
    capture::{Probes, RingWakeups},
    observability::{self, CaptureTotals, Heartbeat, LossReport, Snapshot},
    pipeline::{Pipeline, PipelineOutput, Tracked, events::Event, payload::Payload},
    sinks::SinkQueues,
    targets::process::{self, Profiler},
};

/// The kernel wakes the agent only when a sixteenth of the ring buffer is filled
/// (`apitoolkit-ebpf` `maps::publish`); below that, records wait for this timer. One wake-up
/// thus drains a batch of exchanges at any rate (~200 at 1k req/s, where the ring's wake mark
/// is reached about as often) for at most this much latency, instead of a context switch per
/// request when traffic is light. Each wake-up starts with cold caches, ~90 us at 1k req/s on
/// top of the context switch (measured): at 50 ms, light traffic cost ~11 us of agent CPU per
/// payload, at 100 ms ~8.3, at 200 ms ~11% less again.
const DRAIN_INTERVAL_MS: i32 = 200;
/// Records decoded per drain step, at most, before their events are handled.
pub const DRAIN_BATCH: usize = 1024;
/// Record bytes decoded per drain step, at most (the record that crosses it included): a
/// step's captured bytes are copied into arenas and its payloads held until it ends, so with
/// large bodies `DRAIN_BATCH` records of up to 16 KiB would copy the whole ring buffer (8 MiB)
/// and hold its payloads and their JSON at once, on top of the sinks' queues. `DRAIN_BATCH`
/// records of 1 KiB exchanges carry about this much.
const DRAIN_STEP_BYTES: usize = 1024 * 1024;
/// Size of the allocations the captured bytes of drained records are copied into (many
/// records per allocation; see `Event::decode`).
pub const ARENA_BYTES: usize = 64 * 1024;

/// What a drain step has decoded so far, against its bounds.
#[derive(Default)]
struct DrainStep {
    records: usize,
    bytes: usize,
}

impl DrainStep {
    fn add(&mut self, record_bytes: usize) {
        self.records += 1;
        self.bytes += record_bytes;
    }

    fn is_full(&self) -> bool {
        self.records >= DRAIN_BATCH || self.bytes >= DRAIN_STEP_BYTES
    }
}

pub struct CaptureLoop {
    pub ring: RingBuf<MapData>,
    pub wakeups: RingWakeups,
    pub pipeline: Pipeline,
    pub profiler: Profiler,
    pub discovery: Discovery,
    pub sinks: SinkQueues,
    /// Payloads of the current drain, handed to the sinks as one batch.
    pub outbox: Vec<Payload>,
    /// The pipeline's stages' outputs for one event, empty between events (kept, as `decoded`
    /// is, so an event does not allocate them anew).
    pub tracked: Tracked,
    pub output: PipelineOutput,
    /// The records of a drain step, decoded (kept between drains, as `arena` is, so a drain
    /// does not allocate them anew at every wake-up).
    pub decoded: Vec<Event>,
    /// What the captured bytes of decoded records are copied into (see `Event::decode`); a new
    /// allocation of `ARENA_BYTES` when full, the old one reused once its events are dropped.
    pub arena: BytesMut,
    pub recorder: Option<Recorder>,
    pub totals: CaptureTotals,
    /// Names of watched processes, for metric labels.
    pub process_names: HashMap<u32, String>,
    pub heartbeat: Heartbeat,
    pub losses: LossReport,
}

impl CaptureLoop {
    fn handle(&mut self, event: Event, probes: &mut Probes) -> anyhow::Result<()> {
        let recorded = self.recorder.is_some().then(|| event.clone());
        match &event {
            Event::Data(data) => self.totals.captured_bytes += data.data.len() as u64,
            Event::ProcessSelected { tgid, .. } => self.discovery.kernel_picked(*tgid),
            _ => {}
        }
        // Taken out while in use, returned empty: each event reuses their vectors' room.
        let mut tracked = std::mem::take(&mut self.tracked);
        let mut output = std::mem::take(&mut self.output);
        self.pipeline.track(event, &mut tracked);
        for &tgid in &tracked.unprofiled {
            self.pipeline.add_profile(tgid, self.profiler.profile(tgid));
        }
        self.pipeline.emit(&mut tracked, &mut output);
        self.tracked = tracked;
        if let (Some(recorder), Some(event)) = (&mut self.recorder, recorded) {
            recorder.write(event, &output)?;
        }
        for (conn, source) in output.disable.drain(..) {
            if let Err(error) = probes.disable(conn, source) {
                tracing::warn!(%error, ?conn, ?source, "could not disable connection in the kernel");
            }
        }
        for conn in output.unreadable_tls.drain(..) {
            self.discovery.report_unreadable_tls(conn);
        }
        self.outbox.append(&mut output.payloads);
        output.origins.clear();
        self.output = output;
        Ok(())
    }

    /// Payloads the pipeline released outside an event (held 5xx whose wait ended, all of them
    /// at shutdown), on to the recording and the sinks.
    fn deliver_released(&mut self, output: PipelineOutput) -> anyhow::Result<()> {
        if output.payloads.is_empty() {
            return Ok(());
        }
        if let Some(recorder) = &mut self.recorder {
            recorder.write_released(&output)?;
        }
        self.outbox.extend(output.payloads);
        self.send_outbox();
        Ok(())
    }

    /// Drains the ring buffer and releases every held payload: nothing waits past shutdown.
    fn drain_all(&mut self, probes: &mut Probes) -> anyhow::Result<()> {
        self.drain(probes)?;
        let output = self.pipeline.flush();
        self.deliver_released(output)
    }

    /// Decodes one drain step of ring-buffer records into owned `events` (ring items borrow
    /// the ring buffer); returns false once the ring buffer is empty.
    fn next_events(&mut self, events: &mut Vec<Event>, arena: &mut BytesMut) -> bool {
        let mut step = DrainStep::default();
        while !step.is_full() {
            let Some(item) = self.ring.next() else {
                return false;
            };
            step.add(item.len());
            match Event::decode(&item, arena) {
                Ok(event) => events.push(event),
                Err(error) => {
                    self.totals.decode_errors += 1;
                    tracing::warn!(%error, "dropped undecodable ring-buffer record");
                }
            }
        }
        true
    }

    fn send_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        // The JSON sinks' JSON is written here, while the payloads are still in this thread's
        // cache.
        self.sinks.json.push(&self.outbox);
        // Drained, not taken: the outbox keeps its capacity instead of growing again, copying
        // every payload it holds, at each drain.
        if let Some((last, others)) = self.sinks.payloads.split_last() {
            for sink in others {
                sink.push(self.outbox.iter().cloned());
            }
            last.push(self.outbox.drain(..));
        }
        self.outbox.clear();
    }

    fn drain(&mut self, probes: &mut Probes) -> anyhow::Result<()> {
        let mut events = std::mem::take(&mut self.decoded);
        let mut arena = std::mem::take(&mut self.arena);
        let drained = loop {
            let more = self.next_events(&mut events, &mut arena);
            let handled = events
                .drain(..)
                .try_for_each(|event| self.handle(event, probes));
            if let Err(error) = handled {
                break Err(error);
            }
            self.send_outbox();
            if !more {
                break Ok(());
            }
        };
        self.decoded = events;
        self.arena = arena;
        drained
    }

    /// Sets up newly selected processes; returns their pids.
    pub fn discover(&mut self, probes: &mut Probes) -> anyhow::Result<Discovered> {
        let (discovered, existing_connections) = self.discovery.scan(probes)?;
        for event in existing_connections {
            self.handle(event, probes)?;
        }
        Ok(discovered)
    }

    /// The counters now, for /metrics and the shutdown log.
    pub fn snapshot(&mut self, probes: &mut Probes) -> anyhow::Result<Snapshot<'_>> {
        let watched = self.discovery.watched();
        self.process_names.retain(|pid, _| watched.contains(pid));
        for pid in self.pipeline.payloads_by_process().keys() {
            self.process_names
                .entry(*pid)
                .or_insert_with(|| process::name(*pid));
        }
        let payloads_by_process = self
            .pipeline
            .payloads_by_process()
            .iter()
            .map(|(pid, payloads)| {
                let name = self.process_names.get(pid).map_or("", String::as_str);
                (*pid, name, *payloads)
            })
            .collect();
        Ok(Snapshot {
            tracker: self.pipeline.stats(),
            links: self.pipeline.link_stats(),
            routes: self.pipeline.route_stats(),
            losses: probes.losses()?,
            totals: &self.totals,
            sinks: &self.sinks,
            watched_processes: watched.len(),
            buffered_bytes: self.pipeline.buffered_bytes(),
            payloads_by_process,
        })
    }

    /// Consumes events until `stop` is set or every watched root process has exited.
    pub fn run(&mut self, probes: &mut Probes, stop: &AtomicBool) -> anyhow::Result<StopReason> {
        let mut last_tick = Instant::now();
        let mut captured_at_last_tick = self.totals.captured_bytes;
        loop {
            if stop.load(Ordering::Relaxed) {
                self.drain_all(probes)?;
                return Ok(StopReason::Signal);
            }
            let wait_ms = self
                .pipeline
                .next_release_ns()
                .map_or(DRAIN_INTERVAL_MS, |due| {
                    let now = super::clock_ns(libc::CLOCK_MONOTONIC) as u64;
                    (due.saturating_sub(now) / 1_000_000).clamp(1, DRAIN_INTERVAL_MS as u64) as i32
                });
            self.wakeups
                .wait(wait_ms)
                .context("waiting for the ring buffer")?;
            // Every event the kernel stamped before this moment is in the ring buffer now, so
            // once it is drained, held payloads due before it have missed their traceback.
            let before_drain = super::clock_ns(libc::CLOCK_MONOTONIC) as u64;
            self.drain(probes)?;
            let released = self.pipeline.tick(before_drain);
            self.deliver_released(released)?;
            if last_tick.elapsed() > Duration::from_secs(1) {
                last_tick = Instant::now();
                self.heartbeat.beat();
                let idle = self.totals.captured_bytes == captured_at_last_tick;
                captured_at_last_tick = self.totals.captured_bytes;
                allocator::return_freed_memory(idle);
                let mut losses = std::mem::take(&mut self.losses);
                let snapshot = self.snapshot(probes)?;
                observability::export(&snapshot);
                observability::report_losses(&mut losses, &snapshot);
                self.losses = losses;
                if self.discovery.targets_exited() {
                    self.drain_all(probes)?;
                    return Ok(StopReason::TargetsExited);
                }
                let discovered = self.discover(probes)?;
                if !discovered.pids.is_empty() {
                    tracing::info!(
                        pids = ?discovered.pids,
                        existing_connections = discovered.existing_connections,
                        "watching new processes"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step_of(records: usize, record_bytes: usize) -> DrainStep {
        let mut step = DrainStep::default();
        (0..records).for_each(|_| step.add(record_bytes));
        step
    }

    #[test]
    fn a_drain_step_ends_at_its_record_count_for_small_records() {
        assert!(!step_of(1023, 512).is_full());
        assert!(step_of(1024, 512).is_full());
    }

    #[test]
    fn a_drain_step_of_large_records_ends_at_its_byte_bound() {
        // Full-size data records (a header and 16 KiB of captured bytes): 64 of them, not
        // 1024 (16 MiB, more than the whole ring buffer).
        let record = size_of::<apitoolkit_common::DataHeader>() + apitoolkit_common::CHUNK_SIZE;
        assert!(!step_of(63, record).is_full());
        assert!(step_of(64, record).is_full());
    }
}
