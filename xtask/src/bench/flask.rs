//! The Flask app under gunicorn: bare, watched by the agent, and with the apitoolkit-flask SDK.

use std::process::{Command, Stdio};

use anyhow::Context as _;

use super::{
    Context, Run, Scenario, TOPIC, agent::Sink, load::Load, pubsub::service_account_file, service,
    with_and_without_agent,
};
use crate::{
    services::{ChildGuard, free_port},
    workspace_root,
};

const GUNICORN_WORKERS: u32 = 2;

fn start_gunicorn(module: &str, port: u16, env: &[(&str, &str)]) -> anyhow::Result<ChildGuard> {
    let mut gunicorn = ChildGuard {
        child: Command::new("python3")
            .args(["-m", "gunicorn", "--workers", &GUNICORN_WORKERS.to_string()])
            .args(["--bind", &format!("127.0.0.1:{port}"), "--chdir"])
            .arg(workspace_root().join("tests/apps"))
            .arg(module)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting gunicorn")?,
        signal: "TERM",
    };
    gunicorn.wait_for_port(port, "gunicorn")?;
    Ok(gunicorn)
}

pub(super) fn title() -> String {
    format!(
        "Flask under gunicorn ({GUNICORN_WORKERS} sync workers), GET /item/1, {}",
        Load::Saturation.describe()
    )
}

/// The Flask app of the tests under gunicorn: bare, watched by the agent, and instrumented with
/// the apitoolkit-flask SDK (the SDK publishes each request before answering it).
pub(super) fn flask_scenario(context: &Context) -> anyhow::Result<Scenario> {
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}/item/1");
    let load = || Load::Saturation.run(&url);
    let title = title();
    let mut gunicorn = start_gunicorn("flask_app:app", port, &[])?;
    let mut scenario = with_and_without_agent(
        title.clone(),
        gunicorn.pid(),
        &[Sink::Stdout, Sink::PubSub],
        context,
        &load,
    )?;
    gunicorn.stop().context("stopping gunicorn")?;

    let stub_port = free_port()?;
    let mut stub = ChildGuard {
        child: Command::new("python3")
            .arg(workspace_root().join("tests/apps/metadata_stub.py"))
            .args([&stub_port.to_string(), TOPIC])
            .arg(service_account_file()?)
            .spawn()
            .context("starting the metadata stub")?,
        signal: "TERM",
    };
    stub.wait_for_port(stub_port, "the metadata stub")?;
    eprintln!("bench: {title}: apitoolkit-flask SDK → Pub/Sub");
    let root_url = format!("http://127.0.0.1:{stub_port}");
    let mut instrumented = start_gunicorn(
        "flask_sdk_app:app",
        port,
        &[
            ("APITOOLKIT_KEY", "test-api-key"),
            ("APITOOLKIT_ROOT_URL", &root_url),
            ("PUBSUB_EMULATOR_HOST", &context.emulator.host),
        ],
    )?;
    let (sdk_load, service_cpu_ns) = service::cpu_during(instrumented.pid(), load)?;
    scenario.runs.push(Run {
        label: "apitoolkit-flask SDK",
        load: sdk_load,
        service_cpu_ns,
        agent: None,
    });
    instrumented.stop().context("stopping gunicorn")?;
    stub.stop()?;
    Ok(scenario)
}
