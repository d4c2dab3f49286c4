//! The one typed configuration, layered: defaults, then the config file (sluice.toml), then the
//! environment and flags (clap reads both; a flag wins over its variable). Validated at start-up
//! with errors that name the key; API keys never appear in any message.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use serde::Deserialize;
use sluice_engine::{Coalesce, EngineConfig};
use sluice_providers::http::{HttpClient, ProviderSpec, WireKind};
use sluice_providers::registry::Alias;
use sluice_server::{ApiKeys, HttpConfig};

/// `sluice serve` flags; each also reads its `SLUICE_*` variable.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (the log says which).
    #[arg(long, env = "SLUICE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the embedded database.
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Config file (TOML). `./sluice.toml` is read when present and this is not given.
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The demo model's pace in tokens per second (0 = as fast as possible).
    #[arg(long, env = "SLUICE_DEMO_TOKENS_PER_SEC")]
    pub demo_tokens_per_sec: Option<f64>,
    /// API keys as comma-separated `owner:key` pairs.
    #[arg(long, env = "SLUICE_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// Milliseconds of silence after which an SSE heartbeat comment is sent.
    #[arg(long, env = "SLUICE_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// The default model for runs that name none.
    #[arg(long, env = "SLUICE_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// Origins whose web pages may call the API (CORS), comma-separated; `*` allows any.
    #[arg(long, env = "SLUICE_CORS_ORIGINS")]
    pub cors_origins: Option<String>,
}

/// The file's shape. Unknown keys are errors, so a typo does not silently do nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub default_model: Option<String>,
    pub heartbeat_ms: Option<u64>,
    pub max_body_bytes: Option<usize>,
    /// Origins whose web pages may call the API (CORS); `["*"]` allows any.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    pub max_content_bytes: Option<usize>,
    /// The most unfinished runs one owner (API key) may have; 0 = no limit.
    pub max_active_runs_per_owner: Option<usize>,
    /// The most model calls in one run (tool calls, then the model again).
    pub max_steps: Option<u32>,
    /// Seconds a finished run's log stays in memory for replay.
    pub retention_secs: Option<u64>,
    #[serde(default)]
    pub demo: DemoSection,
    #[serde(default)]
    pub coalesce: CoalesceSection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub api_keys: Vec<KeyEntry>,
    /// Named providers: `[providers.myvllm]`.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderSection>,
    /// Aliases and fallback lists: `[models.fast]`, or `[models."openai/gpt-5"]` for fallbacks alone.
    #[serde(default)]
    pub models: BTreeMap<String, ModelSection>,
    /// HTTP tools: `[tools.weather]`.
    #[serde(default)]
    pub tools: BTreeMap<String, ToolSection>,
    /// MCP servers whose tools are offered: `[mcp.files]`.
    #[serde(default)]
    pub mcp: BTreeMap<String, McpSection>,
    /// Named agents: `[agents.analyst]`.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentSection>,
    /// The agent of runs that name none.
    pub default_agent: Option<String>,
}

