//! The command line: `serve`, `check-config`, `hash-password`.
//!
//! This is the edge of the program: errors become one line on stderr and an exit code
//! (2 for usage and configuration errors, 1 for failures at run time).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::app::Application;
use crate::config::{self, Config, DevSecrets};
use crate::{auth, telemetry, tls};

/// The exit code of usage and configuration errors.
pub const EXIT_USAGE: u8 = 2;

/// callback-receiver: the HTTPS Response URL for Sage Intacct asynchronous gateway callbacks.
#[derive(Debug, Parser)]
#[command(name = "callback-receiver", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (without a config: the dev profile on 127.0.0.1:8443).
    Serve {
        /// The configuration file.
        #[arg(long, env = "CALLBACK_RECEIVER_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file (and its certificate and key) and print a summary.
    CheckConfig {
        /// The configuration file.
        #[arg(long, env = "CALLBACK_RECEIVER_CONFIG", value_name = "FILE")]
        config: PathBuf,
    },
    /// Read a secret on stdin and print its argon2id hash for `password_hash` / `token_hash`.
    HashPassword,
}

/// Parses the arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(EXIT_USAGE)
                } else {
                    ExitCode::SUCCESS
                };
            }
            let rendered = e.render().to_string();
            let line = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("{line} (see --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Serve { config } => serve(config.as_deref()),
        Command::CheckConfig { config } => check_config(&config),
        Command::HashPassword => hash_password(),
    }
}

fn fail(code: u8, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(code)
}

fn check_config(path: &Path) -> ExitCode {
    let config = match Config::from_file(path) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    if let Err(e) = tls::load_certified_key(&config.tls.cert, &config.tls.key) {
        return fail(EXIT_USAGE, format!("{}: {e}", path.display()));
    }
    println!("{}: ok: {}", path.display(), config.summary());
    ExitCode::SUCCESS
}

fn hash_password() -> ExitCode {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("secret (echoed; end with Enter): ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    if let Err(e) = stdin.lock().read_line(&mut line) {
        return fail(1, format!("reading stdin: {e}"));
    }
    let secret = auth::SecretString::from(line.trim_end_matches(['\r', '\n']).to_string());
    if secret.expose().is_empty() {
        return fail(EXIT_USAGE, "no secret on stdin");
    }
    match auth::hash_secret(secret.expose()) {
        Ok(phc) => {
            println!("{phc}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

fn serve(config_path: Option<&Path>) -> ExitCode {
    let (config, dev) = match config_path {
        Some(path) => match Config::from_file(path) {
            Ok(c) => (c, None),
            Err(e) => return fail(EXIT_USAGE, e),
        },
        None => {
            let root = match std::env::current_dir() {
                Ok(d) => d,
                Err(e) => return fail(1, format!("current directory: {e}")),
            };
            match config::dev_profile(&root) {
                Ok((c, secrets)) => (c, Some(secrets)),
                Err(e) => return fail(1, e),
            }
        }
    };
    telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("starting the runtime: {e}")),
    };
    match runtime.block_on(run(config, dev)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, format!("{e:#}")),
    }
}

async fn run(config: Config, dev: Option<DevSecrets>) -> anyhow::Result<()> {
    tracing::info!(config = %config.summary(), "starting");
    for policy in &config.access.policies {
        if policy.credentials.is_none() {
            tracing::warn!(policy = %policy.id, "policy has no credentials: anyone can post to it");
        }
    }
    let app = Application::build(config)
        .await
        .context("start-up failed")?;
    let addr = app.local_addr();
    tracing::info!(%addr, "listening");
    if let Some(dev) = &dev {
        print_dev_banner(addr, dev);
    }
    app.run_until(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stop with ctrl-c");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn print_dev_banner(addr: std::net::SocketAddr, dev: &DevSecrets) {
    let ca = dev.ca_file.display();
    let base = format!("https://localhost:{}", addr.port());
    let password = dev.password.expose();
    let token = dev.token.expose();
    println!(
        r#"
callback-receiver dev profile (loopback only; do not use in production)

  Response URL   {base}/callback/dev
  HTTP User ID   dev
  HTTP Password  {password}
  Poller token   {token}
  CA certificate {ca}
  (secrets are kept in data/dev-secrets.toml; delete it for new ones)

Post a callback as the gateway would:

  curl --cacert {ca} -u 'dev:{password}' -H 'Content-Type: application/xml' \
    --data-binary '<response><control><status>success</status><controlid>hello-1</controlid></control></response>' \
    {base}/callback/dev

Fetch it as an integrator (raw XML, then the JSON summary):

  curl --cacert {ca} -H 'Authorization: Bearer {token}' {base}/v1/responses/hello-1
  curl --cacert {ca} -H 'Authorization: Bearer {token}' -H 'Accept: application/json' {base}/v1/responses/hello-1
"#
    );
    let _ = std::io::stdout().flush();
}
