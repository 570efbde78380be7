//! Backends start and stop the instances of a service and report their addresses.
//!
//! A backend never touches the queue: it reports addresses through [`EndpointEvents`], and
//! the service decides when an address is ready (after its own readiness probe) and what
//! happens to held requests when an instance goes away.


pub mod kubernetes;
pub mod process;

use std::time::Duration;

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
    /// The Kubernetes API refused the request for good (403 or 404): retrying cannot help.
    #[error("{0}")]
    Refused(String),
    /// The Kubernetes API could not be reached or answered with a retryable error.
    #[error("{0}")]
    Api(String),
}

impl BackendError {
    /// The status held requests get when this error ends an activation: 502 when the
    /// instance itself failed, 503 when the backend's control plane refused or is away.
    pub fn client_status(&self) -> u16 {
        match self {
            BackendError::Spawn { .. } | BackendError::NoPort(_) | BackendError::Stop { .. } => 502,
            BackendError::Refused(_) | BackendError::Api(_) => 503,
        }
    }
}

/// What a scale-down did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScaleDown {
    Done,
    /// Nothing was changed, for example because someone else owns the replica count now.
    Skipped(String),
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Starts background discovery of instances that can appear without an activation
    /// (Kubernetes pods scaled up by another replica or an HPA). Called once, when the
    /// service is created.
    fn watch(&self, _events: EndpointEvents) {}

    /// Asks for at least one instance. Returns once the request is made; addresses arrive
    /// later through `events`. Calling it while an instance runs is harmless.
    async fn scale_up(&self, events: EndpointEvents) -> Result<(), BackendError>;

    /// Returns `Err(reason)` when this coldgate may not scale the service to zero now even
    /// though it is locally idle: it is not the leader, or another replica saw traffic
    /// within `idle_timeout`.
    async fn scale_down_check(&self, _idle_timeout: Duration) -> Result<(), String> {
        Ok(())
    }

    /// Stops every instance and returns when they are gone (or the backend gave up waiting).
    async fn scale_down(&self) -> Result<ScaleDown, BackendError>;

    /// Notes that the service saw traffic. Must be cheap: it runs on every request.
    fn record_activity(&self) {}

    /// Called once when coldgate exits. The process backend stops its child; the
    /// Kubernetes backend leaves replicas alone, since other coldgate replicas go on serving.
    async fn shutdown(&self) {}

    /// Short name for logs and `/status`, such as "process".
    fn kind(&self) -> &'static str;
}
