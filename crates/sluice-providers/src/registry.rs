//! Which model a run gets: `demo`, `provider/model`, or a configured alias with fallbacks.
//!
//! A run names its model as `provider/model` (`openai/gpt-5`, `anthropic/claude-sonnet-4-5`,
//! `myvllm/qwen3`): the provider part picks a configured [`HttpModel`], the rest is sent upstream as
//! the model name. An alias maps a name to a target and a fallback list: when the target fails before
//! its first token (after its own retries), the next one is tried.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream;

use crate::http::HttpModel;
use crate::{DemoModel, Model, ModelRequest, ModelStream};

/// A model a run can use, and the name sent upstream.
#[derive(Clone)]
pub struct Resolved {
    pub model: Arc<dyn Model>,
    pub upstream: String,
}

/// An entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// What a run names: `demo`, an alias, or `provider/*`.
    pub id: String,
    /// `demo`, `alias`, or the provider's wire protocol.
    pub kind: String,
}

/// Resolves model names for the engine.
pub trait ModelCatalog: Send + Sync + 'static {
    fn resolve(&self, name: &str) -> Result<Resolved, String>;
    fn list(&self) -> Vec<ModelInfo>;
}

/// An alias: a target and what to try when it fails.
#[derive(Debug, Clone)]
pub struct Alias {
    pub target: String,
    pub fallbacks: Vec<String>,
}

#[derive(Default)]
pub struct Registry {
    demo: Option<Arc<DemoModel>>,
    providers: BTreeMap<String, Arc<HttpModel>>,
    aliases: BTreeMap<String, Alias>,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    pub fn with_demo(mut self, demo: DemoModel) -> Self {
        self.demo = Some(Arc::new(demo));
        self
    }

    pub fn add_provider(&mut self, model: HttpModel) {
        self.providers
            .insert(model.spec().name.clone(), Arc::new(model));
    }

    pub fn add_alias(&mut self, name: impl Into<String>, alias: Alias) {
        self.aliases.insert(name.into(), alias);
    }

    pub fn providers(&self) -> impl Iterator<Item = &HttpModel> {
        self.providers.values().map(|p| p.as_ref())
    }

    /// A name without aliases: `demo` or `provider/model`.
    fn direct(&self, name: &str) -> Result<Resolved, String> {
        if name == "demo"
            && let Some(demo) = &self.demo
        {
            return Ok(Resolved {
                model: demo.clone(),
                upstream: "demo".into(),
            });
        }
        let Some((provider, model)) = name
            .split_once('/')
            .filter(|(p, m)| !p.is_empty() && !m.is_empty())
        else {
            return Err(format!(
                "unknown model {name:?}: name a model as provider/model; {}",
                self.available()
            ));
        };
        match self.providers.get(provider) {
            Some(p) => Ok(Resolved {
                model: p.clone(),
                upstream: model.to_string(),
            }),
            None => Err(format!(
                "unknown provider {provider:?} in {name:?}; {}",
                self.available()
            )),
        }
    }

    fn available(&self) -> String {
        let names: Vec<String> = self.list().into_iter().map(|m| m.id).collect();
        if names.is_empty() {
            "no models are configured".into()
        } else {
            format!("available: {}", names.join(", "))
        }
    }

    /// Checks that every alias target and fallback resolves (for start-up validation).
    pub fn validate(&self) -> Result<(), String> {
        for (name, alias) in &self.aliases {
            for target in std::iter::once(&alias.target).chain(&alias.fallbacks) {
                self.direct(target)
                    .map_err(|e| format!("models.{name:?}: {e}"))?;
            }
        }
        Ok(())
    }
}

impl ModelCatalog for Registry {
    fn resolve(&self, name: &str) -> Result<Resolved, String> {
        let Some(alias) = self.aliases.get(name) else {
            return self.direct(name);
        };
        let first = self.direct(&alias.target)?;
        if alias.fallbacks.is_empty() {
            return Ok(first);
        }
        let mut chain = vec![first];
        for f in &alias.fallbacks {
            chain.push(self.direct(f)?);
        }
        Ok(Resolved {
            model: Arc::new(Fallback { chain }),
            upstream: alias.target.clone(),
        })
    }

    fn list(&self) -> Vec<ModelInfo> {
        let mut out = Vec::new();
        if self.demo.is_some() {
            out.push(ModelInfo {
                id: "demo".into(),
                kind: "demo".into(),
            });
        }
        for (name, p) in &self.providers {
            out.push(ModelInfo {
                id: format!("{name}/*"),
                kind: p.spec().kind.as_str().into(),
            });
        }
        for name in self.aliases.keys() {
            out.push(ModelInfo {
                id: name.clone(),
                kind: "alias".into(),
            });
        }
        out
    }
}

/// Tries each model in turn while the current one fails before producing anything.
struct Fallback {
    chain: Vec<Resolved>,
}

impl Model for Fallback {
    fn stream(&self, request: ModelRequest) -> ModelStream {
        struct State {
            chain: Vec<Resolved>,
            next: usize,
            current: Option<ModelStream>,
            produced: bool,
            messages: Vec<crate::ChatMessage>,
            tools: std::sync::Arc<[crate::ToolSpec]>,
        }
        let state = State {
            chain: self.chain.clone(),
            next: 0,
            current: None,
            produced: false,
            messages: request.messages,
            tools: request.tools,
        };
        Box::pin(stream::unfold(state, |mut st| async move {
            loop {
                if st.current.is_none() {
                    let r = st.chain.get(st.next)?.clone();
                    st.next += 1;
                    st.current = Some(r.model.stream(ModelRequest {
                        model: r.upstream,
                        messages: st.messages.clone(),
                        tools: st.tools.clone(),
                    }));
                }
                let current = st.current.as_mut()?;
                match current.next().await {
                    Some(Err(e)) if !st.produced && st.next < st.chain.len() => {
                        tracing::warn!(error = %e, fallback = %st.chain[st.next].upstream, "model failed before its first token; falling back");
                        st.current = None;
                    }
                    Some(item) => {
                        st.produced = true;
                        return Some((item, st));
                    }
                    None => return None,
                }
            }
        }))
    }
}
