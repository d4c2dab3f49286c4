//! A small MCP server for the integration tests: one tool, `count_up`, that reports progress three
//! times (as `notifications/progress`) before answering. Served over stdio with rmcp.

use rmcp::handler::server::tool::ToolRouter;
use rmcp::model::{ProgressNotificationParam, RequestMetaObject};
use rmcp::{Peer, RoleServer, ServerHandler, ServiceExt, tool, tool_handler, tool_router};

struct TestServer {
    #[allow(dead_code)]
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl TestServer {
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
impl ServerHandler for TestServer {}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = TestServer {
        tool_router: TestServer::tool_router(),
    };
    let service = server.serve(rmcp::transport::io::stdio()).await?;
    service.waiting().await?;
    Ok(())
}