/// An MCP server: started over stdio (`command`, `args`) or reached over streamable HTTP (`url`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpSection {
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    pub url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub model: Option<String>,
    pub system_prompt: Option<String>,
    /// Tool names (built-in or `[tools.*]`); all tools when absent.
    pub tools: Option<Vec<String>>,
    pub max_steps: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSection {
    /// Where the call's arguments are POSTed.
    pub url: String,
    pub description: Option<String>,
    /// The JSON Schema of the arguments, as a TOML table.
    pub parameters: Option<toml::Value>,
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSection {
    /// `openai-responses`, `openai-chat`, `anthropic` or `ollama`.
    pub kind: String,
    pub base_url: Option<String>,
    pub api_key: Option<String>,
    /// Read the key from this environment variable instead of the file.
    pub api_key_env: Option<String>,
    pub max_retries: Option<u32>,
    pub connect_timeout_ms: Option<u64>,
    pub first_token_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    /// Anthropic's required `max_tokens`.
    pub max_tokens: Option<u32>,
    /// `auto` (Sluice's own HTTP/1.1 client for plain-HTTP URLs, reqwest otherwise) or `reqwest`.
    pub http_client: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The model this name stands for (`provider/model`); the name itself when absent.
    pub target: Option<String>,
    /// Tried in order when the target fails before its first token.
    #[serde(default)]
    pub fallbacks: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoSection {
    pub tokens_per_sec: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoalesceSection {
    /// Largest merged delta (escaped bytes), like STREAM_CHUNK_SIZE; 0 disables merging.
    pub max_bytes: Option<usize>,
    /// How long a caught-up subscriber holds a delta for more, like STREAM_CHUNK_DELAY; 0 = never.
    pub max_delay_ms: Option<u64>,
}

/// How much the store may hold back while the database cannot be written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Bytes of writes queued before new runs are refused (and, while writes fail, given up).
    pub max_queue_bytes: Option<usize>,
    /// How long writes may fail before the queued ones are given up and runs in flight fail.
    pub write_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub owner: String,
    pub key: String,
}

/// Everything `serve` needs, resolved.
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub store: sluice_store::StoreLimits,
    pub demo_tokens_per_sec: f64,
    pub keys: ApiKeys,
    pub engine: EngineConfig,
    pub http: HttpConfig,
    /// Upstream providers (besides the demo model).
    pub providers: Vec<ProviderSpec>,
    pub aliases: Vec<(String, Alias)>,
    /// Tools offered to models (built in or registered by an embedding program).
    pub tools: sluice_engine::ToolRegistry,
    /// MCP servers to start, by name; their tools join `tools` at start-up.
    pub mcp: Vec<(String, McpSection)>,
}

pub fn load(args: &ServeArgs) -> anyhow::Result<Config> {
    let file = match &args.config {
        Some(path) => read_file(path)?,
        None if Path::new("sluice.toml").exists() => read_file(Path::new("sluice.toml"))?,
        None => FileConfig::default(),
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7420)));
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("./sluice-data"));
    let demo_tokens_per_sec = args
        .demo_tokens_per_sec
        .or(file.demo.tokens_per_sec)
        .unwrap_or(30.0);
    if !demo_tokens_per_sec.is_finite() || demo_tokens_per_sec < 0.0 {
        bail!("demo.tokens_per_sec must be a number >= 0 (0 = as fast as possible)");
    }
    let mut keys = match &args.api_keys {
        Some(spec) => ApiKeys::parse(spec).map_err(|e| anyhow::anyhow!("SLUICE_API_KEYS: {e}"))?,
        None => ApiKeys::default(),
    };
    for (i, entry) in file.api_keys.iter().enumerate() {
        if entry.owner.trim().is_empty() || entry.key.trim().is_empty() {
            bail!("api_keys[{i}]: owner and key must not be empty");
        }
        keys.insert(entry.owner.trim(), entry.key.trim());
    }
    let store_defaults = sluice_store::StoreLimits::default();
    let store = sluice_store::StoreLimits {
        max_queue_bytes: file
            .store
            .max_queue_bytes
            .unwrap_or(store_defaults.max_queue_bytes),
        write_timeout: file
            .store
            .write_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(store_defaults.write_timeout),
    };
    if store.max_queue_bytes < 64 * 1024 {
        bail!("store.max_queue_bytes must be at least 65536");
    }
    let heartbeat_ms = args.heartbeat_ms.or(file.heartbeat_ms).unwrap_or(15_000);
    if heartbeat_ms == 0 {
        bail!("heartbeat_ms must be > 0");
    }
    let defaults = EngineConfig::default();
    let engine = EngineConfig {
        // Every write to the embedded store goes through this process.
        history_cache: defaults.history_cache,
        default_model: args
            .default_model
            .clone()
            .or(file.default_model)
            .unwrap_or(defaults.default_model),
        coalesce: Coalesce {
            max_bytes: file
                .coalesce
                .max_bytes
                .unwrap_or(defaults.coalesce.max_bytes),
            max_delay: file
                .coalesce
                .max_delay_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.coalesce.max_delay),
        },
        retention: file
            .retention_secs
            .map(Duration::from_secs)
            .unwrap_or(defaults.retention),
        max_content_bytes: file.max_content_bytes.unwrap_or(defaults.max_content_bytes),
        max_active_runs_per_owner: file
            .max_active_runs_per_owner
            .unwrap_or(defaults.max_active_runs_per_owner),
        max_steps: file.max_steps.unwrap_or(defaults.max_steps),
        agents: file
            .agents
            .into_iter()
            .map(|(name, a)| {
                (
                    name,
                    sluice_engine::Agent {
                        model: a.model,
                        system_prompt: a.system_prompt,
                        tools: a.tools,
                        max_steps: a.max_steps,
                    },
                )
            })
            .collect(),
        default_agent: file.default_agent,
    };
    let cors_origins: Vec<String> = match &args.cors_origins {
        Some(list) => list
            .split(',')
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty())
            .collect(),
        None => file.cors_origins.clone(),
    };
    for origin in &cors_origins {
        if !is_origin(origin) {
            bail!(
                "cors_origins: {origin:?} is not an origin (scheme://host[:port], no path), or \"*\""
            );
        }
    }
    let http = HttpConfig {
        heartbeat: Duration::from_millis(heartbeat_ms),
        max_body_bytes: file
            .max_body_bytes
            .unwrap_or(HttpConfig::default().max_body_bytes),
        cors_origins,
    };
    if keys.is_empty() && !listen.ip().is_loopback() {
        bail!(
            "refusing to listen on {listen} without API keys: anyone on the network could read every \
             thread. Configure keys (SLUICE_API_KEYS=owner:key or [[api_keys]] in the config file) \
             or listen on 127.0.0.1"
        );
    }
    let mut providers: BTreeMap<String, ProviderSpec> = env_providers(&|k| std::env::var(k).ok())
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect();
    for (name, section) in file.providers {
        providers.insert(name.clone(), provider_from_file(&name, section)?);
    }
    let aliases = file
        .models
        .into_iter()
        .map(|(name, m)| {
            let target = m.target.unwrap_or_else(|| name.clone());
            (
                name,
                Alias {
                    target,
                    fallbacks: m.fallbacks,
                },
            )
        })
        .collect();
    let mut tools = sluice_engine::ToolRegistry::new();
    for (name, t) in file.tools {
        tools.add(std::sync::Arc::new(http_tool_from_file(&name, t)?));
    }
    Ok(Config {
        listen,
        data_dir,
        store,
        demo_tokens_per_sec,
        keys,
        engine,
        http,
        providers: providers.into_values().collect(),
        aliases,
        tools,
        mcp: file.mcp.into_iter().collect(),
    })
}

