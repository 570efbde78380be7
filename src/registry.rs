//! The set of configured services and their route table, as one immutable snapshot.
//!
//! The proxy reads the current snapshot without locking (`ArcSwap`), and a configuration
//! reload builds a new snapshot and swaps it in whole. Services that keep their name across
//! a reload keep their `Service` object, so their queue, instances and idle clock survive.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::kubernetes::cluster::Cluster;
use crate::backend::kubernetes::KubernetesBackend;
use crate::backend::process::ProcessBackend;
use crate::backend::Backend;
use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::routing::Router;
use crate::service::{GlobalBudget, Service};

struct Entry {
    service: Arc<Service>,
    /// The backend table it was built from: a reload keeps the service when this is
    /// unchanged (process settings may change; they apply from the next start).
    backend_config: config::Backend,
    /// Kept with its concrete type so a reload can hand it new process settings.
    process: Option<Arc<ProcessBackend>>,
}

pub struct Registry {
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    router: Router,
    /// `[openai]` hosts and the body prefix limit, when model routing is configured.
    openai: Option<config::OpenAiConfig>,
    /// OpenAI model name -> index into `entries`.
    by_model: HashMap<String, usize>,
}

impl Registry {
    /// Builds a snapshot for `config`, reusing the services of `previous` that keep their
    /// name and their kind of backend (and, for Kubernetes, the same Deployment).
    /// Services that are dropped or replaced are returned so the caller can stop them once
    /// they are quiet.
    pub fn build(
        config: &Config,
        previous: Option<&Registry>,
        cluster: Option<&Arc<Cluster>>,
        budget: &Arc<GlobalBudget>,
        metrics: &Metrics,
    ) -> (Registry, Vec<Arc<Service>>) {
        let mut entries = Vec::with_capacity(config.services.len());
        let mut reused = Vec::new();
        for service_config in &config.services {
            let old = previous.and_then(|p| p.entry(&service_config.name));
            let entry = match old.filter(|old| can_reuse(&old.backend_config, &service_config.backend)) {
                Some(old) => {
                    old.service.update_settings(service_config);
                    if let (Some(backend), config::Backend::Process(process)) = (&old.process, &service_config.backend) {
                        backend.update(process.clone());
                    }
                    reused.push(old.service.name.clone());
                    Entry {
                        service: old.service.clone(),
                        backend_config: service_config.backend.clone(),
                        process: old.process.clone(),
                    }
                }
                None => new_entry(service_config, cluster, budget, metrics),
            };
            entries.push(entry);
        }

        let by_name: HashMap<String, usize> =
            entries.iter().enumerate().map(|(i, e)| (e.service.name.to_string(), i)).collect();
        let router = Router::new(config.services.iter().enumerate().flat_map(|(index, service)| {
            service.hosts.iter().map(move |host| (host.as_str(), service.path_prefix.as_str(), index))
        }));

        let removed = previous
            .map(|p| {
                p.entries
                    .iter()
                    .filter(|e| !reused.contains(&e.service.name))
                    .map(|e| e.service.clone())
                    .collect()
            })
            .unwrap_or_default();
        let by_model = config
            .services
            .iter()
            .enumerate()
            .flat_map(|(index, service)| service.models.iter().map(move |model| (model.clone(), index)))
            .collect();
        (Registry { entries, by_name, router, openai: config.openai.clone(), by_model }, removed)
    }

    fn entry(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// Returns the service for a normalised host and a request path.
    pub fn route(&self, host: &str, path: &str) -> Option<Arc<Service>> {
        self.router.route(host, path).map(|i| self.entries[i].service.clone())
    }

    /// Returns the body prefix limit when `host` is one of the `[openai]` hosts.
    pub fn openai_prefix_limit(&self, host: &str) -> Option<usize> {
        self.openai.as_ref().filter(|o| o.hosts.iter().any(|h| h == host)).map(|o| o.max_body_prefix)
    }

    /// Returns the service that serves an OpenAI model name.
    pub fn route_model(&self, model: &str) -> Option<Arc<Service>> {
        self.by_model.get(model).map(|&i| self.entries[i].service.clone())
    }

    /// Returns every configured model with the name of its service, sorted by model.
    pub fn models(&self) -> Vec<(String, String)> {
        let mut models: Vec<(String, String)> =
            self.by_model.iter().map(|(model, &i)| (model.clone(), self.entries[i].service.name.to_string())).collect();
        models.sort();
        models
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.entries.iter().map(|e| &e.service)
    }
}

/// A service survives a reload when its backend keeps its kind and, for Kubernetes, its
/// Deployment, Service and port; anything else needs a new backend.
fn can_reuse(old: &config::Backend, new: &config::Backend) -> bool {
    match (old, new) {
        (config::Backend::Process(_), config::Backend::Process(_)) => true,
        (config::Backend::Kubernetes(old), config::Backend::Kubernetes(new)) => old == new,
        _ => false,
    }
}

fn new_entry(
    service_config: &config::ServiceConfig,
    cluster: Option<&Arc<Cluster>>,
    budget: &Arc<GlobalBudget>,
    metrics: &Metrics,
) -> Entry {
    match &service_config.backend {
        config::Backend::Process(process) => {
            let backend = Arc::new(ProcessBackend::new(&service_config.name, process.clone(), metrics.process_exits.clone()));
            let service = Service::start(service_config, backend.clone() as Arc<dyn Backend>, budget.clone(), metrics);
            Entry { service, backend_config: service_config.backend.clone(), process: Some(backend) }
        }
        config::Backend::Kubernetes(kubernetes) => {
            let cluster = cluster.expect("the Kubernetes client is connected before services that need it");
            let backend = Arc::new(KubernetesBackend::new(
                cluster.clone(),
                &service_config.name,
                kubernetes,
                metrics.kubernetes_api_errors.clone(),
            ));
            let service = Service::start(service_config, backend as Arc<dyn Backend>, budget.clone(), metrics);
            Entry { service, backend_config: service_config.backend.clone(), process: None }
        }
    }
}
