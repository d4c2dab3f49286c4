//! The run's task hands its first output to the subscribers before it goes on with the rest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use futures_util::stream;
use sluice_engine::{Engine, EngineConfig, Metrics, ToolRegistry};
use sluice_protocol::api::RunRequest;
use sluice_protocol::{Cursor, EventKind, Usage};
use sluice_providers::registry::{ModelCatalog, ModelInfo, Resolved};
use sluice_providers::{Model, ModelEvent, ModelRequest, ModelStream};
use sluice_store::SqliteStore;

/// A model whose whole answer is ready at once, as when a short answer arrives in one read.
struct AllAtOnce;

impl Model for AllAtOnce {
    fn stream(&self, _: ModelRequest) -> ModelStream {
        Box::pin(stream::iter([
            Ok(ModelEvent::TextDelta("Hi".into())),
            Ok(ModelEvent::TextDelta(" there".into())),
            Ok(ModelEvent::TextDone),
            Ok(ModelEvent::Usage(Usage {
                input_tokens: 1,
                output_tokens: 2,
                reasoning_tokens: 0,
                total_tokens: 3,
            })),
        ]))
    }
}

struct Catalog;

impl ModelCatalog for Catalog {
    fn resolve(&self, _: &str) -> Result<Resolved, String> {
        Ok(Resolved {
            model: Arc::new(AllAtOnce),
            upstream: "all-at-once".into(),
        })
    }
    fn list(&self) -> Vec<ModelInfo> {
        Vec::new()
    }
}

/// On one thread (as with one worker), a run whose answer is complete in one read would otherwise
/// append every event and end (store, metrics, log line) before a subscriber's task could write
/// the first token.
#[tokio::test]
async fn the_first_token_reaches_a_subscriber_before_the_run_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = SqliteStore::open(dir.path(), Default::default()).expect("store");
    let engine = Engine::new(
        Arc::new(store),
        Arc::new(Catalog),
        Arc::new(ToolRegistry::new()),
        EngineConfig {
            default_model: "all-at-once".into(),
            ..EngineConfig::default()
        },
        Arc::new(Metrics::default()),
    );
    let request = RunRequest {
        content: "hello".into(),
        model: None,
        on_busy: Default::default(),
        on_disconnect: Default::default(),
        agent: None,
    };
    let run = engine.start_run("local", None, request).await.expect("run");
    let mut sub = engine
        .subscribe("local", &run.id, Cursor::new(0), None)
        .await
        .expect("subscribe");
    let started = sub.next().await.expect("run_started");
    assert_eq!(started.kind(), EventKind::RunStarted);
    let first = sub.next().await.expect("the first token");
    assert_eq!(first.kind(), EventKind::TextDelta);
    assert_eq!(
        run.log().len(),
        2,
        "the run went on past its first token before the subscriber got it"
    );
    assert!(!run.log().is_closed());
    let mut kinds = Vec::new();
    while let Some(frame) = sub.next().await {
        kinds.push(frame.kind());
    }
    assert_eq!(kinds.last(), Some(&EventKind::RunCompleted), "{kinds:?}");
    engine.shutdown(std::time::Duration::from_secs(5)).await;
}
