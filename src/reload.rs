//! Configuration hot reload, on SIGHUP or when the file's content changes.
//!
//! The file is polled and compared by content every [`CHECK_INTERVAL`], which also catches
//! the symlink swap with which Kubernetes updates a mounted ConfigMap. A new file is
//! validated whole before anything changes: an invalid one is logged with its line and
//! column, counted in `coldgate_config_reloads_total{outcome="failure"}`, and the running
//! configuration stays. A valid one is applied by swapping in a new service registry:
//! services that keep their name keep their queue, instances and in-flight requests and
//! get the new limits at once; removed services take no new requests and are stopped once
//! their held and in-flight requests are done.
//!
//! Not applied without a restart: the listen addresses, TLS files (they reload on their
//! own), thread count, log settings and the `[kubernetes]` table. A change to those is
//! logged as a warning.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tracing::{error, info, warn};

use crate::backend::kubernetes::cluster::Cluster;
use crate::config::{self, Backend, Config};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::service::{GlobalBudget, Service};

/// How often the configuration file is checked for changes.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often a removed service is checked for remaining requests before it is stopped.
const DRAIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);

pub struct Reloader {
    path: PathBuf,
    applied: Mutex<Config>,
    last_content: Mutex<Option<Vec<u8>>>,
    registry: Arc<ArcSwap<Registry>>,
    cluster: tokio::sync::Mutex<Option<Arc<Cluster>>>,
    budget: Arc<GlobalBudget>,
    metrics: Arc<Metrics>,
    /// Services removed by a reload that still have requests; stopped at shutdown too.
    draining: Arc<Mutex<Vec<Arc<Service>>>>,
    /// Serialises reloads triggered by SIGHUP and by the file watch.
    reloading: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        config: Config,
        registry: Arc<ArcSwap<Registry>>,
        cluster: Option<Arc<Cluster>>,
        budget: Arc<GlobalBudget>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let last_content = std::fs::read(&path).ok();
        Arc::new(Reloader {
            path,
            applied: Mutex::new(config),
            last_content: Mutex::new(last_content),
            registry,
            cluster: tokio::sync::Mutex::new(cluster),
            budget,
            metrics,
            draining: Arc::default(),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// Watches for SIGHUP and file changes until the process ends.
    pub fn start(self: &Arc<Self>) {
        let reloader = self.clone();
        tokio::spawn(async move {
            let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(signal) => Some(signal),
                Err(error) => {
                    warn!(%error, "failed to install the SIGHUP handler; reloads follow file changes only");
                    None
                }
            };
            loop {
                let forced = tokio::select! {
                    _ = async { hangup.as_mut().expect("checked").recv().await }, if hangup.is_some() => true,
                    () = tokio::time::sleep(CHECK_INTERVAL) => false,
                };
                if forced {
                    info!(path = %reloader.path.display(), "SIGHUP received; reloading the configuration");
                }
                reloader.check(forced).await;
            }
        });
    }

    /// Reloads when the file changed since the last attempt, or always when `forced`.
    pub async fn check(&self, forced: bool) {
        let _serial = self.reloading.lock().await;
        let content = match std::fs::read(&self.path) {
            Ok(content) => content,
            Err(error) => {
                // A ConfigMap update replaces the file through a symlink; a read can land
                // in the gap. The next check retries.
                if forced {
                    warn!(path = %self.path.display(), %error, "failed to read the configuration file");
                }
                return;
            }
        };
        {
            let mut last = self.last_content.lock();
            if !forced && last.as_deref() == Some(content.as_slice()) {
                return;
            }
            *last = Some(content.clone());
        }
        let text = String::from_utf8_lossy(&content);
        match config::parse(&text, &self.path.display().to_string()) {
            Ok(new_config) => match self.apply(new_config).await {
                Ok(summary) => {
                    self.metrics.config_reloads.with_label_values(&["success"]).inc();
                    info!(path = %self.path.display(), %summary, "configuration reloaded");
                }
                Err(message) => {
                    self.metrics.config_reloads.with_label_values(&["failure"]).inc();
                    error!(path = %self.path.display(), error = %message, "configuration reload failed; keeping the running configuration");
                }
            },
            Err(errors) => {
                self.metrics.config_reloads.with_label_values(&["failure"]).inc();
                for line in errors.to_string().lines() {
                    error!(error = %line, "invalid configuration; keeping the running configuration");
                }
            }
        }
    }

    async fn apply(&self, new_config: Config) -> Result<String, String> {
        warn_about_restart_only_changes(&self.applied.lock(), &new_config);

        let needs_cluster = new_config.services.iter().any(|s| matches!(s.backend, Backend::Kubernetes(_)));
        let cluster = {
            let mut cluster = self.cluster.lock().await;
            if needs_cluster && cluster.is_none() {
                let connected = Cluster::connect(&new_config.kubernetes, self.metrics.leader.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                connected.start_leader_election();
                *cluster = Some(connected);
            }
            cluster.clone()
        };

        self.budget.set_max(new_config.server.max_total_queued);
        let previous = self.registry.load_full();
        let (registry, removed) = Registry::build(&new_config, Some(&previous), cluster.as_ref(), &self.budget, &self.metrics);
        let added = registry.services().filter(|s| !previous.services().any(|p| Arc::ptr_eq(p, s))).count();
        self.registry.store(Arc::new(registry));
        let summary = format!(
            "{} service(s), {added} added, {} removed or replaced",
            new_config.services.len(),
            removed.len()
        );
        for service in removed {
            self.drain_and_stop(service);
        }
        *self.applied.lock() = new_config;
        Ok(summary)
    }

    /// Stops a removed service once its held and in-flight requests are done.
    fn drain_and_stop(&self, service: Arc<Service>) {
        info!(service = %service.name, "service removed from the configuration; stopping it once its requests finish");
        self.draining.lock().push(service.clone());
        let draining = self.draining.clone();
        tokio::spawn(async move {
            while service.has_requests() {
                tokio::time::sleep(DRAIN_CHECK_INTERVAL).await;
            }
            service.shut_down().await;
            draining.lock().retain(|s| !Arc::ptr_eq(s, &service));
            info!(service = %service.name, "removed service stopped");
        });
    }

    /// Returns the current `drain_delay` and `shutdown_grace`.
    pub fn drain_settings(&self) -> (Duration, Duration) {
        let applied = self.applied.lock();
        (applied.server.drain_delay, applied.server.shutdown_grace)
    }

    /// Services removed by reloads that are still draining.
    pub fn draining(&self) -> Vec<Arc<Service>> {
        self.draining.lock().clone()
    }
}

fn warn_about_restart_only_changes(old: &Config, new: &Config) {
    let changes = [
        ("server.listen", old.server.listen != new.server.listen),
        ("server.admin_listen", old.server.admin_listen != new.server.admin_listen),
        ("server.threads", old.server.threads != new.server.threads),
        ("server.tls", old.server.tls != new.server.tls),
        (
            "server.admin_token",
            old.server.admin_token != new.server.admin_token || old.server.admin_token_file != new.server.admin_token_file,
        ),
        ("log", old.log != new.log),
        ("kubernetes", old.kubernetes != new.kubernetes),
    ];
    for (key, changed) in changes {
        if changed {
            warn!(key, "this setting changed but takes effect only after a restart");
        }
    }
}
