//! The real binary: `--help`, argument errors, `check-config`, `hash-password`, `serve` with a
//! configuration file and the dev profile, each stopped with SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::PasswordVerifier;
use http::StatusCode;

use crate::helpers::{
    config_toml, fixture, make_certs, Client, SECOND_USER, SECRETS, TOKEN_ALL, USER,
};

const BIN: &str = env!("CARGO_BIN_EXE_callback-receiver");

/// A command for the binary with a predictable environment.
fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("CALLBACK_RECEIVER_CONFIG")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE");
    cmd
}

/// Runs the binary to completion with `stdin` as its input.
fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for the binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the output is one error line on stderr, an exit code of `code`, and no panic.
fn assert_one_line_error(what: &str, out: &Output, code: Option<i32>) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{what}: exited 0; stderr {stderr:?}");
    if let Some(code) = code {
        assert_eq!(out.status.code(), Some(code), "{what}: stderr {stderr:?}");
    }
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{what}: not one line: {stderr:?}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{what}: {stderr:?}"
    );
}

#[test]
fn every_command_answers_help() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["check-config", "--help"],
        &["hash-password", "--help"],
        &["help", "serve"],
    ] {
        let out = run(args, "");
        assert!(out.status.success(), "{args:?}: {:?}", out.status);
        let stdout = text(&out.stdout);
        assert!(stdout.contains("Usage"), "{args:?}: {stdout}");
    }
    let top = text(&run(&["--help"], "").stdout);
    for command in ["serve", "check-config", "hash-password"] {
        assert!(
            top.contains(command),
            "--help does not list {command}: {top}"
        );
    }
}

#[test]
fn wrong_flags_and_missing_files_are_one_line_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    let missing = missing.to_str().expect("utf-8 path");
    for args in [
        &["serve", "--bogus"][..],
        &["--nope"],
        &["frobnicate"],
        &["check-config"],
        &["check-config", "--config", missing, "--extra"],
        &["serve", "--config", missing],
    ] {
        let out = run(args, "");
        assert_one_line_error(&format!("{args:?}"), &out, None);
    }
    // A missing argument is named, not left as an empty list.
    let out = run(&["check-config"], "");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--config"), "{stderr:?}");
    // A TOML syntax error is one line too (toml's hint goes on the same line).
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "listen = \n").expect("write");
    let out = run(
        &["check-config", "--config", broken.to_str().expect("utf-8")],
        "",
    );
    assert_one_line_error("syntax error", &out, Some(2));
}

#[test]
fn check_config_accepts_a_valid_file_with_a_one_line_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config_toml("")).expect("write config");
    let out = run(
        &["check-config", "--config", path.to_str().expect("utf-8")],
        "",
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout {stdout:?} stderr {:?}",
        text(&out.stderr)
    );
    assert_eq!(stdout.trim_end().lines().count(), 1, "{stdout:?}");
    assert!(stdout.contains("4 policies"), "{stdout:?}");
}

#[test]
fn check_config_names_the_key_and_line_of_a_typo() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certs(dir.path());
    let good = config_toml("");
    let bad = good.replacen(&format!("user = \"{SECOND_USER}\""), "usr = \"typo\"", 1);
    assert_ne!(good, bad);
    let line = bad
        .lines()
        .position(|l| l.starts_with("usr = "))
        .expect("typo line")
        + 1;
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &bad).expect("write config");
    let out = run(
        &["check-config", "--config", path.to_str().expect("utf-8")],
        "",
    );
    assert_one_line_error("typo", &out, Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("usr"), "the key is not named: {stderr:?}");
    assert!(
        stderr.contains(&format!(":{line}")),
        "line {line} is not named: {stderr:?}"
    );
}

#[test]
fn check_config_with_a_missing_file_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nowhere.toml");
    let out = run(
        &["check-config", "--config", path.to_str().expect("utf-8")],
        "",
    );
    assert_one_line_error("missing file", &out, Some(2));
    assert!(
        text(&out.stderr).contains("nowhere.toml"),
        "{:?}",
        text(&out.stderr)
    );
}

