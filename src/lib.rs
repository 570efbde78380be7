//! coldgate: a request-buffering activator for scale-to-zero inference services.
//!
//! coldgate is a reverse proxy that holds requests for a service with no ready instance,
//! starts the service, waits until an instance passes its readiness probe, releases the
//! held requests to it, and stops the service again after it has been idle. The binary in
//! `main.rs` only parses the command line; everything else lives here so tests can run it.

pub mod admin;
pub mod backend;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod front_door;
pub mod keep_warm;
pub mod metrics;
pub mod openai;
pub mod predictor;
pub mod probe;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod routing;
pub mod server;
pub mod service;
pub mod tls;
