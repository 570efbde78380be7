//! Backends start and stop the instances of a service and report their addresses.
//!
//! A backend never touches the queue: it reports addresses through [`EndpointEvents`], and
//! the service decides when an address is ready (after its own readiness probe) and what
//! happens to held requests when an instance goes away.

pub mod process;

use async_trait::async_trait;

pub use crate::service::EndpointEvents;

/// Errors a backend returns from scaling calls.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("failed to start process {command:?}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to find a free loopback port for the instance: {0}")]
    NoPort(#[source] std::io::Error),
    #[error("failed to stop process {pid}: {source}")]
    Stop {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Asks for at least one instance. Returns once the request is made; addresses arrive
    /// later through `events`. Calling it while an instance runs is harmless.
    async fn scale_up(&self, events: EndpointEvents) -> Result<(), BackendError>;

    /// Stops every instance and returns when they are gone (or the backend gave up waiting).
    async fn scale_down(&self) -> Result<(), BackendError>;

    /// Short name for logs and `/status`, such as "process".
    fn kind(&self) -> &'static str;
}