/// Providers from the variables users already set: `OPENAI_API_KEY`/`OPENAI_BASE_URL` give
/// `openai` (Responses API) and `openai-chat` (Chat Completions), `ANTHROPIC_API_KEY`/
/// `ANTHROPIC_BASE_URL` give `anthropic`, `OLLAMA_HOST` gives `ollama`.
pub fn env_providers(get: &dyn Fn(&str) -> Option<String>) -> Vec<ProviderSpec> {
    let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
    let mut out = Vec::new();
    let (openai_key, openai_base) = (get("OPENAI_API_KEY"), get("OPENAI_BASE_URL"));
    if openai_key.is_some() || openai_base.is_some() {
        let base = openai_base.unwrap_or_else(|| "https://api.openai.com/v1".into());
        for (name, kind) in [
            ("openai", WireKind::OpenAiResponses),
            ("openai-chat", WireKind::OpenAiChat),
        ] {
            let mut spec = ProviderSpec::new(name, kind, base.clone());
            spec.api_key = openai_key.clone();
            out.push(spec);
        }
    }
    let (anthropic_key, anthropic_base) = (get("ANTHROPIC_API_KEY"), get("ANTHROPIC_BASE_URL"));
    if anthropic_key.is_some() || anthropic_base.is_some() {
        let base = anthropic_base.unwrap_or_else(|| "https://api.anthropic.com".into());
        let mut spec = ProviderSpec::new("anthropic", WireKind::Anthropic, base);
        spec.api_key = anthropic_key;
        out.push(spec);
    }
    if let Some(host) = get("OLLAMA_HOST") {
        out.push(ProviderSpec::new("ollama", WireKind::Ollama, host));
    }
    out
}

