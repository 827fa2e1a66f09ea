//! `apitoolkit-agent`: parses the settings, starts logging, and runs a command or the agent.

use std::io::IsTerminal as _;

use apitoolkit_agent::{
    agent::{self, recording},
    allocator,
    capture::preflight,
    config::{self, Cli, Command, ConfigError, LogFormat},
};

fn init_logging(debug: bool, format: LogFormat) {
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("APITOOLKIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logger = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logger.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logger.json().init(),
    }
}

fn main() {
    // Before the runtime's threads allocate anything.
    let base_pages = allocator::use_base_pages();
    let cli = match config::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        // Usage errors, --help and --version print themselves.
        Err(ConfigError::Cli(error)) => error.exit(),
        Err(error) => {
            eprintln!("apitoolkit-agent: {error}");
            std::process::exit(1);
        }
    };
    init_logging(cli.capture.debug, cli.capture.log_format);
    if let Err(error) = base_pages {
        tracing::debug!(%error, "transparent huge pages stay enabled");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("apitoolkit-agent: starting the async runtime: {error}");
            std::process::exit(1);
        }
    };
    // Exits with the runtime still alive: dropping it would wait for blocking threads (stdin,
    // the stdout sink) that an error left running.
    if let Err(error) = runtime.block_on(run(cli)) {
        eprintln!("apitoolkit-agent: {error:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Some(Command::Replay { file }) => {
            recording::replay(file, &cli.capture, std::io::stdout().lock())?;
            Ok(())
        }
        Some(Command::Config { .. }) => {
            print!("{}", cli.capture.to_toml());
            Ok(())
        }
        Some(Command::Check) => {
            let mut checks = preflight::run();
            checks.extend(agent::tls_site_checks());
            let (table, ok) = preflight::report(&checks);
            print!("{table}");
            if !ok {
                anyhow::bail!("this host cannot run the agent: fix the FAIL lines above");
            }
            Ok(())
        }
        None => agent::run(cli.capture).await,
    }
}
