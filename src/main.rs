//! The `meshmeet` command: parse the command line, load the config, start logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshmeet::{Config, Server};

#[derive(Parser)]
#[command(
    name = "meshmeet",
    version,
    about = "Self-hosted video calls: HTTPS, signaling and STUN/TURN in one binary"
)]
struct Cli {
    /// Config file (TOML). Without one, compiled-in defaults are used.
    #[arg(long, short, global = true, env = "MESHMEET_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and print the effective values (secrets redacted).
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshmeet: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        return match config.redacted_toml() {
            Ok(text) => {
                print!("{text}");
                eprintln!("meshmeet: config is valid");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshmeet: {e}");
                ExitCode::FAILURE
            }
        };
    }
    init_tracing(&config.log.level);
    if let Err(e) = meshmeet::sys::raise_nofile_limit() {
        tracing::warn!(error = %e, "cannot raise the open-files limit");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshmeet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("meshmeet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Before anything is bound: from then on, clients (and systemd) may signal.
    let signals = meshmeet::app::Signals::register();
    let server = Server::bind(config).await?;
    server.log_banner();
    let tls = server.state().tls.clone();
    server.run(signals.until_stop(tls)).await
}

/// Human format on a terminal; plain lines without time stamps under journald (which
/// adds its own).
fn init_tracing(level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = std::io::stderr().is_terminal() && !journald;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}