fn http_tool_from_file(name: &str, t: ToolSection) -> anyhow::Result<crate::http_tool::HttpTool> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        bail!("tools.{name:?}: a tool name is letters, digits, '_' or '-'");
    }
    if !(t.url.starts_with("http://") || t.url.starts_with("https://")) {
        bail!("tools.{name}.url must start with http:// or https://");
    }
    let parameters = match t.parameters {
        Some(p) => serde_json::to_value(p).with_context(|| format!("tools.{name}.parameters"))?,
        None => serde_json::json!({"type": "object"}),
    };
    let spec = sluice_providers::ToolSpec {
        name: name.to_string(),
        description: t.description.unwrap_or_default(),
        parameters,
    };
    Ok(crate::http_tool::HttpTool::new(
        spec,
        t.url,
        Duration::from_millis(t.timeout_ms.unwrap_or(30_000)),
    ))
}

fn provider_from_file(name: &str, s: ProviderSection) -> anyhow::Result<ProviderSpec> {
    if name.is_empty() || name.contains('/') || name == "demo" {
        bail!("providers.{name:?}: a provider name must be non-empty, without '/', and not `demo`");
    }
    let kind = WireKind::parse(&s.kind).with_context(|| {
        format!(
            "providers.{name}.kind = {:?}: expected openai-responses, openai-chat, anthropic or ollama",
            s.kind
        )
    })?;
    let base_url = match (&s.base_url, kind) {
        (Some(u), _) => u.clone(),
        (None, WireKind::OpenAiResponses | WireKind::OpenAiChat) => {
            "https://api.openai.com/v1".into()
        }
        (None, WireKind::Anthropic) => "https://api.anthropic.com".into(),
        (None, WireKind::Ollama) => "http://127.0.0.1:11434".into(),
    };
    let mut spec = ProviderSpec::new(name, kind, base_url);
    spec.api_key = match (&s.api_key, &s.api_key_env) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(var)) => Some(std::env::var(var).with_context(|| {
            format!("providers.{name}.api_key_env: the variable {var} is not set")
        })?),
        (None, None) => None,
    };
    if let Some(n) = s.max_retries {
        spec.retry.max_retries = n;
    }
    if let Some(ms) = s.connect_timeout_ms {
        spec.timeouts.connect = Duration::from_millis(ms);
    }
    if let Some(ms) = s.first_token_timeout_ms {
        spec.timeouts.first_token = Duration::from_millis(ms);
    }
    if let Some(ms) = s.idle_timeout_ms {
        spec.timeouts.idle = Duration::from_millis(ms);
    }
    if let Some(n) = s.max_tokens {
        spec.max_tokens = n;
    }
    spec.http_client = match s.http_client.as_deref() {
        None | Some("auto") => HttpClient::Auto,
        Some("reqwest") => HttpClient::Reqwest,
        Some(other) => bail!("providers.{name}.http_client = {other:?}: expected auto or reqwest"),
    };
    Ok(spec)
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// `*`, or `scheme://host[:port]` with an http(s) scheme and nothing after the authority.
fn is_origin(o: &str) -> bool {
    if o == "*" {
        return true;
    }
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains(['/', ' ', '?', '#', '@'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_must_be_origins() {
        for good in ["*", "https://app.example.com", "http://127.0.0.1:5173"] {
            assert!(is_origin(good), "{good}");
        }
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "ftp://x",
            "https://",
            "https://a/b",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
    }

    fn args() -> ServeArgs {
        ServeArgs {
            listen: None,
            data_dir: None,
            config: None,
            demo_tokens_per_sec: None,
            api_keys: None,
            heartbeat_ms: None,
            default_model: None,
            cors_origins: None,
        }
    }

    #[test]
    fn no_keys_means_loopback_only() {
        let mut a = args();
        a.listen = Some("0.0.0.0:7420".parse().expect("addr"));
        let err = load(&a).err().expect("refused").to_string();
        assert!(err.contains("refusing to listen"), "{err}");
        a.api_keys = Some("alice:secret-key".into());
        let cfg = load(&a).expect("allowed with keys");
        assert!(!cfg.keys.is_empty());
    }

    #[test]
    fn providers_come_from_the_usual_variables_and_keys_stay_out_of_debug_output() {
        let env = |k: &str| match k {
            "OPENAI_API_KEY" => Some("sk-secret".to_string()),
            "OLLAMA_HOST" => Some("127.0.0.1:11434".to_string()),
            _ => None,
        };
        let providers = env_providers(&env);
        let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["openai", "openai-chat", "ollama"]);
        assert_eq!(providers[0].url(), "https://api.openai.com/v1/responses");
        assert_eq!(
            providers[1].url(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(providers[2].url(), "http://127.0.0.1:11434/api/chat");
        let debug = format!("{providers:?}");
        assert!(!debug.contains("sk-secret"), "{debug}");
    }

    #[test]
    fn file_providers_and_aliases() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            "[providers.myvllm]\nkind = \"openai-chat\"\nbase_url = \"http://127.0.0.1:8000/v1\"\nmax_retries = 0\n\n[models.fast]\ntarget = \"myvllm/qwen3\"\nfallbacks = [\"demo\"]\n",
        )
        .expect("write");
        let mut a = args();
        a.config = Some(path.clone());
        let cfg = load(&a).expect("valid");
        let vllm = cfg
            .providers
            .iter()
            .find(|p| p.name == "myvllm")
            .expect("myvllm");
        assert_eq!(vllm.url(), "http://127.0.0.1:8000/v1/chat/completions");
        assert_eq!(vllm.retry.max_retries, 0);
        assert_eq!(vllm.http_client, HttpClient::Auto);
        assert_eq!(cfg.aliases[0].0, "fast");
        assert!(cfg.tools.is_empty());
        assert_eq!(cfg.aliases[0].1.fallbacks, ["demo"]);
        std::fs::write(&path, "[providers.x]\nkind = \"grpc\"\n").expect("write");
        let err = format!("{:#}", load(&a).err().expect("rejected"));
        assert!(err.contains("providers.x.kind"), "{err}");
        let with_client = |c: &str| {
            let text = format!("[providers.x]\nkind = \"ollama\"\nhttp_client = \"{c}\"\n");
            std::fs::write(&path, text).expect("write");
            load(&a).map(|cfg| {
                cfg.providers
                    .iter()
                    .find(|p| p.name == "x")
                    .map(|p| p.http_client)
            })
        };
        assert_eq!(
            with_client("reqwest").expect("valid"),
            Some(HttpClient::Reqwest)
        );
        let err = format!("{:#}", with_client("curl").expect_err("rejected"));
        assert!(err.contains("providers.x.http_client"), "{err}");
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\nheartbeat_msec = 5\n").expect("write");
        let mut a = args();
        a.config = Some(path);
        let err = format!("{:#}", load(&a).err().expect("rejected"));
        assert!(err.contains("heartbeat_msec"), "{err}");
    }
}