#[test]
fn hash_password_prints_an_argon2id_phc_string() {
    let secret = "a secret: with spaces é";
    let out = run(&["hash-password"], &format!("{secret}\n"));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{:?}", text(&out.stderr));
    let phc = stdout.trim_end();
    assert_eq!(phc.lines().count(), 1, "{stdout:?}");
    assert!(phc.starts_with("$argon2id$"), "{phc:?}");
    let parsed = argon2::PasswordHash::new(phc).expect("a PHC string");
    assert!(argon2::Argon2::default()
        .verify_password(secret.as_bytes(), &parsed)
        .is_ok());
    // The printed hash is what the configuration accepts.
    callback_receiver::auth::PasswordHash::parse(phc).expect("accepted as password_hash");

    let out = run(&["hash-password"], "");
    assert_one_line_error("empty stdin", &out, None);
}

/// A running `serve` process, killed if the test ends before it exits.
struct Served {
    /// The process.
    child: Child,
    /// Everything it wrote on stderr so far.
    stderr: Arc<Mutex<String>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Served {
    fn stderr(&self) -> String {
        match self.stderr.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Sends SIGTERM and waits (up to 30 s) for the process to exit.
    fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running 30 s after SIGTERM; stderr: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Starts `serve` with stdout and stderr captured line by line; `lines` receives both, tagged.
fn serve(args: &[&str], cwd: &Path) -> (Served, mpsc::Receiver<(bool, String)>) {
    let mut child = command(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start serve");
    let (tx, rx) = mpsc::channel();
    let stderr = Arc::new(Mutex::new(String::new()));
    let err_pipe = child.stderr.take().expect("stderr");
    let out_pipe = child.stdout.take().expect("stdout");
    {
        let tx = tx.clone();
        let stderr = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                if let Ok(mut s) = stderr.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
                let _ = tx.send((false, line));
            }
        });
    }
    std::thread::spawn(move || {
        for line in BufReader::new(out_pipe).lines().map_while(Result::ok) {
            let _ = tx.send((true, line));
        }
    });
    (Served { child, stderr }, rx)
}

/// The address in a `listening` log line, JSON or text.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        let message = v["message"].as_str().or(v["fields"]["message"].as_str());
        if message == Some("listening") {
            let addr = v["addr"].as_str().or(v["fields"]["addr"].as_str())?;
            return addr.parse().ok();
        }
        return None;
    }
    if !line.contains("listening") {
        return None;
    }
    let rest = &line[line.find("addr=")? + 5..];
    rest.split_whitespace().next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_config_file_serves_and_stops_on_sigterm() {
    crate::helpers::init();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = make_certs(dir.path());
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config_toml("log_format = \"json\"")).expect("write config");
    let (mut served, lines) = serve(
        &["serve", "--config", path.to_str().expect("utf-8")],
        dir.path(),
    );
    let addr = tokio::task::block_in_place(|| loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok((_, line)) => {
                if let Some(addr) = listening_addr(&line) {
                    break addr;
                }
            }
            Err(e) => panic!("no `listening` log line ({e}); stderr: {}", served.stderr()),
        }
    });
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    let client = Client::new(addr, &ca);
    let body = fixture("execProjectSuccess.xml");
    let answer = client.post_ok(body.clone()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let got = client
        .get_response("1543102188", Some(TOKEN_ALL), false)
        .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, body);
    let refused = client
        .post_callback(
            "hello-world",
            Some((USER, "wrong")),
            body,
            Default::default(),
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);

    let status = tokio::task::block_in_place(|| served.terminate());
    assert_eq!(status.code(), Some(0), "stderr: {}", served.stderr());
    let stderr = served.stderr();
    assert!(!stderr.contains("panicked"), "{stderr}");
    for secret in SECRETS {
        assert!(!stderr.contains(secret), "the log contains {secret:?}");
    }
}

/// The value after `label` on a banner line.
fn banner_value(banner: &[String], label: &str) -> Option<String> {
    banner.iter().find_map(|line| {
        line.trim_start()
            .strip_prefix(label)
            .map(|rest| rest.trim().to_string())
    })
}

/// The `curl` commands of the banner, continuation lines joined.
fn curl_commands(banner: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in banner {
        let trimmed = line.trim();
        match current.as_mut() {
            Some(cmd) => cmd.push_str(trimmed.trim_end_matches('\\')),
            None if trimmed.starts_with("curl ") => {
                current = Some(trimmed.trim_end_matches('\\').to_string())
            }
            None => continue,
        }
        if !trimmed.ends_with('\\') {
            out.extend(current.take());
        }
    }
    out
}

