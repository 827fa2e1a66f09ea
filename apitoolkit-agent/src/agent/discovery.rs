//! Setting up watched processes while capture runs: selection rescans, the TCP connections a
//! process already held, the kernel's target map, and TLS libraries to probe.

use std::collections::{HashMap, HashSet};

use crate::{
    capture::Probes,
    pipeline::events::{ConnId, Event},
    targets::{process, select::Selector, sockets, tls::TlsWatcher},
};

/// Seconds between TLS rescans of every watched process (new ones are scanned at once).
const TLS_RESCAN_SECONDS: u32 = 5;
/// Scans a process the kernel selected (at bind or exec) gets to show up in /proc as selected
/// (listening on the port, running the program) before the kernel stops capturing it.
const KERNEL_PICK_SCANS: u32 = 3;

/// Processes one discovery pass set up.
pub struct Discovered {
    pub pids: Vec<u32>,
    /// Connections they already held.
    pub existing_connections: usize,
}

pub struct Discovery {
    selector: Selector,
    /// Processes set up so far (existing connections registered, target map entry written).
    watched: HashSet<u32>,
    since_tls_rescan: u32,
    tls: TlsWatcher,
    /// Processes already warned about for TLS the agent cannot read.
    unreadable_tls_reported: HashSet<u32>,
    /// Processes the kernel selected and /proc has not confirmed yet, with the scans left.
    kernel_picks: HashMap<u32, u32>,
}

/// Registers the TCP connections `pids` already hold, and the kernel does not follow yet, with
/// the kernel side and returns their open events; the kernel's timestamps and generations use
/// CLOCK_MONOTONIC too.
fn register_existing_connections(probes: &mut Probes, pids: &[u32]) -> anyhow::Result<Vec<Event>> {
    let mut events = Vec::new();
    for &pid in pids {
        for existing in sockets::existing_connections(pid) {
            let generation = super::clock_ns(libc::CLOCK_MONOTONIC) as u64;
            if !probes.register_connection(pid, existing.fd, generation)? {
                continue;
            }
            events.push(Event::Open {
                conn: ConnId {
                    tgid: pid,
                    fd: existing.fd,
                    generation,
                },
                timestamp_ns: generation,
                role: existing.role,
                remote: Some(existing.remote),
                midstream: true,
            });
        }
    }
    Ok(events)
}

impl Discovery {
    pub fn new(selector: Selector) -> Self {
        Self {
            selector,
            watched: HashSet::new(),
            since_tls_rescan: 0,
            tls: TlsWatcher::default(),
            unreadable_tls_reported: HashSet::new(),
            kernel_picks: HashMap::new(),
        }
    }

    /// The kernel selected `tgid` as it bound a port or executed a program: captured from now
    /// on, until the next scans confirm it or give it up.
    pub fn kernel_picked(&mut self, tgid: u32) {
        tracing::debug!(
            pid = tgid,
            "selected in the kernel, to be confirmed from /proc"
        );
        self.kernel_picks.insert(tgid, KERNEL_PICK_SCANS);
    }

    /// Gives up kernel picks that /proc did not confirm in time (a client binding the port,
    /// a bind that failed, a program of the same name elsewhere).
    fn settle_kernel_picks(
        &mut self,
        probes: &mut Probes,
        selected: &HashSet<u32>,
    ) -> anyhow::Result<()> {
        let mut unconfirmed = Vec::new();
        self.kernel_picks.retain(|pid, scans_left| {
            if selected.contains(pid) {
                return false;
            }
            *scans_left -= 1;
            if *scans_left == 0 || !process::exists(*pid) {
                unconfirmed.push(*pid);
                return false;
            }
            true
        });
        if !unconfirmed.is_empty() {
            tracing::debug!(pids = ?unconfirmed, "kernel selections not confirmed, released");
            probes.remove_targets(&unconfirmed)?;
        }
        Ok(())
    }

    pub fn watched(&self) -> &HashSet<u32> {
        &self.watched
    }

    /// Every process selected by id or executable has exited (exit records can be lost when
    /// the ring buffer is full: /proc decides).
    pub fn targets_exited(&mut self) -> bool {
        !self.selector.is_open_ended() && self.selector.live_roots().is_empty()
    }

    /// Sets up processes selected since the last call: their existing connections, their
    /// target-map entry and their TLS libraries. Every few seconds all watched processes are
    /// rescanned for TLS libraries loaded since (dlopen). Returns them with the open events of
    /// the connections they already held, for the pipeline.
    pub fn scan(&mut self, probes: &mut Probes) -> anyhow::Result<(Discovered, Vec<Event>)> {
        let selected = self.selector.scan();
        let new_by_id: Vec<u32> = selected
            .by_id
            .iter()
            .filter(|pid| !self.watched.contains(pid))
            .copied()
            .collect();
        probes.add_targets(&new_by_id)?;
        // A child the new targets forked after the /proc scan but before the map insert is
        // seen by neither that scan nor the kernel's fork hook: look again, now that the hook
        // follows them (a gunicorn worker spawned while the agent attaches).
        let forked_meanwhile: Vec<u32> = process::with_descendants(&new_by_id)
            .into_iter()
            .filter(|pid| !selected.by_id.contains(pid))
            .collect();
        probes.add_targets(&forked_meanwhile)?;
        let selected_now: HashSet<u32> = selected.all().chain(forked_meanwhile).collect();
        let mut new: Vec<u32> = selected_now
            .iter()
            .filter(|pid| !self.watched.contains(pid))
            .copied()
            .collect();
        new.sort_unstable();
        let existing_connections = register_existing_connections(probes, &new)?;
        self.settle_kernel_picks(probes, &selected_now)?;
        self.watched = selected_now;
        let watched = &self.watched;
        self.tls.retain_processes(|pid| watched.contains(&pid));
        self.since_tls_rescan += 1;
        if self.since_tls_rescan >= TLS_RESCAN_SECONDS {
            self.since_tls_rescan = 0;
            let watched: Vec<u32> = self.watched.iter().copied().collect();
            self.tls.scan(probes, &watched);
        } else {
            self.tls.scan(probes, &new);
        }
        let discovered = Discovered {
            pids: new,
            existing_connections: existing_connections.len(),
        };
        Ok((discovered, existing_connections))
    }

    /// A TLS connection carried data and no plaintext: said once per process whose TLS
    /// library is not probed.
    pub fn report_unreadable_tls(&mut self, conn: ConnId) {
        if self.tls.probes(conn.tgid) {
            // A probed library that produced no plaintext: a custom BIO or a lost mapping.
            tracing::debug!(?conn, "TLS connection without plaintext");
        } else if self.unreadable_tls_reported.insert(conn.tgid) {
            tracing::warn!(
                pid = conn.tgid,
                "HTTPS without plaintext: this process uses a TLS library the agent does not \
                 probe (Go crypto/tls, rustls, Java, or a static build without SSL symbols), \
                 so its HTTPS is not captured"
            );
        }
    }
}
