//! The small MCP server of the tests: one tool, `count_up`, that reports progress three times (as
//! `notifications/progress`) before answering. Served over stdio by `examples/mcp_test_server.rs`
//! and over streamable HTTP in-process by the tests.

use rmcp::handler::server::tool::ToolRouter;
use rmcp::model::{ProgressNotificationParam, RequestMetaObject};
use rmcp::{Peer, RoleServer, ServerHandler, tool, tool_handler, tool_router};

pub struct CountServer {
    #[allow(dead_code)]
    tool_router: ToolRouter<Self>,
}

impl CountServer {
    pub fn new() -> Self {
        CountServer {
            tool_router: Self::tool_router(),
        }
    }
}

#[tool_router]
impl CountServer {
    /// Counts to three, reporting each step.
    #[tool(description = "Counts to three, reporting progress at each step")]
    async fn count_up(
        meta: RequestMetaObject,
        client: Peer<RoleServer>,
    ) -> Result<String, rmcp::ErrorData> {
        if let Some(token) = meta.get_progress_token() {
            for step in 1..=3 {
                let _ = client
                    .notify_progress(
                        ProgressNotificationParam::new(token.clone(), f64::from(step))
                            .with_total(3.0)
                            .with_message(format!("counted {step}")),
                    )
                    .await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        Ok("counted to 3".to_string())
    }
}

#[tool_handler]
impl ServerHandler for CountServer {}
