//! The integration tests: one binary, one module per area, all through `helpers::spawn_app()`
//! and real TLS connections.

mod auth;
mod callbacks;
mod cli;
mod helpers;
mod logging;
mod polling;
mod restart;
mod transport;
mod wait_cmd;
