//! `check`'s TLS lines: where the SSL probes of this host's TLS libraries would sit, and
//! whether the kernel emulates them or single-steps them (a trap per call).

use crate::{
    capture::preflight::{Check, Verdict},
    targets::{probe_site::Execution, tls},
};

pub fn tls_site_checks() -> Vec<Check> {
    tls::host_libraries()
        .into_iter()
        .map(|(path, plan)| {
            let single_stepped = plan
                .sites
                .iter()
                .any(|site| site.execution == Execution::SingleStepped);
            let sites: Vec<String> = plan.sites.iter().map(ToString::to_string).collect();
            Check {
                name: "TLS probes",
                verdict: if single_stepped {
                    Verdict::Warn
                } else {
                    Verdict::Pass
                },
                detail: format!("{}: {}", path.display(), sites.join("; ")),
            }
        })
        .collect()
}
