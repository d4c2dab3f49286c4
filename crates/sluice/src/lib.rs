//! The `sluice` binary's library half: start-up glue shared by `main.rs` and the integration tests.
//!
//! [`start`] opens the store (closing runs a crash left in flight), builds the models and the
//! engine, binds the listener and serves until [`Running::shutdown`].

pub mod bench;
pub mod chat;
pub mod config;
pub mod http_tool;
pub mod mcp_tool;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sluice_engine::{Engine, Metrics};
use sluice_providers::http::HttpModel;
use sluice_providers::registry::{ModelCatalog, Registry};
use sluice_providers::{DemoConfig, DemoModel};
use sluice_server::AppState;
use sluice_store::{SqliteStore, Store};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// A server that is up.
pub struct Running {
    /// The address actually bound (port 0 resolved).
    pub addr: SocketAddr,
    pub engine: Engine,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful stop: in-flight runs end with `run_interrupted`, the store is flushed.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match tokio::time::timeout(Duration::from_secs(15), self.task).await {
            Ok(joined) => joined
                .context("server task panicked")?
                .context("server failed"),
            Err(_) => {
                tracing::warn!("connections still open 15 s after shutdown; stopping anyway");
                Ok(())
            }
        }
    }
}

pub async fn start(config: Config) -> anyhow::Result<Running> {
    // Locks the data directory first: a second process on it stops here, having changed nothing.
    let (store, recovered) = SqliteStore::open(&config.data_dir, config.store)
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    for run in &recovered {
        if run.interrupted {
            tracing::warn!(run_id = %run.run_id, thread_id = %run.thread_id, durable_seq = run.durable_seq,
                "run was in flight when the server last stopped; marked interrupted");
        } else {
            tracing::warn!(run_id = %run.run_id, thread_id = %run.thread_id,
                "run's terminal event was stored without its end; closed from the event");
        }
    }
    let store: Arc<dyn Store> = Arc::new(store);
    let mut registry = Registry::new().with_demo(DemoModel::new(DemoConfig {
        tokens_per_sec: config.demo_tokens_per_sec,
    }));
    for spec in &config.providers {
        let model = HttpModel::new(spec.clone())
            .map_err(|e| anyhow::anyhow!("provider {}: {e}", spec.name))?;
        let client = if model.uses_direct_client() {
            "sluice"
        } else {
            "reqwest"
        };
        tracing::info!(provider = %spec.name, kind = spec.kind.as_str(), url = %spec.url(), key = spec.api_key.is_some(), client, "provider configured");
        registry.add_provider(model);
    }
    for (name, alias) in &config.aliases {
        registry.add_alias(name.clone(), alias.clone());
    }
    registry.validate().map_err(|e| anyhow::anyhow!(e))?;
    registry
        .resolve(&config.engine.default_model)
        .map_err(|e| anyhow::anyhow!("default_model: {e}"))?;
    tracing::info!(
        tokens_per_sec = config.demo_tokens_per_sec,
        default_model = %config.engine.default_model,
        "model `demo` is the built-in demo: deterministic canned answers, not a real LLM"
    );
    let models: Arc<dyn ModelCatalog> = Arc::new(registry);
    let metrics = Arc::new(Metrics::default());
    // The built-in artifact tools, then whatever the embedding program registered.
    let mut registry_tools = sluice_engine::ToolRegistry::new();
    for tool in sluice_engine::artifacts::builtin(store.clone()) {
        registry_tools.add(tool);
    }
    for tool in config.tools.all() {
        registry_tools.add(tool);
    }
    for (name, server) in &config.mcp {
        let tools = match (&server.command, &server.url) {
            (Some(command), None) => mcp_tool::connect_stdio(name, command, &server.args).await?,
            (None, Some(url)) => mcp_tool::connect_http(name, url).await?,
            _ => anyhow::bail!(
                "mcp.{name}: give either `command` (stdio) or `url` (streamable HTTP)"
            ),
        };
        tracing::info!(server = %name, tools = tools.len(), "MCP server connected");
        for tool in tools {
            registry_tools.add(Arc::new(tool));
        }
    }
    // Agents may only name tools and models that exist.
    let mut names: Vec<&String> = config.engine.agents.keys().collect();
    names.sort();
    for name in names {
        let agent = &config.engine.agents[name];
        for tool in agent.tools.iter().flatten() {
            if registry_tools.get(tool).is_none() {
                anyhow::bail!("agents.{name}.tools: there is no tool {tool:?}");
            }
        }
        if let Some(model) = &agent.model {
            models
                .resolve(model)
                .map_err(|e| anyhow::anyhow!("agents.{name}.model: {e}"))?;
        }
    }
    if let Some(default) = &config.engine.default_agent
        && !config.engine.agents.contains_key(default)
    {
        anyhow::bail!("default_agent {default:?} is not one of [agents.*]");
    }
    let tools = Arc::new(registry_tools);
    let engine = Engine::new(store, models, tools, config.engine.clone(), metrics);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let state = Arc::new(AppState {
        engine: engine.clone(),
        keys: config.keys.clone(),
        http: config.http.clone(),
        shutdown: shutdown.clone(),
    });
    tracing::info!(%addr, data_dir = %config.data_dir.display(), auth = !config.keys.is_empty(), "sluice listening on http://{addr}");
    let task = tokio::spawn(sluice_server::serve(listener, state, shutdown.clone()));
    Ok(Running {
        addr,
        engine,
        shutdown,
        task,
    })
}
