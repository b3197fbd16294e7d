//! The command line: `serve`, `check-config`, `hash-password`, `export`, `import`, `recover`,
//! `wait` and `simulate-gateway`.
//!
//! This is the edge of the program: errors become one line on stderr and an exit code
//! (2 for usage and configuration errors, 1 for failures at run time).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

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
    /// Write every delivery, quarantined body and expectation of a stopped service to a backup
    /// file (JSON lines, bodies in base64).
    Export {
        /// The configuration file (its data_dir is exported).
        #[arg(long, env = "CALLBACK_RECEIVER_CONFIG", value_name = "FILE")]
        config: PathBuf,
        /// The backup file to write ("-" for stdout); written to FILE.partial, then renamed.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Restore a backup written by `export` into the empty data_dir of a stopped service.
    Import {
        /// The configuration file (the backup goes into its data_dir).
        #[arg(long, env = "CALLBACK_RECEIVER_CONFIG", value_name = "FILE")]
        config: PathBuf,
        /// The backup file to read.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
    },
    /// Salvage the database of a stopped service that cannot be opened after a crash.
    ///
    /// Works on a copy: reads every delivery, quarantined body and expectation it can into a
    /// fresh database in data_dir, and keeps the broken files in data_dir/recovery-TIMESTAMP/broken.
    /// A database that opens and reads is left alone.
    Recover {
        /// The configuration file (its data_dir is recovered).
        #[arg(long, env = "CALLBACK_RECEIVER_CONFIG", value_name = "FILE")]
        config: PathBuf,
    },
    /// Wait for the response to CONTROLID and print it (raw XML, or the JSON summary).
    ///
    /// Long-polls GET {BASE_URL}/v1/responses/{CONTROLID}?wait=S with the poller's bearer token,
    /// reconnecting after connection errors and server errors, until the response is there or
    /// --timeout has passed. Only the response body is written to stdout, byte for byte; errors
    /// are one line on stderr. For shell scripts and cron jobs.
    #[command(after_help = WAIT_AFTER_HELP)]
    Wait(WaitArgs),
    /// Run a local simulator of the Sage Intacct XML gateway, for trying the whole flow.
    ///
    /// Serves POST /ia/xml/xmlgw.phtml over HTTPS: answers requests at once, or acknowledges
    /// requests that name a transport policy and posts their responses to its Response URL.
    SimulateGateway {
        /// The simulator's configuration file (see deploy/simulator.example.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

/// The exit codes of `wait`, shown under its `--help`.
const WAIT_AFTER_HELP: &str = "\
Exit status:
  0  the response was received and written to stdout
  1  --timeout passed before it arrived (or the service failed in a way that did not heal)
  2  usage error, TLS certificate refused, or authentication failed (bad token)";

/// The arguments of `wait`.
#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// The control-level controlid to wait for.
    #[arg(value_name = "CONTROLID")]
    pub controlid: String,
    /// The service's base URL: https://host[:port][/prefix].
    #[arg(long, value_name = "BASE_URL")]
    pub url: String,
    /// A file holding the poller's bearer token (surrounding white space is ignored).
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// PEM file of the CA certificate(s) to trust instead of the system's root certificates.
    #[arg(long, value_name = "PEM")]
    pub cacert: Option<PathBuf>,
    /// Seconds to wait in all; 0 asks once without waiting.
    #[arg(
        long,
        value_name = "S",
        default_value_t = WAIT_DEFAULT_TIMEOUT_SECS,
        value_parser = clap::value_parser!(u64).range(0..=WAIT_MAX_TIMEOUT_SECS)
    )]
    pub timeout: u64,
    /// Print the JSON summary instead of the raw XML.
    #[arg(long)]
    pub json: bool,
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
            eprintln!("{} (see --help)", first_paragraph(&e.render().to_string()));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Serve { config } => serve(config.as_deref()),
        Command::CheckConfig { config } => check_config(&config),
        Command::HashPassword => hash_password(),
        Command::Export { config, out } => backup_report(crate::backup::export(&config, &out)),
        Command::Import { config, input } => backup_report(crate::backup::import(&config, &input)),
        Command::Recover { config } => recover(&config),
        Command::Wait(args) => wait(args),
        Command::SimulateGateway { config } => simulate_gateway(&config),
    }
}

