//! The integration tests: one binary, one module per area, all through `helpers::spawn_app()`
//! and real TLS connections.

mod auth;
mod callbacks;
mod cli;
mod crash;
mod full_disk;
mod helpers;
mod hostile;
mod integrator;
mod logging;
mod openapi;
mod ops_backup;
mod ops_logs;
mod ops_metrics;
mod ops_process;
mod ops_reload;
mod ops_systemd;
mod polling;
mod properties;
mod restart;
mod simulator;
mod transport;
mod wait_cmd;
