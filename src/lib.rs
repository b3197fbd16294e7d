//! callback-receiver: the HTTPS Response URL for Sage Intacct asynchronous gateway callbacks.
//!
//! The gateway POSTs each asynchronous `<response>` to `/callback/{policy}`; the service checks
//! the policy's Basic credentials, reads the XML in one streaming pass, stores the raw bytes
//! durably (group-committed fsync) keyed by the control-level `<controlid>`, and only then
//! answers `200`. Integrators fetch results on `/v1/responses/{controlid}` with a bearer token.
//!
//! Modules:
//! - [`cli`]: the commands (`serve`, `check-config`, `hash-password`, `export`, `import`,
//!   `recover`, `wait`, `simulate-gateway`);
//! - [`client`]: a small HTTPS client (one request per connection) for `wait` and the tests;
//! - [`config`]: the typed TOML configuration and the dev profile;
//! - [`app`]: wiring of store, TLS and listener; [`server`]: the accept loop;
//! - [`routes`]: dispatch and handlers; [`summary`]: the JSON summary shape;
//! - [`auth`]: Basic and Bearer parsing, constant-time checks, the verified-credential cache;
//! - [`xml`]: the streaming extractor (no I/O); [`store`]: durable storage (only it knows sled);
//! - [`tls`]: certificates and the rustls configuration; [`state`]: what handlers share;
//! - [`waiters`]: long-poll registry; [`retention`]: the purge task;
//! - [`ratelimit`]: failed-authentication limiting per client address; [`conn_guard`]: the
//!   deadline on a connection's first bytes;
//! - [`simulator`]: a local simulator of the XML gateway (`simulate-gateway`) for trying the
//!   whole asynchronous flow on one machine;
//! - [`telemetry`]: logging set-up;
//! - operations: [`ops`] (`/readyz`, `/metrics`), [`metrics`] (the counters and their text
//!   format), [`notify`] (systemd readiness and watchdog), [`reload`] (SIGHUP), [`backup`]
//!   (`export` and `import`).

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod client;
pub mod config;
pub mod conn_guard;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod ratelimit;
pub mod reload;
pub mod retention;
pub mod routes;
pub mod server;
pub mod simulator;
pub mod state;
pub mod store;
pub mod summary;
pub mod telemetry;
pub mod tls;
pub mod waiters;
pub mod xml;