/// The first paragraph of a clap error on one line: `error: the following required arguments
/// were not provided:` is followed by the list on lines of its own, which must not be lost.
fn first_paragraph(rendered: &str) -> String {
    let line = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if line.is_empty() {
        "error: invalid arguments".to_owned()
    } else {
        line
    }
}

fn fail(code: u8, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(code)
}

/// The end of `export` and `import`: the summary (or the error) on one stderr line.
fn backup_report(result: Result<String, crate::backup::BackupError>) -> ExitCode {
    match result {
        Ok(summary) => {
            eprintln!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.exit_code(), e),
    }
}

/// `recover`: salvages the data_dir of a stopped service; the summary on one stderr line.
fn recover(path: &Path) -> ExitCode {
    let config = match Config::from_file(path) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    telemetry::init_with(config.log_format, config.log_timestamps);
    match crate::store::sled_store::recover(&config.data_dir) {
        Ok(report) => {
            eprintln!("{}: {report}", config.data_dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
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
    crate::metrics::mark_process_start();
    telemetry::init_with(config.log_format, config.log_timestamps);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("starting the runtime: {e}")),
    };
    let outcome = runtime.block_on(run(config, dev, config_path.map(Path::to_path_buf)));
    // A reader stuck in a hung store must not keep the process from exiting.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, format!("{e:#}")),
    }
}

async fn run(
    config: Config,
    dev: Option<DevSecrets>,
    config_path: Option<PathBuf>,
) -> anyhow::Result<()> {
    tracing::info!(config = %config.summary(), "starting");
    for policy in &config.access.policies {
        if policy.credentials.is_none() {
            tracing::warn!(policy = %policy.id, "policy has no credentials: anyone can post to it");
        }
    }
    let running = config.clone();
    let app = Application::build(config)
        .await
        .context("start-up failed")?;
    let addr = app.local_addr();
    tracing::info!(%addr, "listening");
    if let Some(dev) = &dev {
        print_dev_banner(addr, dev);
    }
    // SIGHUP reloads, systemd's READY=1 and watchdog from here on; STOPPING=1 at shutdown.
    let lifecycle = crate::reload::Lifecycle::start(config_path, running, &app)
        .context("installing the SIGHUP handler")?;
    app.run_until(lifecycle.until(shutdown_signal())).await?;
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

// ---------------------------------------------------------------------------------------------
// `wait`: long-poll one response.

/// The default of `wait --timeout`: ten minutes, long enough for a slow gateway, short enough
/// for a cron job to notice that no callback came.
pub const WAIT_DEFAULT_TIMEOUT_SECS: u64 = 600;

/// The largest `wait --timeout` accepted: one year.
pub const WAIT_MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

/// The longest `wait=` asked in one request (the server's default `max_wait_seconds`); the
/// server may cap it lower, and the command asks again.
const WAIT_PER_REQUEST_SECS: u64 = 60;

/// Time allowed for an answer beyond the `wait=` asked.
const WAIT_ANSWER_SLACK: Duration = Duration::from_secs(15);

/// The least time between two requests that found nothing, so that a server that ignores
/// `wait=` and answers at once is not asked in a tight loop.
const WAIT_MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The first pause after a connection error or a server error; it doubles up to
/// [`WAIT_BACKOFF_MAX`].
const WAIT_BACKOFF_START: Duration = Duration::from_millis(100);

/// The longest pause between two attempts after errors.
const WAIT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Characters left as they are in the controlid path segment: ALPHA / DIGIT / `-` `.` `_` `~`.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a controlid as one path segment (`.` and `..` too, which would otherwise be
/// dot-segments).
fn encode_controlid(controlid: &str) -> String {
    match controlid {
        "." => "%2E".into(),
        ".." => "%2E%2E".into(),
        _ => percent_encoding::utf8_percent_encode(controlid, PATH_SEGMENT).to_string(),
    }
}

/// Why `wait` stopped without a response.
#[derive(Debug)]
enum WaitFailure {
    /// Exit 1: the time is up, or the service failed in a way a retry cannot heal.
    Failed(String),
    /// Exit 2: usage, TLS certificate or authentication.
    Refused(String),
}

/// What to do with one answer.
#[derive(Debug, PartialEq, Eq)]
enum WaitStep {
    /// The response: print it.
    Done,
    /// Not there yet (404, or 202 pending): ask again, at most once a second.
    NotYet(String),
    /// Busy (503 or 429 with `Retry-After`): ask again after that long.
    RetryAfter(Duration, String),
    /// A server error: ask again after the back-off pause.
    Retry(String),
    /// Refused for good: exit 2.
    Refused(String),
}

/// The decision for one answer of `GET /v1/responses/{controlid}`.
fn wait_step(status: http::StatusCode, headers: &http::HeaderMap, body: &[u8]) -> WaitStep {
    use http::StatusCode;
    match status {
        StatusCode::OK => WaitStep::Done,
        StatusCode::ACCEPTED => WaitStep::NotYet("expected, not received yet (202 pending)".into()),
        StatusCode::NOT_FOUND => WaitStep::NotYet("not received yet (404)".into()),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => WaitStep::Refused(format!(
            "authentication failed ({}): check the token in --token-file",
            status.as_u16()
        )),
        StatusCode::BAD_REQUEST => WaitStep::Refused(format!(
            "the service refused the request (400): {}",
            server_reason(body)
        )),
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
            let what = format!("service unavailable ({})", status.as_u16());
            match retry_after(headers) {
                Some(pause) => WaitStep::RetryAfter(pause, what),
                None => WaitStep::Retry(what),
            }
        }
        s if s.is_server_error() => WaitStep::Retry(format!("server error ({})", s.as_u16())),
        other => WaitStep::Refused(format!(
            "unexpected answer {} from the service; check --url",
            other.as_u16()
        )),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used by the service), at least 100 ms.
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).max(WAIT_BACKOFF_START))
}

