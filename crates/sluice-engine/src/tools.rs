//! Tools the model may call, and how a call runs.
//!
//! A [`Tool`] gets its validated arguments and a [`ToolContext`] through which it reports progress
//! and learns of cancellation. Calls run in tasks owned by the run's task (dropping them aborts
//! them); their progress goes back to the run's task through a channel, because only the run's
//! task appends to the log (one writer, one order).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;
use sluice_protocol::api::ArtifactView;
use sluice_providers::ToolSpec;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A step a running tool reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub step: String,
    /// How far along, 0..=1, when the tool knows.
    pub fraction: Option<f64>,
    pub message: Option<String>,
}

/// What a running call reports to the run's task, which appends it.
#[derive(Debug)]
pub(crate) enum Report {
    Progress {
        call_id: String,
        tool_name: String,
        progress: Progress,
    },
    /// A version of an artifact, intermediate or final: appended as an event and stored.
    Artifact(Box<ArtifactView>),
}

/// What a call can use while it runs.
#[derive(Clone)]
pub struct ToolContext {
    pub run_id: Arc<str>,
    pub thread_id: Arc<str>,
    /// The owner of the run's thread: what the tool may read is limited to it.
    pub owner: Arc<str>,
    pub call_id: String,
    /// The artifact this call creates, when the run already showed it while the model was still
    /// writing the call (an artifact-creating tool must then use this id).
    pub artifact_id: Option<String>,
    tool_name: String,
    reports: mpsc::Sender<Report>,
    /// Cancelled when the run is cancelled: long tools should stop at the next chance.
    pub cancel: CancellationToken,
}

impl ToolContext {
    pub(crate) fn new(
        run: &crate::RunHandle,
        call_id: String,
        tool_name: String,
        reports: mpsc::Sender<Report>,
        cancel: CancellationToken,
    ) -> Self {
        ToolContext {
            run_id: run.id.clone(),
            thread_id: Arc::from(run.thread_id.as_str()),
            owner: Arc::from(run.owner.as_str()),
            call_id,
            artifact_id: None,
            tool_name,
            reports,
            cancel,
        }
    }

    /// Publishes a version of an artifact (the run appends `artifact_intermediate` or
    /// `artifact_final` and stores it).
    pub async fn artifact(&self, artifact: ArtifactView) {
        let _ = self
            .reports
            .send(Report::Artifact(Box::new(artifact)))
            .await;
    }

    /// Reports progress. Waits when the run's task is behind (a tool cannot flood it).
    pub async fn progress(
        &self,
        step: impl Into<String>,
        fraction: Option<f64>,
        message: Option<String>,
    ) {
        let progress = Progress {
            step: step.into(),
            fraction: fraction.map(|f| f.clamp(0.0, 1.0)),
            message,
        };
        let _ = self
            .reports
            .send(Report::Progress {
                call_id: self.call_id.clone(),
                tool_name: self.tool_name.clone(),
                progress,
            })
            .await;
    }
}

pub type ToolFuture = Pin<Box<dyn Future<Output = Result<Value, String>> + Send>>;

/// A tool. `call` answers the result (JSON) or an error message the model can read.
pub trait Tool: Send + Sync + 'static {
    fn spec(&self) -> ToolSpec;
    fn call(&self, arguments: Value, ctx: ToolContext) -> ToolFuture;
}

/// The tools offered to models, by name.
#[derive(Clone)]
pub struct ToolRegistry {
    tools: BTreeMap<String, (Arc<dyn Tool>, ToolSpec)>,
    /// Every tool's spec, built once and shared by every run.
    specs: Arc<[ToolSpec]>,
}

impl Default for ToolRegistry {
    fn default() -> Self {
        ToolRegistry {
            tools: BTreeMap::new(),
            specs: Arc::from(Vec::new()),
        }
    }
}

impl ToolRegistry {
    pub fn new() -> Self {
        ToolRegistry::default()
    }

    pub fn add(&mut self, tool: Arc<dyn Tool>) {
        let spec = tool.spec();
        self.tools.insert(spec.name.clone(), (tool, spec));
        self.specs = self.tools.values().map(|(_, s)| s.clone()).collect();
    }

    /// A tool and its spec.
    pub fn get(&self, name: &str) -> Option<(&Arc<dyn Tool>, &ToolSpec)> {
        self.tools.get(name).map(|(t, s)| (t, s))
    }

    pub fn all(&self) -> Vec<Arc<dyn Tool>> {
        self.tools.values().map(|(t, _)| t.clone()).collect()
    }

    pub fn specs(&self) -> Arc<[ToolSpec]> {
        self.specs.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }
}
