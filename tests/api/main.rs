//! The integration tests: one binary, one module per area, all through `helpers::spawn_app()`
//! and real TLS connections.

mod auth;
mod callbacks;
mod cli;
mod helpers;
mod integrator;
mod logging;
mod openapi;
mod polling;
mod restart;
mod transport;
mod wait_cmd;