/// The service's one-line reason: `{"error": ...}` or the first line of a text body, cleaned
/// of control characters and shortened.
fn server_reason(body: &[u8]) -> String {
    let text = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| {
            String::from_utf8_lossy(body)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        });
    let clean: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    if clean.is_empty() {
        "no reason given".into()
    } else {
        clean
    }
}

/// Reads the bearer token: the file's text without surrounding white space, as a sensitive
/// `Authorization` value. The token never appears in an error.
fn read_token(path: &Path) -> Result<http::HeaderValue, String> {
    let at = || format!("--token-file {}", path.display());
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {}", at(), lower_first(&e)))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", at()))?;
    let token = auth::SecretString::from(text.trim().to_string());
    if token.expose().is_empty() {
        return Err(format!("{}: the file is empty", at()));
    }
    let mut value = http::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .map_err(|_| format!("{}: the token has characters not allowed in a header", at()))?;
    value.set_sensitive(true);
    Ok(value)
}

fn lower_first(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

fn wait(args: WaitArgs) -> ExitCode {
    if args.controlid.is_empty() {
        return fail(EXIT_USAGE, "the controlid is empty");
    }
    let url = match crate::client::BaseUrl::parse(&args.url) {
        Ok(url) => url,
        Err(e) => return fail(EXIT_USAGE, format!("--url: {e}")),
    };
    let token = match read_token(&args.token_file) {
        Ok(token) => token,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let client = match crate::client::Client::new(args.cacert.as_deref()) {
        Ok(client) => client,
        Err(e) if args.cacert.is_some() => return fail(EXIT_USAGE, format!("--cacert: {e}")),
        Err(e) => return fail(EXIT_USAGE, format!("{e} (--cacert)")),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("starting the runtime: {e}")),
    };
    let outcome = runtime.block_on(long_poll(&client, &url, &args, token));
    drop(runtime);
    match outcome {
        Ok(body) => {
            let mut stdout = std::io::stdout().lock();
            match stdout.write_all(&body).and_then(|()| stdout.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(1, format!("writing stdout: {}", lower_first(&e))),
            }
        }
        Err(WaitFailure::Failed(message)) => fail(1, message),
        Err(WaitFailure::Refused(message)) => fail(EXIT_USAGE, message),
    }
}

/// Asks for the response until it is there, a refusal comes, or the time is up.
async fn long_poll(
    client: &crate::client::Client,
    url: &crate::client::BaseUrl,
    args: &WaitArgs,
    token: http::HeaderValue,
) -> Result<bytes::Bytes, WaitFailure> {
    use crate::client::ClientError;
    use std::time::Instant;

    let accept = if args.json {
        "application/json"
    } else {
        "application/xml"
    };
    let headers = [
        (http::header::AUTHORIZATION, token),
        (http::header::ACCEPT, http::HeaderValue::from_static(accept)),
    ];
    let path = format!("/v1/responses/{}", encode_controlid(&args.controlid));
    let once = args.timeout == 0;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut backoff = WAIT_BACKOFF_START;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let (target, attempt) = if once {
            (path.clone(), client.clone())
        } else {
            let wait = remaining.as_secs().min(WAIT_PER_REQUEST_SECS);
            let attempt = client
                .clone()
                .with_connect_timeout(
                    crate::client::DEFAULT_CONNECT_TIMEOUT
                        .min(remaining.max(WAIT_MIN_POLL_INTERVAL)),
                )
                .with_request_timeout(Duration::from_secs(wait) + WAIT_ANSWER_SLACK);
            (format!("{path}?wait={wait}"), attempt)
        };
        let sent = Instant::now();
        let (pause, last) = match attempt.get(url, &target, &headers).await {
            Ok(answer) => match wait_step(answer.status, &answer.headers, &answer.body) {
                WaitStep::Done => return Ok(answer.body),
                WaitStep::NotYet(what) => {
                    backoff = WAIT_BACKOFF_START;
                    (WAIT_MIN_POLL_INTERVAL.saturating_sub(sent.elapsed()), what)
                }
                WaitStep::RetryAfter(pause, what) => (pause, what),
                WaitStep::Retry(what) => (next_backoff(&mut backoff), what),
                WaitStep::Refused(what) => return Err(WaitFailure::Refused(what)),
            },
            Err(e) if e.is_retryable() => (next_backoff(&mut backoff), e.to_string()),
            Err(e @ ClientError::Tls(_)) => {
                let hint = if args.cacert.is_some() {
                    "is --cacert the CA that signed the server's certificate?"
                } else {
                    "for a private CA, name its certificate with --cacert"
                };
                return Err(WaitFailure::Refused(format!("{e} ({hint})")));
            }
            Err(e @ ClientError::Usage(_)) => return Err(WaitFailure::Refused(e.to_string())),
            Err(e) => return Err(WaitFailure::Failed(e.to_string())),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if once {
            return Err(WaitFailure::Failed(format!(
                "controlid {:?}: {last}",
                args.controlid
            )));
        }
        if remaining.is_zero() {
            return Err(WaitFailure::Failed(format!(
                "timed out after {} s waiting for controlid {:?}: {last}",
                args.timeout, args.controlid
            )));
        }
        tokio::time::sleep(pause.min(remaining)).await;
    }
}

/// The pause after an error: the current back-off, which then doubles up to its maximum.
fn next_backoff(backoff: &mut Duration) -> Duration {
    let pause = *backoff;
    *backoff = (*backoff * 2).min(WAIT_BACKOFF_MAX);
    pause
}

// ---------------------------------------------------------------------------------------------
// `simulate-gateway`: the local gateway simulator.

fn simulate_gateway(path: &Path) -> ExitCode {
    use crate::simulator::{banner, SimConfig, Simulator};
    let config = match SimConfig::from_file(path) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("starting the runtime: {e}")),
    };
    let run = async {
        tracing::info!(config = %config.summary(), "starting the gateway simulator");
        let simulator = Simulator::build(config.clone())
            .await
            .context("start-up failed")?;
        tracing::info!(addr = %simulator.local_addr(), "listening");
        println!("{}", banner(&config, &simulator.endpoint_url()));
        let _ = std::io::stdout().flush();
        simulator.run_until(shutdown_signal()).await;
        tracing::info!("stopped");
        anyhow::Ok(())
    };
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(1, format!("{e:#}")),
    }
}

