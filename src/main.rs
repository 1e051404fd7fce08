//! The command line: `outrider run`, `outrider check`, `outrider schema`, `outrider slo-rules`,
//! `outrider version`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "outrider",
    version,
    about = "Reverse-proxy sidecar for Python/FastAPI services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (on the embedded default config when --config is not given).
    Run {
        #[arg(short, long, env = "OUTRIDER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a config file: exit 0 if valid, else print every problem as FILE:LINE:COL.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Print the JSON Schema of the config file (for editors and CI checks).
    Schema,
    /// Print Prometheus recording and burn-rate alerting rules for every SLO in the config.
    SloRules {
        #[arg(short, long)]
        config: PathBuf,
        /// `prometheus` (a rule file) or `kubernetes` (a PrometheusRule manifest).
        #[arg(long, default_value = "prometheus", value_parser = ["prometheus", "kubernetes"])]
        format: String,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => match outrider::server::run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("outrider: {e}");
                ExitCode::from(1)
            }
        },
        Command::Check { config } => match outrider::server::load(Some(&config)) {
            Ok((cfg, _)) => {
                // Build the stages too, as `run` would, so nothing valid-looking fails at start.
                if let Err(message) = outrider::server::compile_check(&cfg) {
                    for line in message.lines() {
                        eprintln!("{}: {line}", config.display());
                    }
                    return ExitCode::from(1);
                }
                println!(
                    "{}: ok ({} routes, {} upstreams)",
                    config.display(),
                    cfg.routes.len(),
                    cfg.upstreams.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                for line in e.lines() {
                    eprintln!("{line}");
                }
                ExitCode::from(1)
            }
        },
        Command::Schema => match serde_json::to_string_pretty(&outrider::config::json_schema()) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("outrider: cannot render the schema: {e}");
                ExitCode::from(1)
            }
        },
        Command::SloRules { config, format } => {
            let cfg = match outrider::server::load(Some(&config)) {
                Ok((cfg, _)) => cfg,
                Err(e) => {
                    for line in e.lines() {
                        eprintln!("{line}");
                    }
                    return ExitCode::from(1);
                }
            };
            let format = if format == "kubernetes" {
                outrider::slo::rules::Format::Kubernetes
            } else {
                outrider::slo::rules::Format::Prometheus
            };
            match outrider::slo::rules::render(&cfg, format) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("outrider: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Version => {
            println!("outrider {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}
