//! The `callback-receiver` binary: installs the crypto provider and hands over to the CLI.

#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    // Exactly one rustls crypto provider for the whole process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    callback_receiver::cli::main()
}