#[cfg(test)]
mod wait_tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, StatusCode};

    fn step(status: u16, retry_after: Option<&str>, body: &str) -> WaitStep {
        let mut headers = HeaderMap::new();
        if let Some(value) = retry_after {
            headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from_str(value).expect("header"),
            );
        }
        let status = StatusCode::from_u16(status).expect("status");
        wait_step(status, &headers, body.as_bytes())
    }

    #[test]
    fn each_status_has_its_action() {
        assert_eq!(step(200, None, ""), WaitStep::Done);
        assert!(matches!(step(202, None, ""), WaitStep::NotYet(_)));
        assert!(matches!(step(404, None, ""), WaitStep::NotYet(_)));
        assert!(
            matches!(step(401, None, ""), WaitStep::Refused(m) if m.contains("authentication"))
        );
        assert!(matches!(
            step(400, None, "{\"error\":\"wait must be a number\"}"),
            WaitStep::Refused(m) if m.contains("wait must be a number")
        ));
        assert_eq!(
            step(503, Some("7"), ""),
            WaitStep::RetryAfter(Duration::from_secs(7), "service unavailable (503)".into())
        );
        assert!(matches!(
            step(503, Some("0"), ""),
            WaitStep::RetryAfter(d, _) if d == WAIT_BACKOFF_START
        ));
        assert!(matches!(step(503, None, ""), WaitStep::Retry(_)));
        assert!(matches!(
            step(503, Some("Wed, 21 Oct 2015 07:28:00 GMT"), ""),
            WaitStep::Retry(_)
        ));
        assert!(matches!(
            step(429, Some("2"), ""),
            WaitStep::RetryAfter(_, _)
        ));
        assert!(matches!(step(500, None, ""), WaitStep::Retry(_)));
        assert!(matches!(step(502, None, ""), WaitStep::Retry(_)));
        assert!(matches!(step(301, None, ""), WaitStep::Refused(m) if m.contains("--url")));
        assert!(matches!(step(405, None, ""), WaitStep::Refused(_)));
    }

    #[test]
    fn server_reasons_are_one_clean_line() {
        assert_eq!(server_reason(b"{\"error\":\"bad\\nthing\"}"), "bad thing");
        assert_eq!(server_reason(b"first line\nsecond"), "first line");
        assert_eq!(server_reason(b""), "no reason given");
        assert_eq!(server_reason("x".repeat(500).as_bytes()).len(), 200);
    }

    #[test]
    fn controlids_are_encoded_as_one_path_segment() {
        assert_eq!(encode_controlid("abc-1.2_3~"), "abc-1.2_3~");
        assert_eq!(encode_controlid("a/b?c#d%e f"), "a%2Fb%3Fc%23d%25e%20f");
        assert_eq!(encode_controlid("é+"), "%C3%A9%2B");
        assert_eq!(encode_controlid("."), "%2E");
        assert_eq!(encode_controlid(".."), "%2E%2E");
        assert_eq!(encode_controlid("..."), "...");
    }

    #[test]
    fn the_token_file_is_trimmed_and_never_echoed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  secret-token-123 \n").expect("write");
        let value = read_token(&path).expect("token");
        assert_eq!(value.to_str().expect("ascii"), "Bearer secret-token-123");
        assert!(value.is_sensitive());
        std::fs::write(&path, " \n\t").expect("write");
        assert!(read_token(&path).is_err_and(|e| e.contains("empty")));
        std::fs::write(&path, "secret\u{7f}token").expect("write");
        assert!(read_token(&path).is_err_and(|e| !e.contains("secret")));
        let missing = dir.path().join("missing");
        assert!(read_token(&missing).is_err_and(|e| e.contains("missing")));
    }
}