fn have_curl() -> bool {
    Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_profile_prints_secrets_and_working_curl_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut served, lines) = serve(&["serve"], dir.path());
    let mut banner: Vec<String> = Vec::new();
    let complete = tokio::task::block_in_place(|| loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok((true, line)) => {
                let last = line.contains("Accept: application/json");
                banner.push(line);
                if last {
                    break true;
                }
            }
            Ok((false, _)) => {}
            Err(_) => break false,
        }
    });
    if !complete {
        let status = tokio::task::block_in_place(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(s) = served.child.try_wait().expect("try_wait") {
                    break Some(s);
                }
                if Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let stderr = served.stderr();
        if status.is_some_and(|s| !s.success()) && stderr.contains("127.0.0.1:8443") {
            eprintln!(
                "SKIPPED dev_profile_prints_secrets_and_working_curl_commands: \
                 127.0.0.1:8443 is not available here: {}",
                stderr.trim()
            );
            return;
        }
        panic!(
            "the dev profile printed no complete banner (status {status:?});\n\
             stdout: {banner:#?}\nstderr: {stderr}"
        );
    }

    let password = banner_value(&banner, "HTTP Password").expect("HTTP Password line");
    let token = banner_value(&banner, "Poller token").expect("Poller token line");
    let ca = banner_value(&banner, "CA certificate").expect("CA certificate line");
    assert_eq!(
        banner_value(&banner, "Response URL").as_deref(),
        Some("https://localhost:8443/callback/dev")
    );
    assert!(!password.is_empty() && token.len() >= 16, "{banner:#?}");
    assert!(Path::new(&ca).is_file(), "CA file {ca} missing");
    assert!(
        dir.path().join("certs/dev/cert.pem").is_file(),
        "no certificate under ./certs/dev/"
    );
    assert!(dir.path().join("data").is_dir(), "no ./data");

    // The secrets work with our own client.
    let addr: SocketAddr = "127.0.0.1:8443".parse().expect("addr");
    let client = Client::new(addr, Path::new(&ca));
    let doc = "<response><control><status>success</status><controlid>own-client</controlid>\
               </control></response>";
    let answer = client
        .post_callback("dev", Some(("dev", &password)), doc, Default::default())
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let got = client.get_response("own-client", Some(&token), false).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body.as_ref(), doc.as_bytes());

    // And so do the printed curl commands, run as printed.
    let commands = curl_commands(&banner);
    assert_eq!(commands.len(), 3, "{commands:#?}");
    if !have_curl() {
        eprintln!("curl is not installed: the printed commands were not run");
    } else {
        let mut outputs = Vec::new();
        for cmd in &commands {
            let out = tokio::task::block_in_place(|| {
                Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .current_dir(dir.path())
                    .env("NO_PROXY", "*")
                    .env("no_proxy", "*")
                    .output()
                    .expect("run sh")
            });
            assert!(
                out.status.success(),
                "{cmd}: {:?} {}",
                out.status,
                text(&out.stderr)
            );
            outputs.push(text(&out.stdout));
        }
        let posted: serde_json::Value =
            serde_json::from_str(&outputs[0]).expect("the POST answers JSON");
        assert_eq!(
            posted["controlid"],
            serde_json::json!("hello-1"),
            "{posted}"
        );
        assert!(
            outputs[1].starts_with("<response>") && outputs[1].contains("hello-1"),
            "{:?}",
            outputs[1]
        );
        let summary: serde_json::Value =
            serde_json::from_str(&outputs[2]).expect("the summary is JSON");
        assert_eq!(
            summary["controlid"],
            serde_json::json!("hello-1"),
            "{summary}"
        );
    }

    let status = tokio::task::block_in_place(|| served.terminate());
    assert_eq!(status.code(), Some(0), "stderr: {}", served.stderr());
    let stderr = served.stderr();
    assert!(
        !stderr.contains(&password),
        "the log contains the dev password"
    );
    assert!(!stderr.contains(&token), "the log contains the dev token");
}
