//! Tools from MCP servers (`[mcp.NAME]` in sluice.toml), through rmcp, the Model Context Protocol's
//! Rust SDK. At start-up Sluice launches each server over stdio (or connects over streamable HTTP),
//! lists its tools and offers them to
//! models under their own names; a call sends `tools/call` with a progress token, and the server's
//! `notifications/progress` become `tool_execution_progress` as they arrive. Cancelling the run
//! drops the call, and rmcp tells the server it was cancelled.

use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use rmcp::handler::client::progress::ProgressDispatcher;
use rmcp::model::{CallToolRequestParams, ClientRequest, Request, ServerResult};
use rmcp::service::{PeerRequestOptions, RunningService};
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::Value;
use sluice_engine::tools::ToolFuture;
use sluice_engine::{Tool, ToolContext};
use sluice_providers::ToolSpec;

/// Routes the server's progress notifications to the call that asked for them.
#[derive(Clone, Default)]
pub struct Progress {
    dispatcher: ProgressDispatcher,
}

impl ClientHandler for Progress {
    async fn on_progress(
        &self,
        params: rmcp::model::ProgressNotificationParam,
        _context: rmcp::service::NotificationContext<RoleClient>,
    ) {
        self.dispatcher.handle_notification(params).await;
    }
}

type Client = RunningService<RoleClient, Progress>;

/// One tool of one MCP server.
pub struct McpTool {
    spec: ToolSpec,
    client: Arc<Client>,
}

/// Starts the MCP server `command args…` over stdio and answers its tools.
pub async fn connect_stdio(
    server: &str,
    command: &str,
    args: &[String],
) -> anyhow::Result<Vec<McpTool>> {
    let mut cmd = tokio::process::Command::new(command);
    cmd.args(args);
    let transport = TokioChildProcess::new(cmd)
        .with_context(|| format!("mcp.{server}: cannot start {command:?}"))?;
    let client = Progress::default()
        .serve(transport)
        .await
        .with_context(|| format!("mcp.{server}: the MCP handshake failed"))?;
    tools_of(server, client).await
}

/// Connects to the MCP server at `url` over streamable HTTP and answers its tools.
pub async fn connect_http(server: &str, url: &str) -> anyhow::Result<Vec<McpTool>> {
    let transport = rmcp::transport::StreamableHttpClientTransport::from_uri(url.to_string());
    let client = Progress::default()
        .serve(transport)
        .await
        .with_context(|| format!("mcp.{server}: the MCP handshake with {url} failed"))?;
    tools_of(server, client).await
}

async fn tools_of(server: &str, client: Client) -> anyhow::Result<Vec<McpTool>> {
    let tools = client
        .list_all_tools()
        .await
        .with_context(|| format!("mcp.{server}: listing its tools failed"))?;
    let client = Arc::new(client);
    Ok(tools
        .into_iter()
        .map(|t| McpTool {
            spec: ToolSpec {
                name: t.name.to_string(),
                description: t.description.map(|d| d.to_string()).unwrap_or_default(),
                parameters: Value::Object((*t.input_schema).clone()),
            },
            client: client.clone(),
        })
        .collect())
}

impl Tool for McpTool {
    fn spec(&self) -> ToolSpec {
        self.spec.clone()
    }

    fn call(&self, arguments: Value, ctx: ToolContext) -> ToolFuture {
        let client = self.client.clone();
        let name = self.spec.name.clone();
        Box::pin(async move {
            let mut params = CallToolRequestParams::new(name.clone());
            if let Value::Object(args) = arguments {
                params = params.with_arguments(args);
            }
            let handle = client
                .send_cancellable_request(
                    ClientRequest::CallToolRequest(Request::new(params)),
                    PeerRequestOptions::no_options(),
                )
                .await
                .map_err(|e| format!("the MCP tool {name} could not be called: {e}"))?;
            let mut progress = client
                .service()
                .dispatcher
                .subscribe(handle.progress_token.clone())
                .await;
            let response = handle.await_response();
            tokio::pin!(response);
            let result = loop {
                tokio::select! {
                    Some(p) = progress.next() => {
                        let fraction = p.total.filter(|t| *t > 0.0).map(|t| p.progress / t);
                        let step = p.message.clone().unwrap_or_else(|| format!("step {}", p.progress));
                        ctx.progress(step, fraction, p.message).await;
                    }
                    r = &mut response => break r,
                }
            };
            match result.map_err(|e| format!("the MCP tool {name} failed: {e}"))? {
                ServerResult::CallToolResult(r) => {
                    let value = r
                        .structured_content
                        .clone()
                        .unwrap_or_else(|| serde_json::to_value(&r.content).unwrap_or_default());
                    if r.is_error == Some(true) {
                        Err(value.to_string())
                    } else {
                        Ok(value)
                    }
                }
                other => Err(format!(
                    "the MCP tool {name} answered something else: {other:?}"
                )),
            }
        })
    }
}
