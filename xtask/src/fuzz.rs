//! `cargo xtask fuzz`: the cargo-fuzz targets (HTTP reassembly, redaction) for a bounded number
//! of executions each, starting from the committed seeds plus the corpus earlier runs grew
//! under target/fuzz. Prints executions and findings per target; a finding fails the run and
//! names its reproducer.

use std::{fs, process::Command};

use anyhow::{Context as _, bail};

use crate::{run, setup, workspace_root};

/// Executions per target in the test suite: about a minute each on the 2-core machine.
pub const TEST_BUDGET: Budget = Budget::Runs(400_000);

#[derive(Clone, Copy, Debug)]
pub enum Budget {
    Runs(u64),
    Seconds(u64),
}

struct Target {
    name: &'static str,
    dictionary: Option<&'static str>,
}

const TARGETS: [Target; 2] = [
    Target {
        name: "http_reassembly",
        dictionary: Some("http.dict"),
    },
    Target {
        name: "redaction",
        dictionary: None,
    },
];

/// `Done 1179777 runs in 121 second(s)`: libFuzzer's closing line.
fn executions(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().rev().find(|line| line.starts_with("Done "))?;
    let mut words = line.split_whitespace();
    let runs = words.nth(1)?.parse().ok()?;
    let seconds = words.nth(2)?.parse().ok()?;
    Some((runs, seconds))
}

pub fn run_all(budget: Budget) -> anyhow::Result<()> {
    setup::cargo_fuzz()?;
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    let mut summary = Vec::new();
    for target in &TARGETS {
        run(Command::new("cargo").current_dir(&fuzz_dir).args([
            "+nightly",
            "fuzz",
            "build",
            "-O",
            target.name,
        ]))
        .with_context(|| format!("building fuzz target {}", target.name))?;
        let corpus = root.join("target/fuzz/corpus").join(target.name);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = fuzz_dir.join("seeds").join(target.name);
        let mut command = Command::new("cargo");
        command
            .current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", "-O", target.name])
            .arg(&corpus);
        if seeds.is_dir() {
            command.arg(&seeds);
        }
        command.args(["--", "-print_final_stats=1"]);
        command.arg(match budget {
            Budget::Runs(runs) => format!("-runs={runs}"),
            Budget::Seconds(seconds) => format!("-max_total_time={seconds}"),
        });
        if let Some(dictionary) = target.dictionary {
            command.arg(format!("-dict={dictionary}"));
        }
        eprintln!("xtask: fuzzing {} ({budget:?})", target.name);
        let output = command
            .output()
            .with_context(|| format!("starting {command:?}"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
            bail!(
                "fuzz target {} found a failure; its input is under fuzz/artifacts/{}",
                target.name,
                target.name
            );
        }
        let (runs, seconds) = executions(&log)
            .with_context(|| format!("no libFuzzer summary from {}", target.name))?;
        let corpus_entries = fs::read_dir(&corpus)?.count();
        summary.push(format!(
            "{:<16} {runs:>10} execs {seconds:>5} s {:>8} execs/s {corpus_entries:>6} corpus entries  0 findings",
            target.name,
            runs / seconds.max(1),
        ));
    }
    println!("fuzzing");
    for line in summary {
        println!("  {line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_closing_line() {
        let log = "#1024 pulse cov: 10\nDone 1179777 runs in 121 second(s)\nstat::number_of_executed_units: 1179777\n";
        assert_eq!(executions(log), Some((1_179_777, 121)));
        assert_eq!(executions("crashed"), None);
    }
}
